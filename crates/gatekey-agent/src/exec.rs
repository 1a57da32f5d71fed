//! Serving exec streams: each stream the control plane opens runs one process
//! in its own process group, with stdout and stderr forwarded on the stream
//! and stdin fed from it.
//!
//! Invariants:
//! - Bytes are never dropped and never buffered without bound: output is read
//!   from a pipe only once the previous frame has been given credit, and stdin
//!   credit is returned only once the bytes are in the child's pipe.
//! - No process outlives its session, on any path (normal exit, timeout,
//!   cancel, link loss, agent shutdown): the whole process group is killed and
//!   the child reaped. A guard kills the group even if the session task is
//!   aborted or panics.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use gatekey_proto::link::{self, Exec, Exit, Open, RejectCode, exit, open};
use gatekey_proto::mux::{Event, Incoming, Stream, StreamHandle};
use gatekey_proto::{duration, limits, names};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

use crate::config::Config;

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

    /// Decides whether to run the stream, and what.
    fn plan(&self, open: &Open) -> Result<Plan, (RejectCode, String)> {
        if !self.config.session_enabled {
            return Err((
                RejectCode::SessionsDisabled,
                format!(
                    "remote sessions are disabled on this node: set session_enabled: true in {} and restart the agent",
                    self.config.file_display()
                ),
            ));
        }
        let exec = match &open.kind {
            Some(open::Kind::Exec(exec)) => exec,
            None => {
                return Err((
                    RejectCode::Unsupported,
                    format!(
                        "this agent (version {}) cannot serve this kind of stream",
                        gatekey_proto::VERSION
                    ),
                ));
            }
        };
        if exec.tty {
            return Err((
                RejectCode::Unsupported,
                "interactive consoles are not supported by this agent version".into(),
            ));
        }
        Plan::new(exec, &self.config.shell).map_err(|m| (RejectCode::Invalid, m))
    }
}

/// What to run.
struct Plan {
    program: String,
    args: Vec<String>,
    /// For logs and messages.
    display: String,
    stdin: bool,
    timeout_ms: u32,
}

impl Plan {
    fn new(exec: &Exec, shell: &Path) -> Result<Plan, String> {
        match (exec.shell_command.is_empty(), exec.argv.is_empty()) {
            (false, true) => {
                names::validate_command(&exec.shell_command)?;
                Ok(Plan {
                    program: shell.display().to_string(),
                    args: vec!["-c".into(), exec.shell_command.clone()],
                    display: exec.shell_command.clone(),
                    stdin: exec.stdin,
                    timeout_ms: exec.timeout_ms,
                })
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
                Ok(Plan {
                    program: exec.argv[0].clone(),
                    args: exec.argv[1..].to_vec(),
                    display: exec.argv.join(" "),
                    stdin: exec.stdin,
                    timeout_ms: exec.timeout_ms,
                })
            }
            (true, true) => Err("no command given: set shell_command or argv".into()),
            (false, false) => Err("both shell_command and argv are set: set exactly one".into()),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
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
            .kill_on_drop(true);
        cmd
    }
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

impl Session {
    async fn run(self, mut stream: Stream) {
        let id = self.id;
        let started = Instant::now();
        let mut child = match self.plan.command().spawn() {
            Ok(child) => child,
            Err(e) => {
                let message = format!("cannot start {:?}: {e}", self.plan.program);
                warn!(stream = id, "session for {}: {message}", self.user);
                stream.reject(RejectCode::SpawnFailed, &message).await;
                return;
            }
        };
        let Some(pid) = child.id() else {
            // Unreachable in practice: the child has not been waited for yet.
            stream
                .reject(
                    RejectCode::SpawnFailed,
                    "the process vanished right after starting",
                )
                .await;
            return;
        };
        let mut group = Group {
            pgid: Pid::from_raw(pid as i32),
            armed: true,
        };
        info!(
            stream = id,
            pid,
            "session for {}: running {:?}",
            self.user,
            truncate(&self.plan.display, 200)
        );

        if stream.accept(pid).await.is_err() {
            terminate(
                &mut child,
                &mut group,
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

        // Output: one pump per pipe. They stop reading when `stop` is set and
        // no more output is immediately available.
        let handle = stream.handle();
        let max_frame = match self.open.max_frame {
            0 => handle.max_frame(),
            n => handle.max_frame().min(n as usize),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Some(p) = &child.stdout {
            widen_pipe(p);
        }
        if let Some(p) = &child.stderr {
            widen_pipe(p);
        }
        if let Some(p) = &child.stdin {
            widen_pipe(p);
        }
        let stdout = child.stdout.take().map(|p| {
            tokio::spawn(pump(
                p,
                handle.clone(),
                link::CH_STDOUT,
                max_frame,
                stop_rx.clone(),
            ))
        });
        let stderr = child
            .stderr
            .take()
            .map(|p| tokio::spawn(pump(p, handle.clone(), link::CH_STDERR, max_frame, stop_rx)));
        let pumps: Vec<JoinHandle<()>> = stdout.into_iter().chain(stderr).collect();
        let _abort_pumps: Vec<AbortOnDrop> = pumps
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
        let (input_tx, input_rx) = mpsc::unbounded_channel();
        let (written_tx, mut written_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_stdin(child.stdin.take(), input_rx, written_tx));
        let _abort_writer = AbortOnDrop(writer.abort_handle());

        let timeout = match self.plan.timeout_ms {
            0 => self.config.command_timeout,
            ms => Duration::from_millis(ms.into()),
        };
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
                        Some(Event::Cancelled(reason)) => break Outcome::Abandoned(format!("cancelled by the control plane: {reason}")),
                        Some(Event::LinkClosed(reason)) => break Outcome::Abandoned(format!("link to the control plane lost: {reason}")),
                        None => break Outcome::Abandoned("stream closed".into()),
                        // Resize (no terminal yet), Eof on other channels, opener-only events.
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
                let status = terminate(
                    &mut child,
                    &mut group,
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
                    &mut group,
                    &[Signal::SIGTERM],
                    self.config.kill_grace,
                )
                .await;
                let _ = stop_tx.send(true);
                (status, Some(after))
            }
            Outcome::Exited(status) => {
                // Leftover background processes may still hold the pipes open:
                // give them a moment to finish writing, then kill them.
                let drain = self.config.exit_drain_timeout;
                let abandoned = tokio::select! {
                    () = &mut pumps_done => {
                        pumps_finished = true;
                        None
                    }
                    () = tokio::time::sleep(drain) => None,
                    reason = final_event(&mut stream) => Some(reason),
                };
                group.kill();
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

/// Stops the process group: `first` signals, then SIGKILL after `grace` if
/// the process has not exited, then SIGKILL for any leftovers. Reaps the child.
async fn terminate(
    child: &mut Child,
    group: &mut Group,
    first: &[Signal],
    grace: Duration,
) -> Option<ExitStatus> {
    for &sig in first {
        group.signal(sig);
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(r) => r.ok(),
        Err(_) => {
            group.kill();
            child.wait().await.ok()
        }
    };
    group.kill();
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
    mut stdin: Option<ChildStdin>,
    mut input: mpsc::UnboundedReceiver<Input>,
    written: mpsc::UnboundedSender<usize>,
) {
    while let Some(item) = input.recv().await {
        match item {
            Input::Data(data) => {
                if let Some(pipe) = stdin.as_mut()
                    && let Err(e) = pipe.write_all(&data).await
                {
                    // EPIPE: the process closed its stdin. Later input is discarded.
                    debug!("writing to the process's stdin failed: {e}");
                    stdin = None;
                }
                let _ = written.send(data.len());
            }
            Input::Eof => {
                if let Some(mut pipe) = stdin.take() {
                    let _ = pipe.shutdown().await;
                }
            }
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
    use gatekey_proto::link::Accept;
    use gatekey_proto::mux::{Mux, MuxConfig, OpenError, Side};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

    fn config(session_enabled: bool) -> Config {
        let mut c = Config::new("node-1", "https://cp.example", "hub_test").unwrap();
        c.session_enabled = session_enabled;
        c.kill_grace = Duration::from_millis(300);
        c.exit_drain_timeout = Duration::from_millis(300);
        c
    }

    /// A real link over an in-memory pipe: the test holds the opener (the
    /// control plane's side), the executor serves the acceptor side.
    async fn link(config: Config) -> (Mux, Mux, Arc<Executor>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (agent_ws, server_ws) = tokio::join!(
            WebSocketStream::from_raw_socket(a, Role::Client, None),
            WebSocketStream::from_raw_socket(b, Role::Server, None)
        );
        let (server, _) = Mux::start(server_ws, MuxConfig::default(), Side::Opener);
        let (agent, incoming) = Mux::start(agent_ws, MuxConfig::default(), Side::Acceptor);
        let executor = Arc::new(Executor::new(Arc::new(config)));
        let e = executor.clone();
        tokio::spawn(async move { e.serve(incoming.expect("acceptor queue")).await });
        (server, agent, executor)
    }

    fn shell(cmd: &str) -> Exec {
        Exec {
            shell_command: cmd.into(),
            ..Default::default()
        }
    }

    async fn open(server: &Mux, exec: Exec) -> Result<(Stream, Accept), OpenError> {
        let open = Open {
            user: "tester".into(),
            kind: Some(open::Kind::Exec(exec)),
            ..Default::default()
        };
        server.open(open, OPEN_TIMEOUT).await
    }

    #[derive(Debug, Default)]
    struct Output {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        eofs: Vec<u8>,
        exit: Option<Exit>,
    }

    /// Reads a stream to its end, granting credit as bytes arrive.
    async fn collect(stream: &mut Stream) -> Output {
        let mut out = Output::default();
        while let Some(ev) = stream.next().await {
            match ev {
                Event::Data(d) => {
                    match d.channel() {
                        link::CH_STDOUT => out.stdout.extend_from_slice(&d.payload()),
                        link::CH_STDERR => out.stderr.extend_from_slice(&d.payload()),
                        other => panic!("data on channel {other}"),
                    }
                    stream.consumed(d.len());
                }
                Event::Eof(ch) => out.eofs.push(ch),
                Event::Exit(x) => {
                    out.exit = Some(x);
                    break;
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        out
    }

    async fn run(server: &Mux, exec: Exec) -> Output {
        let (mut stream, _) = open(server, exec).await.expect("accepted");
        within("the exit", collect(&mut stream)).await
    }

    fn code(out: &Output) -> Option<exit::Status> {
        out.exit.as_ref().expect("an exit").status
    }

    /// Processes whose command line contains `marker` (zombies have none).
    fn procs_with(marker: &str) -> Vec<i32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
                && cmdline
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
            {
                found.push(pid);
            }
        }
        found
    }

    /// Polls until `cond` holds, failing after a generous deadline.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails instead of hanging when the agent does not finish something.
    async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    /// A unique `sleep` duration: it shows in /proc as the marker of that test's processes.
    fn marker() -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "{}.{}{:04}",
            900_000 + std::process::id() % 1000,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

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
                    ..shell("sh")
                },
            )
            .await,
        );
        assert_eq!(code, RejectCode::Unsupported);
        assert_eq!(
            message,
            "interactive consoles are not supported by this agent version"
        );

        let (code, _) = reject(server.open(Open::default(), OPEN_TIMEOUT).await);
        assert_eq!(code, RejectCode::Unsupported);

        let (code, _) = reject(open(&server, Exec::default()).await);
        assert_eq!(code, RejectCode::Invalid);
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
