//! Serving exec streams: each stream the control plane opens runs one
//! process, with its output forwarded on the stream and its input fed from
//! it. A command runs on pipes in its own process group; a console
//! (`Exec.tty`) runs on a pseudo-terminal in its own session ([`crate::pty`]).
//!
//! Invariants:
//! - Bytes are never dropped and never buffered without bound: output is read
//!   from a pipe or terminal only once the previous frame has been given
//!   credit, and stdin credit is returned only once the bytes are in the
//!   child's pipe or terminal.
//! - No process outlives its session, on any path (normal exit, timeout,
//!   cancel, link loss, agent shutdown): the whole process group is killed
//!   (for a console, every process of its terminal session and those that
//!   left it) and the child reaped. A guard kills them even if the session
//!   task is aborted or panics.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use gatekey_proto::link::{self, Exec, Exit, Open, RejectCode, exit, open};
use gatekey_proto::mux::{Event, Incoming, Stream, StreamHandle};
use gatekey_proto::{duration, limits, names};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::pty;

/// Runs the sessions of one agent, across links: a process started on a link
/// that has since gone is still counted until it is dead and reaped.
pub struct Executor {
    config: Arc<Config>,
    /// One permit per running session; all permits back means idle.
    slots: Arc<Semaphore>,
}

impl Executor {
    pub fn new(config: Arc<Config>) -> Executor {
        let slots = Arc::new(Semaphore::new(config.max_sessions as usize));
        Executor { config, slots }
    }

    /// Serves the streams of one link until its accept queue ends (the link
    /// closed). Each stream runs in its own task.
    pub async fn serve(&self, mut incoming: mpsc::Receiver<Incoming>) {
        while let Some(inc) = incoming.recv().await {
            self.start(inc);
        }
    }

    /// Sessions whose process has not yet been reaped.
    pub fn running(&self) -> usize {
        self.config.max_sessions as usize - self.slots.available_permits()
    }

    /// Waits until every session has ended: its process group killed and
    /// its process reaped. Sessions end on their own once their link closes.
    pub async fn wait_idle(&self) {
        let _ = self.slots.acquire_many(self.config.max_sessions).await;
    }

    fn start(&self, Incoming { open, stream }: Incoming) {
        let id = stream.id();
        let user = if open.user.is_empty() {
            "unknown user".to_string()
        } else {
            open.user.clone()
        };
        if let Some(open::Kind::Diag(d)) = &open.kind {
            return self.start_diag(d, stream, user);
        }
        match self.plan(&open) {
            Err((code, message)) => {
                info!(stream = id, "refused a session for {user}: {message}");
                tokio::spawn(async move { stream.reject(code, &message).await });
            }
            Ok(plan) => match self.slots.clone().try_acquire_owned() {
                Err(_) => {
                    let message = format!(
                        "this node already runs {} sessions (max_sessions in {})",
                        self.config.max_sessions,
                        self.config.file_display()
                    );
                    info!(stream = id, "refused a session for {user}: {message}");
                    tokio::spawn(async move {
                        stream.reject(RejectCode::TooManySessions, &message).await
                    });
                }
                Ok(permit) => {
                    let config = self.config.clone();
                    tokio::spawn(
                        Session {
                            config,
                            id,
                            user,
                            plan,
                            open,
                            permit,
                        }
                        .run(stream),
                    );
                }
            },
        }
    }

    /// A built-in diagnostic: counted as a session, refused like one.
    fn start_diag(&self, d: &link::Diag, stream: Stream, user: String) {
        let id = stream.id();
        let limits = gatekey_diag::Limits::default();
        let refusal = self
            .sessions_refusal()
            .or_else(|| match crate::diag::parse(d, &limits) {
                Ok(_) => None,
                Err(m) => Some((RejectCode::Invalid, m)),
            });
        if let Some((code, message)) = refusal {
            info!(stream = id, "refused a diagnostic for {user}: {message}");
            tokio::spawn(async move { stream.reject(code, &message).await });
            return;
        }
        let Ok(request) = crate::diag::parse(d, &limits) else {
            return;
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(crate::diag::serve(stream, request, limits, user, permit));
            }
            Err(_) => {
                let message = format!(
                    "this node already runs {} sessions (max_sessions in {})",
                    self.config.max_sessions,
                    self.config.file_display()
                );
                tokio::spawn(
                    async move { stream.reject(RejectCode::TooManySessions, &message).await },
                );
            }
        }
    }

    fn sessions_refusal(&self) -> Option<(RejectCode, String)> {
        (!self.config.session_enabled).then(|| {
            (
                RejectCode::SessionsDisabled,
                format!(
                    "remote sessions are disabled on this node: set session_enabled: true in {} and restart the agent",
                    self.config.file_display()
                ),
            )
        })
    }

    /// Decides whether to run the stream, and what.
    fn plan(&self, open: &Open) -> Result<Plan, (RejectCode, String)> {
        if let Some(refusal) = self.sessions_refusal() {
            return Err(refusal);
        }
        let exec = match &open.kind {
            Some(open::Kind::Exec(exec)) => exec,
            Some(open::Kind::Diag(_)) | None => {
                return Err((
                    RejectCode::Unsupported,
                    format!(
                        "this agent (version {}) cannot serve this kind of stream",
                        gatekey_proto::VERSION
                    ),
                ));
            }
        };
        Plan::new(exec, &self.config).map_err(|m| (RejectCode::Invalid, m))
    }
}

/// What to run.
struct Plan {
    program: Program,
    /// For logs and messages.
    display: String,
    stdin: bool,
    /// Kill the process after this long; zero: never.
    timeout: Duration,
    /// Run on a pseudo-terminal (a console) rather than on pipes.
    tty: Option<Tty>,
}

enum Program {
    /// `shell -c CMD`, or an argv: run as given.
    Given { program: String, args: Vec<String> },
    /// A console's interactive shell, chosen when it starts (see
    /// [`console_shell`]).
    Shell,
}

/// A console's terminal.
struct Tty {
    term: String,
    size: pty::Size,
}

/// TERM when the control plane sends none.
const DEFAULT_TERM: &str = "xterm-256color";
/// Longest TERM accepted.
const MAX_TERM: usize = 64;

impl Plan {
    fn new(exec: &Exec, config: &Config) -> Result<Plan, String> {
        let (program, display) = match (exec.shell_command.is_empty(), exec.argv.is_empty()) {
            (false, true) => {
                names::validate_command(&exec.shell_command)?;
                let program = Program::Given {
                    program: config.shell.display().to_string(),
                    args: vec!["-c".into(), exec.shell_command.clone()],
                };
                (program, exec.shell_command.clone())
            }
            (true, false) => {
                let total: usize = exec.argv.iter().map(|a| a.len() + 1).sum();
                if total > limits::MAX_COMMAND {
                    return Err(format!(
                        "command is longer than {} bytes",
                        limits::MAX_COMMAND
                    ));
                }
                if exec.argv[0].is_empty() {
                    return Err("the program name (argv[0]) must not be empty".into());
                }
                if exec.argv.iter().any(|a| a.contains('\0')) {
                    return Err("command contains a NUL byte".into());
                }
                let program = Program::Given {
                    program: exec.argv[0].clone(),
                    args: exec.argv[1..].to_vec(),
                };
                (program, exec.argv.join(" "))
            }
            // A console without a command is the node's shell.
            // A console without a command is the node's shell (on pipes
            // without a terminal: a script fed on stdin).
            (true, true) if exec.tty => (Program::Shell, "an interactive shell".into()),
            (true, true) => (Program::Shell, "a shell on pipes".into()),
            (false, false) => {
                return Err("both shell_command and argv are set: set exactly one".into());
            }
        };
        let tty = if exec.tty {
            let term = if exec.term.is_empty() {
                DEFAULT_TERM.to_string()
            } else if exec.term.len() <= MAX_TERM && exec.term.bytes().all(|b| b.is_ascii_graphic())
            {
                exec.term.clone()
            } else {
                return Err(format!(
                    "term must be 1 to {MAX_TERM} printable ASCII characters, such as {DEFAULT_TERM}"
                ));
            };
            Some(Tty {
                term,
                size: pty::Size::initial(exec.cols, exec.rows),
            })
        } else {
            None
        };
        let timeout = match (exec.timeout_ms, exec.tty) {
            // A console lasts as long as its user wants: command_timeout is
            // for commands (the control plane bounds idle and total time).
            (0, true) => Duration::ZERO,
            (0, false) => config.command_timeout,
            (ms, _) => Duration::from_millis(ms.into()),
        };
        Ok(Plan {
            program,
            display,
            stdin: exec.stdin,
            timeout,
            tty,
        })
    }

    /// Starts the process; `Err` is the message for the control plane.
    async fn start(&self, config: &Config) -> Result<Started, String> {
        match (&self.tty, &self.program) {
            (None, Program::Given { program, args }) => self.start_piped(program, args),
            (None, Program::Shell) => {
                let account = tokio::task::spawn_blocking(Account::current)
                    .await
                    .unwrap_or_default();
                let (shell, _) = console_shell(config, account.shell.as_deref());
                self.start_piped(&shell.to_string_lossy(), &[])
            }
            (Some(tty), _) => {
                // Off the runtime's threads: see `Account::current`.
                let account = tokio::task::spawn_blocking(Account::current)
                    .await
                    .unwrap_or_default();
                self.start_console(tty, config, &account)
            }
        }
    }

    fn start_piped(&self, program: &str, args: &[String]) -> Result<Started, String> {
        let mut child = Command::new(program)
            .args(args)
            // Its own process group, so a timeout or cancel reaches every
            // process the command started, not only the shell.
            .process_group(0)
            .stdin(if self.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Backstop only: the group is killed explicitly on every path.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {program:?}: {e}"))?;
        // Unreachable in practice: the child has not been waited for yet.
        let pid = child
            .id()
            .ok_or("the process vanished right after starting")?;
        let procs = Procs::Group(Group {
            pgid: Pid::from_raw(pid as i32),
            armed: true,
        });
        let mut outputs: Vec<(Box<dyn AsyncRead + Send + Unpin>, u8)> = Vec::new();
        if let Some(p) = child.stdout.take() {
            widen_pipe(&p);
            outputs.push((Box::new(p), link::CH_STDOUT));
        }
        if let Some(p) = child.stderr.take() {
            widen_pipe(&p);
            outputs.push((Box::new(p), link::CH_STDERR));
        }
        let input = child.stdin.take().map(|p| {
            widen_pipe(&p);
            Box::new(p) as Box<dyn AsyncWrite + Send + Unpin>
        });
        Ok(Started {
            child,
            pid,
            procs,
            outputs,
            input,
            terminal: None,
            what: format!("{:?}", truncate(&self.display, 200)),
        })
    }

    fn start_console(
        &self,
        tty: &Tty,
        config: &Config,
        account: &Account,
    ) -> Result<Started, String> {
        let (program, args, arg0, origin) = match &self.program {
            Program::Given { program, args } => {
                (PathBuf::from(program), args.clone(), None, String::new())
            }
            Program::Shell => {
                let (shell, origin) = console_shell(config, account.shell.as_deref());
                // Named by its basename, without the '-' of a login shell:
                // an interactive shell (it reads ~/.bashrc), not a login.
                let arg0 = shell.file_name().map(|n| n.to_os_string());
                (shell, Vec::new(), arg0, format!(" ({origin})"))
            }
        };
        let console_id = new_console_id();
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .current_dir(account.home.as_deref().unwrap_or(Path::new("/")))
            .env("TERM", &tty.term)
            // How its processes are found if they leave its session.
            .env(pty::CONSOLE_ID_VAR, &console_id)
            // Backstop only: the session is killed explicitly on every path.
            .kill_on_drop(true);
        if let Some(arg0) = arg0 {
            cmd.arg0(arg0);
        }
        let terminal =
            pty::open(tty.size).map_err(|e| format!("cannot allocate a terminal: {e}"))?;
        let (child, master) = terminal
            .spawn(cmd)
            .map_err(|e| format!("cannot start {:?}{origin}: {e}", program.display()))?;
        let pid = child
            .id()
            .ok_or("the process vanished right after starting")?;
        // From here on, dropping `procs` kills whatever the console started.
        let procs = Procs::Console(pty::Guard::new(pty::Members::new(pid, &console_id)));
        let what = match &self.program {
            Program::Given { .. } => {
                format!("a console running {:?}", truncate(&self.display, 200))
            }
            Program::Shell => format!("a console with {}{origin}", program.display()),
        };
        Ok(Started {
            child,
            pid,
            procs,
            outputs: vec![(Box::new(master.clone()), link::CH_STDOUT)],
            input: Some(Box::new(master.clone())),
            terminal: Some(master),
            what: format!(
                "{what}, TERM={} {}x{}",
                tty.term, tty.size.cols, tty.size.rows
            ),
        })
    }
}

/// The passwd entry of the user the agent runs as: where a console starts
/// and, by default, which shell it runs.
#[derive(Default)]
struct Account {
    /// The login shell, if it is a usable one ([`usable_shell`]).
    shell: Option<PathBuf>,
    /// The home directory, if it is one.
    home: Option<PathBuf>,
}

impl Account {
    /// Blocking: the passwd lookup may go through NSS, and both paths are
    /// checked on disk.
    fn current() -> Account {
        match nix::unistd::User::from_uid(nix::unistd::getuid()) {
            Ok(Some(user)) => Account {
                shell: Some(user.shell).filter(|s| usable_shell(s)),
                home: Some(user.dir).filter(|d| d.is_dir()),
            },
            _ => Account::default(),
        }
    }
}

/// The program of a console that names none, and where it came from:
/// `console_shell` from the config, else the account's login shell, else
/// /bin/sh.
///
/// Service accounts, which agents run as, usually have /usr/sbin/nologin or
/// /bin/false as their shell. Those refuse logins, but here the node's own
/// config has already said yes (session_enabled), so a console gets /bin/sh
/// rather than ending at once; console_shell picks another.
fn console_shell(config: &Config, account_shell: Option<&Path>) -> (PathBuf, String) {
    if let Some(shell) = &config.console_shell {
        return (
            shell.clone(),
            format!("console_shell in {}", config.file_display()),
        );
    }
    match account_shell {
        Some(shell) => (shell.to_path_buf(), "the agent user's login shell".into()),
        None => (PathBuf::from("/bin/sh"), "the default shell".into()),
    }
}

/// A login shell a console can run: an executable file, and not one that
/// exists to refuse logins.
pub(crate) fn usable_shell(shell: &Path) -> bool {
    let refuses = matches!(
        shell.file_name().and_then(|n| n.to_str()),
        Some("nologin" | "false" | "true")
    );
    shell.is_absolute()
        && !refuses
        && std::fs::metadata(shell)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Marks a console's processes ([`pty::CONSOLE_ID_VAR`]); unique across the
/// agent's restarts: its pid, the time, a sequence number.
fn new_console_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}-{:x}-{}",
        std::process::id(),
        now.as_nanos(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A started process and its plumbing.
struct Started {
    child: Child,
    pid: u32,
    procs: Procs,
    /// Where its output comes from, each with the channel it goes out on.
    outputs: Vec<(Box<dyn AsyncRead + Send + Unpin>, u8)>,
    /// Where its input goes; `None` (stdin is /dev/null): input is discarded.
    input: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// A console's terminal, for resizes.
    terminal: Option<pty::Master>,
    /// What runs, for the log.
    what: String,
}

/// Kills a process group when dropped, unless disarmed: no path out of a
/// session (including a panic or an aborted task) leaves processes behind.
struct Group {
    pgid: Pid,
    armed: bool,
}

impl Group {
    fn signal(&self, sig: Signal) {
        // ESRCH (the group is already gone) is the common, harmless case.
        let _ = killpg(self.pgid, sig);
    }

    /// SIGKILLs the whole group; after this it is never signalled again, so
    /// a later process reusing the id cannot be hit.
    fn kill(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
            self.armed = false;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything a session started, to be ended with it.
enum Procs {
    /// A command: its process group.
    Group(Group),
    /// A console: its terminal session, and the processes that left it.
    Console(pty::Guard),
}

impl Procs {
    /// Asks them to stop: `signals` to a command's group; a console gets a
    /// hangup instead, which is what its programs expect. Returns the
    /// console's processes, which get the rest of the grace period too.
    async fn ask_to_stop(&self, signals: &[Signal]) -> Vec<i32> {
        match self {
            Procs::Group(g) => {
                for &sig in signals {
                    g.signal(sig);
                }
                Vec::new()
            }
            Procs::Console(c) => c.hang_up().await,
        }
    }

    /// SIGKILLs them all; a no-op the second time.
    async fn kill(&mut self) {
        match self {
            Procs::Group(g) => g.kill(),
            Procs::Console(c) => c.kill().await,
        }
    }

    /// Ends what is left once the main process has exited and its output
    /// was drained. A command's leftovers are killed at once; a console's
    /// (jobs still running) get a hangup first, then the grace period.
    async fn end_leftovers(&mut self, grace: Duration) {
        if let Procs::Console(c) = self {
            let pids = c.hang_up().await;
            pty::wait_gone(&pids, tokio::time::Instant::now() + grace).await;
        }
        self.kill().await;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the main process stopped running.
enum Outcome {
    Exited(ExitStatus),
    TimedOut(Duration),
    Abandoned(String),
}

struct Session {
    config: Arc<Config>,
    id: u32,
    user: String,
    plan: Plan,
    open: Open,
    /// Held until the process is reaped.
    permit: OwnedSemaphorePermit,
}

enum Input {
    Data(Bytes),
    Eof,
}

/// What the end of the input means to the process.
#[derive(Clone, Copy)]
enum OnEof {
    /// Close its stdin pipe.
    Close,
    /// A terminal cannot be half-closed: type ^D once, as a user would. A
    /// shell at its prompt exits; after a partial line it ends that line.
    CtrlD,
}

impl Session {
    async fn run(self, mut stream: Stream) {
        let id = self.id;
        let started = Instant::now();
        let Started {
            mut child,
            pid,
            mut procs,
            outputs,
            input,
            terminal,
            what,
        } = match self.plan.start(&self.config).await {
            Ok(s) => s,
            Err(message) => {
                warn!(stream = id, "session for {}: {message}", self.user);
                stream.reject(RejectCode::SpawnFailed, &message).await;
                return;
            }
        };
        info!(
            stream = id,
            pid, "session for {}: running {what}", self.user
        );

        if stream.accept(pid).await.is_err() {
            // Closes a console's terminal: its hangup.
            drop((outputs, input, terminal));
            terminate(
                &mut child,
                &mut procs,
                &[Signal::SIGHUP, Signal::SIGTERM],
                self.config.kill_grace,
            )
            .await;
            info!(
                stream = id,
                pid,
                "session for {}: link closed before the session started; process killed",
                self.user
            );
            return;
        }

        // Output: one pump per pipe (one for a terminal). They stop reading
        // when `stop` is set and no more output is immediately available.
        let handle = stream.handle();
        let max_frame = match self.open.max_frame {
            0 => handle.max_frame(),
            n => handle.max_frame().min(n as usize),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let pumps: Vec<JoinHandle<()>> = outputs
            .into_iter()
            .map(|(source, channel)| {
                tokio::spawn(pump(
                    source,
                    handle.clone(),
                    channel,
                    max_frame,
                    stop_rx.clone(),
                ))
            })
            .collect();
        let abort_pumps: Vec<AbortOnDrop> = pumps
            .iter()
            .map(|p| AbortOnDrop(p.abort_handle()))
            .collect();
        let mut pumps_done = std::pin::pin!(async move {
            for p in pumps {
                let _ = p.await;
            }
        });

        // Input: a writer task, so a child that does not read its stdin can
        // block only the writer, never the timeout or a cancel.
        let on_eof = if terminal.is_some() {
            OnEof::CtrlD
        } else {
            OnEof::Close
        };
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        let (written_tx, mut written_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_stdin(input, on_eof, input_rx, written_tx));
        let abort_writer = AbortOnDrop(writer.abort_handle());

        let timeout = self.plan.timeout;
        // Only the first EOF counts: repeats must not queue up behind a child
        // that is not reading its stdin.
        let mut stdin_eof = false;
        let outcome = {
            let mut deadline = std::pin::pin!(async {
                if timeout.is_zero() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(timeout).await;
            });
            loop {
                tokio::select! {
                    r = child.wait() => break match r {
                        Ok(status) => Outcome::Exited(status),
                        Err(e) => Outcome::Abandoned(format!("cannot wait for the process: {e}")),
                    },
                    () = &mut deadline => break Outcome::TimedOut(timeout),
                    Some(n) = written_rx.recv() => stream.consumed(n),
                    ev = stream.next() => match ev {
                        Some(Event::Data(d)) if d.channel() == link::CH_STDIN => {
                            let n = d.len();
                            if input_tx.send(Input::Data(d.payload())).is_err() {
                                stream.consumed(n);
                            }
                        }
                        // Data on a channel we never read from: discard, but keep credit flowing.
                        Some(Event::Data(d)) => stream.consumed(d.len()),
                        Some(Event::Eof(link::CH_STDIN)) if !stdin_eof => {
                            stdin_eof = true;
                            let _ = input_tx.send(Input::Eof);
                        }
                        Some(Event::Resize(r)) => resize(terminal.as_ref(), id, r.cols, r.rows),
                        Some(Event::Cancelled(reason)) => break Outcome::Abandoned(format!("cancelled by the control plane: {reason}")),
                        Some(Event::LinkClosed(reason)) => break Outcome::Abandoned(format!("link to the control plane lost: {reason}")),
                        None => break Outcome::Abandoned("stream closed".into()),
                        // Eof on other channels, opener-only events.
                        Some(_) => {}
                    },
                }
            }
        };
        drop(input_tx);
        // A finished future must not be polled again.
        let mut pumps_finished = false;

        let (status, timed_out) = match outcome {
            Outcome::Abandoned(reason) => {
                // Nobody reads the output any more. Stopping the tasks closes
                // a console's terminal, which is its hangup.
                drop((abort_pumps, abort_writer, terminal));
                let status = terminate(
                    &mut child,
                    &mut procs,
                    &[Signal::SIGHUP, Signal::SIGTERM],
                    self.config.kill_grace,
                )
                .await;
                info!(
                    stream = id,
                    pid,
                    "session for {}: {reason}; process group killed ({})",
                    self.user,
                    describe(status)
                );
                return;
            }
            Outcome::TimedOut(after) => {
                let status = terminate(
                    &mut child,
                    &mut procs,
                    &[Signal::SIGTERM],
                    self.config.kill_grace,
                )
                .await;
                let _ = stop_tx.send(true);
                (status, Some(after))
            }
            Outcome::Exited(status) => {
                // Leftover background processes may still hold the pipes
                // (the terminal) open: give them a moment to finish writing,
                // then end them.
                let drain = self.config.exit_drain_timeout;
                let abandoned = tokio::select! {
                    () = &mut pumps_done => {
                        pumps_finished = true;
                        None
                    }
                    () = tokio::time::sleep(drain) => None,
                    reason = final_event(&mut stream) => Some(reason),
                };
                procs.end_leftovers(self.config.kill_grace).await;
                if let Some(reason) = abandoned {
                    info!(
                        stream = id,
                        pid, "session for {}: {reason} after the process exited", self.user
                    );
                    return;
                }
                let _ = stop_tx.send(true);
                (Some(status), None)
            }
        };

        // Deliver the rest of the output (waiting for credit if need be), then the exit.
        if !pumps_finished {
            tokio::select! {
                () = &mut pumps_done => {}
                reason = final_event(&mut stream) => {
                    info!(stream = id, pid, "session for {}: {reason} while sending the last output", self.user);
                    return;
                }
            }
        }
        let exit = exit_message(status, timed_out);
        info!(
            stream = id,
            pid,
            "session for {} ended: {} after {}",
            self.user,
            if exit.message.is_empty() {
                describe(status)
            } else {
                exit.message.clone()
            },
            duration::format(Duration::from_millis(started.elapsed().as_millis() as u64)),
        );
        // The process is reaped and its group killed: free the slot before
        // the control plane hears of the exit and possibly opens the next one.
        drop(self.permit);
        let _ = handle.send_exit(exit).await;
    }
}

/// Applies a `Resize` to a console's terminal; a command has none to resize.
fn resize(terminal: Option<&pty::Master>, id: u32, cols: u32, rows: u32) {
    let Some(terminal) = terminal else { return };
    match pty::Size::resize(cols, rows) {
        Some(size) => {
            if let Err(e) = terminal.resize(size) {
                debug!(stream = id, "resizing the terminal failed: {e}");
            }
        }
        None => debug!(stream = id, "ignored a resize to {cols}x{rows}"),
    }
}

/// Stops everything the session started: `first` signals (a console gets a
/// hangup), then SIGKILL after `grace` if the process has not exited (a
/// console's other processes get the same grace), then SIGKILL for any
/// leftovers. Reaps the child.
async fn terminate(
    child: &mut Child,
    procs: &mut Procs,
    first: &[Signal],
    grace: Duration,
) -> Option<ExitStatus> {
    let deadline = tokio::time::Instant::now() + grace;
    let others = procs.ask_to_stop(first).await;
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(r) => r.ok(),
        Err(_) => {
            procs.kill().await;
            child.wait().await.ok()
        }
    };
    pty::wait_gone(&others, deadline).await;
    procs.kill().await;
    status
}

/// Waits for the stream to end (cancel, link loss), discarding input.
async fn final_event(stream: &mut Stream) -> String {
    loop {
        match stream.next().await {
            Some(Event::Data(d)) => stream.consumed(d.len()),
            Some(Event::Cancelled(reason)) => {
                return format!("cancelled by the control plane: {reason}");
            }
            Some(Event::LinkClosed(reason)) => {
                return format!("link to the control plane lost: {reason}");
            }
            None => return "stream closed".into(),
            Some(_) => {}
        }
    }
}

/// First read size of an output pump.
const FIRST_READ: usize = 16 * 1024;

/// Forwards one pipe to one channel. Whatever a read returns is sent at once
/// (a prompt without a newline must show up); the next read waits until the
/// frame has credit, which is the backpressure on the process.
/// Pipe capacity asked for: with the default 64 KiB every read is small and
/// bulk output costs a wakeup per 64 KiB; 1 MiB lets one read fill a frame.
const PIPE_SIZE: i32 = 1 << 20;

/// Best effort: the kernel may refuse (pipe-max-size, per-user pipe limits).
fn widen_pipe(pipe: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
}

async fn pump<R: AsyncRead + Unpin>(
    mut pipe: R,
    handle: StreamHandle,
    channel: u8,
    max_frame: usize,
    mut stop: watch::Receiver<bool>,
) {
    let max_frame = max_frame.max(1);
    // Read size adapts: small for chatty output (a frame still queued for the
    // link pins its whole allocation), growing to max_frame for bulk output.
    let mut want = FIRST_READ.min(max_frame);
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(link::DATA_HEADER_LEN + want);
        link::put_data_header(&mut buf, handle.id(), channel);
        let mut room = (&mut buf).limit(want);
        let read = tokio::select! {
            biased;
            r = pipe.read_buf(&mut room) => r,
            // Told to stop and nothing is ready: leftovers keep the pipe open.
            _ = stop.wait_for(|s| *s) => break,
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                if n == want {
                    want = (want * 2).min(max_frame);
                } else if n < want / 4 {
                    want = (want / 2).max(FIRST_READ.min(max_frame));
                }
                // `split` hands the frame off and keeps the spare capacity for the next read.
                if handle.send_frame(buf.split()).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.clear(),
            Err(e) => {
                debug!(
                    stream = handle.id(),
                    channel, "reading the process output failed: {e}"
                );
                break;
            }
        }
    }
    let _ = handle.send_eof(channel).await;
}

/// Feeds stdin and reports every chunk as written (or discarded, once stdin
/// is closed), which is when its credit goes back to the control plane.
async fn write_stdin(
    mut stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    on_eof: OnEof,
    mut input: mpsc::UnboundedReceiver<Input>,
    written: mpsc::UnboundedSender<usize>,
) {
    while let Some(item) = input.recv().await {
        match item {
            Input::Data(data) => {
                if let Some(sink) = stdin.as_mut()
                    && let Err(e) = sink.write_all(&data).await
                {
                    // EPIPE: the process closed its stdin (EIO: the terminal
                    // is gone). Later input is discarded.
                    debug!("writing to the process's stdin failed: {e}");
                    stdin = None;
                }
                let _ = written.send(data.len());
            }
            Input::Eof => match on_eof {
                OnEof::Close => {
                    if let Some(mut pipe) = stdin.take() {
                        let _ = pipe.shutdown().await;
                    }
                }
                OnEof::CtrlD => {
                    if let Some(terminal) = stdin.as_mut()
                        && terminal.write_all(b"\x04").await.is_err()
                    {
                        stdin = None;
                    }
                }
            },
        }
    }
}

fn exit_message(status: Option<ExitStatus>, timed_out: Option<Duration>) -> Exit {
    let mut message = String::new();
    let status = match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Some(exit::Status::Code(code)),
            (None, Some(sig)) => {
                message = format!("killed by {}", signal_name(sig));
                Some(exit::Status::Signal(sig))
            }
            (None, None) => None,
        },
        None => None,
    };
    if let Some(after) = timed_out {
        message = format!(
            "killed after the command timeout of {}",
            duration::format(after)
        );
    }
    Exit {
        stream_id: 0,
        status,
        timed_out: timed_out.is_some(),
        message,
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "exit status unknown".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by {}", signal_name(sig)),
            _ => format!("{s}"),
        },
    }
}

fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => format!("signal {sig} ({})", s.as_str()),
        Err(_) => format!("signal {sig}"),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use gatekey_proto::link::Accept;
    use gatekey_proto::mux::OpenError;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdout_and_stderr_stay_separate() {
        let (server, _agent, _) = link(config(true)).await;
        let out = run(&server, shell("echo out; echo err >&2; echo out2")).await;
        assert_eq!(out.stdout, b"out\nout2\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
        let mut eofs = out.eofs.clone();
        eofs.sort();
        assert_eq!(eofs, vec![link::CH_STDOUT, link::CH_STDERR]);
        assert!(!out.exit.unwrap().timed_out);
    }

    /// `close_if_idle` (the control plane's rebalancing) leaves a link with
    /// a stream open, and closes it once none is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_closes_if_idle_only_without_streams() {
        let (server, _agent, _) = link(config(true)).await;
        let (mut stream, _) = open(&server, shell("sleep 0.3; echo done"))
            .await
            .expect("accepted");
        assert!(!server.close_if_idle(1001, "test"));
        let out = within("the exit", collect(&mut stream)).await;
        assert_eq!(out.stdout, b"done\n");
        drop(stream);
        within("the stream to be forgotten", async {
            while server.stream_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(server.close_if_idle(1001, "rebalancing"));
        let why = within("the link to close", server.closed()).await;
        assert!(why.contains("rebalancing"), "{why}");
        // Closed: nothing more opens, and a second close is no news.
        assert!(open(&server, shell("true")).await.is_err());
        assert!(!server.close_if_idle(1001, "again"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exit_code_and_signal_are_reported() {
        let (server, _agent, _) = link(config(true)).await;
        let out = run(&server, shell("exit 3")).await;
        assert_eq!(code(&out), Some(exit::Status::Code(3)));

        let out = run(&server, shell("kill -9 $$")).await;
        assert_eq!(code(&out), Some(exit::Status::Signal(9)));
        assert!(out.exit.unwrap().message.contains("SIGKILL"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn argv_runs_without_a_shell() {
        let (server, _agent, _) = link(config(true)).await;
        let out = run(
            &server,
            Exec {
                argv: vec!["printf".into(), "%s|".into(), "a b".into(), "$HOME".into()],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(out.stdout, b"a b|$HOME|");
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_is_forwarded_with_eof() {
        let (server, _agent, _) = link(config(true)).await;
        let (mut stream, _) = open(
            &server,
            Exec {
                stdin: true,
                ..shell("wc -c")
            },
        )
        .await
        .unwrap();
        let h = stream.handle();
        h.send_data(link::CH_STDIN, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        h.send_eof(link::CH_STDIN).await.unwrap();
        let out = within("the exit", collect(&mut stream)).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ten_mebibytes_of_stdin_arrive_intact() {
        let (server, _agent, _) = link(config(true)).await;
        let data = Bytes::from(pseudo_random(10 << 20));
        let want = ring::digest::digest(&ring::digest::SHA256, &data);
        let want: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();

        let (mut stream, _) = open(
            &server,
            Exec {
                stdin: true,
                ..shell("sha256sum")
            },
        )
        .await
        .unwrap();
        let h = stream.handle();
        let sender = tokio::spawn({
            let data = data.clone();
            async move {
                h.send_data(link::CH_STDIN, data).await.unwrap();
                h.send_eof(link::CH_STDIN).await.unwrap();
            }
        });
        let out = within("the exit", collect(&mut stream)).await;
        sender.await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next(),
            Some(want.as_str())
        );
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ten_mebibytes_round_trip_through_cat() {
        let (server, _agent, _) = link(config(true)).await;
        let data = Bytes::from(pseudo_random(10 << 20));
        let (mut stream, _) = open(
            &server,
            Exec {
                stdin: true,
                ..shell("cat")
            },
        )
        .await
        .unwrap();
        let h = stream.handle();
        let sender = tokio::spawn({
            let data = data.clone();
            async move {
                h.send_data(link::CH_STDIN, data).await.unwrap();
                h.send_eof(link::CH_STDIN).await.unwrap();
            }
        });
        let out = within("the exit", collect(&mut stream)).await;
        sender.await.unwrap();
        assert_eq!(out.stdout.len(), data.len());
        assert!(out.stdout == data[..], "output differs from input");
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_is_null_unless_asked_for() {
        let (server, _agent, _) = link(config(true)).await;
        // With /dev/null as stdin, `cat` ends at once instead of waiting for input.
        let out = run(&server, shell("cat; echo done")).await;
        assert_eq!(out.stdout, b"done\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_without_newline_is_forwarded_before_exit() {
        let (server, _agent, _) = link(config(true)).await;
        let (mut stream, _) = open(
            &server,
            Exec {
                stdin: true,
                ..shell("printf 'password: '; read x; echo \"got $x\"")
            },
        )
        .await
        .unwrap();
        // The process is blocked reading stdin, so this arrives only if the agent forwards partial lines at once.
        match within("the prompt", stream.next()).await {
            Some(Event::Data(d)) => {
                assert_eq!(d.channel(), link::CH_STDOUT);
                assert_eq!(&d.payload()[..], b"password: ");
                stream.consumed(d.len());
            }
            other => panic!("expected the prompt, got {other:?}"),
        }
        stream
            .handle()
            .send_data(link::CH_STDIN, Bytes::from_static(b"s3cret\n"))
            .await
            .unwrap();
        let out = within("the exit", collect(&mut stream)).await;
        assert_eq!(out.stdout, b"got s3cret\n");
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeout_kills_the_whole_group() {
        let (server, _agent, executor) = link(config(true)).await;
        let m = marker();
        // Everything ignores SIGTERM, so only the SIGKILL after kill_grace ends it.
        let cmd = format!("trap '' TERM HUP; sleep {m} & sleep {m}; echo never");
        let (mut stream, _) = open(
            &server,
            Exec {
                timeout_ms: 1500,
                ..shell(&cmd)
            },
        )
        .await
        .unwrap();
        let collector = tokio::spawn(async move { collect(&mut stream).await });
        eventually("both sleeps run", || procs_with(&m).len() >= 2).await;
        assert!(
            !collector.is_finished(),
            "the command ended before the test saw its processes"
        );
        let out = within("the exit", collector).await.unwrap();
        let exit = out.exit.expect("exit");
        assert!(exit.timed_out);
        assert_eq!(exit.status, Some(exit::Status::Signal(9)));
        assert!(exit.message.contains("timeout"), "{}", exit.message);
        assert!(out.stdout.is_empty());
        eventually("no process with the marker survives", || {
            procs_with(&m).is_empty()
        })
        .await;
        eventually("the session slot is free", || executor.running() == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_ends_a_cooperative_command_on_timeout() {
        let (server, _agent, _) = link(config(true)).await;
        let m = marker();
        let out = run(
            &server,
            Exec {
                timeout_ms: 200,
                ..shell(&format!("sleep {m}"))
            },
        )
        .await;
        let exit = out.exit.expect("exit");
        assert!(exit.timed_out);
        assert!(
            matches!(exit.status, Some(exit::Status::Signal(_))),
            "{exit:?}"
        );
        eventually("the sleep is gone", || procs_with(&m).is_empty()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_kills_the_group() {
        let (server, _agent, executor) = link(config(true)).await;
        let m = marker();
        let (stream, _) = open(
            &server,
            shell(&format!("trap '' TERM HUP; sleep {m} & sleep {m}")),
        )
        .await
        .unwrap();
        eventually("both sleeps run", || procs_with(&m).len() >= 2).await;
        drop(stream); // sends Cancel
        eventually("no process with the marker survives", || {
            procs_with(&m).is_empty()
        })
        .await;
        eventually("the session slot is free", || executor.running() == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn link_loss_kills_the_group() {
        let (server, _agent, executor) = link(config(true)).await;
        let m = marker();
        let (_stream, _) = open(
            &server,
            Exec {
                stdin: true,
                ..shell(&format!("sleep {m} & sleep {m}"))
            },
        )
        .await
        .unwrap();
        eventually("both sleeps run", || procs_with(&m).len() >= 2).await;
        server.close(1001, "server shutting down");
        eventually("no process with the marker survives", || {
            procs_with(&m).is_empty()
        })
        .await;
        within("all sessions to end", executor.wait_idle()).await;
        assert_eq!(executor.running(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leftover_background_processes_are_killed_after_exit() {
        let (server, _agent, _) = link(config(true)).await;
        let m = marker();
        // The background sleep holds stdout open after the shell exits.
        let out = run(&server, shell(&format!("sleep {m} & echo started"))).await;
        assert_eq!(out.stdout, b"started\n");
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
        eventually("the background sleep is gone", || procs_with(&m).is_empty()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_disabled_is_rejected_with_the_fix() {
        let (server, _agent, _) = link(config(false)).await;
        match open(&server, shell("id")).await {
            Err(OpenError::Rejected { code, message }) => {
                assert_eq!(code, RejectCode::SessionsDisabled);
                assert!(
                    message.contains("set session_enabled: true in"),
                    "{message}"
                );
            }
            other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsupported_and_invalid_opens_are_rejected() {
        let (server, _agent, _) = link(config(true)).await;
        let reject = |r: Result<(Stream, Accept), OpenError>| match r {
            Err(OpenError::Rejected { code, message }) => (code, message),
            Ok(_) => panic!("accepted"),
            Err(e) => panic!("{e}"),
        };
        let (code, message) = reject(
            open(
                &server,
                Exec {
                    tty: true,
                    term: "xterm\n".into(),
                    ..shell("sh")
                },
            )
            .await,
        );
        assert_eq!(code, RejectCode::Invalid);
        assert!(message.contains("term must be"), "{message}");

        let (code, _) = reject(server.open(Open::default(), OPEN_TIMEOUT).await);
        assert_eq!(code, RejectCode::Unsupported);

        // No command at all is the node's shell (a console on pipes); it is
        // covered by the console tests.
        let (code, _) = reject(
            open(
                &server,
                Exec {
                    argv: vec!["ls".into()],
                    ..shell("ls")
                },
            )
            .await,
        );
        assert_eq!(code, RejectCode::Invalid);
        let (code, _) = reject(open(&server, shell("a\0b")).await);
        assert_eq!(code, RejectCode::Invalid);
        let (code, _) = reject(open(&server, shell(&"x".repeat(limits::MAX_COMMAND + 1))).await);
        assert_eq!(code, RejectCode::Invalid);

        let (code, message) = reject(
            open(
                &server,
                Exec {
                    argv: vec!["/nonexistent/program".into()],
                    ..Default::default()
                },
            )
            .await,
        );
        assert_eq!(code, RejectCode::SpawnFailed);
        assert!(message.contains("/nonexistent/program"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_sessions_is_enforced() {
        let mut c = config(true);
        c.max_sessions = 1;
        let (server, _agent, _) = link(c).await;
        let (mut first, _) = open(
            &server,
            Exec {
                stdin: true,
                ..shell("cat")
            },
        )
        .await
        .unwrap();
        match open(&server, shell("true")).await {
            Err(OpenError::Rejected { code, .. }) => assert_eq!(code, RejectCode::TooManySessions),
            other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
        }
        first.handle().send_eof(link::CH_STDIN).await.unwrap();
        assert_eq!(
            code(&within("the exit", collect(&mut first)).await),
            Some(exit::Status::Code(0))
        );
        // The slot is free again once the first process is reaped (the exit is sent after that).
        let out = run(&server, shell("echo again")).await;
        assert_eq!(out.stdout, b"again\n");
    }

    #[test]
    fn exit_messages() {
        let x = exit_message(Some(ExitStatus::from_raw(3 << 8)), None);
        assert_eq!(x.status, Some(exit::Status::Code(3)));
        assert!(!x.timed_out && x.message.is_empty());
        let x = exit_message(
            Some(ExitStatus::from_raw(15)),
            Some(Duration::from_secs(60)),
        );
        assert_eq!(x.status, Some(exit::Status::Signal(15)));
        assert!(x.timed_out);
        assert_eq!(x.message, "killed after the command timeout of 1m");
    }
}
