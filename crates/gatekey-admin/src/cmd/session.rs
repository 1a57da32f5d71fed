//! `session list`, `exec`, `connect`, `active` and `kill`.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use gatekey_proto::channel::{MetadataCommand, TerminalSize};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::cli::{self, ConnectArgs, Context, ExecArgs};
use crate::error::ClientError;
use crate::exit;
use crate::output::{self, OutputFormat};
use crate::stdio::{LineTracker, RawWriter};
use crate::stream::{
    self, ConsoleMode, ConsoleOptions, Ending, ExecOptions, StreamSession, TerminalInput,
};
use crate::terminal;

/// How long an interrupted session may take to close before the process
/// leaves anyway (e.g. stuck writing to a stdout nobody reads).
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// Connected agents with sessions enabled (all connected agents with `all`).
pub async fn list(ctx: &Context, all: bool) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    let agents: Vec<_> = client
        .list_agents(true)
        .await?
        .into_iter()
        .filter(|a| a.connected && (all || a.session_enabled))
        .collect();
    if let Some(text) = output::structured(ctx.output, &agents)? {
        cli::print(&text)?;
    } else if agents.is_empty() {
        cli::warn(if all {
            "no agent is connected"
        } else {
            "no connected agent has remote sessions enabled (see `gatekey-admin session list --all`)"
        });
    } else {
        cli::print(&output::agents_table(&agents, all))?;
    }
    Ok(exit::OK)
}

/// Runs a command on an agent with live output; the remote exit code
/// becomes ours. SIGINT/SIGTERM close the session (the control plane kills
/// the remote process group) and exit 130/143.
pub async fn exec(ctx: &Context, args: ExecArgs) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    // Forward stdin only when it is data (a pipe or file), as ssh does with
    // a command: a terminal's keystrokes are for us, not the remote command.
    let forward_stdin = !args.no_stdin && !std::io::stdin().is_terminal();
    let options = ExecOptions {
        command: args.command.join(" "),
        timeout: args.timeout,
        stdin: forward_stdin,
    };

    let interrupted = Interrupts::install()?;
    let session = tokio::select! {
        session = client.exec_stream(&args.agent, options) => session?,
        code = interrupted.wait() => return Ok(interrupted_exit(code, STOPPED)),
    };
    let stdin = forward_stdin.then(tokio::io::stdin);
    let result = session
        .run_until(
            stdin,
            RawWriter::stdout(),
            RawWriter::stderr(),
            interrupted.wait(),
        )
        .await;
    match result {
        Ok(status) => {
            if let Some(message) = stream::failure_message(&status) {
                cli::warn(&message);
            }
            Ok(stream::exit_code(&status))
        }
        Err(ClientError::Cancelled) => Ok(interrupted_exit(interrupted.code(), STOPPED)),
        Err(e) => Err(e),
    }
}

const STOPPED: &str = "the remote command was stopped";
const CLOSED: &str = "the console was closed";

fn interrupted_exit(code: i32, what: &str) -> i32 {
    let why = if code == exit::HANGUP {
        "hung up"
    } else {
        "interrupted"
    };
    cli::warn(&format!("{why}; {what}"));
    code
}

/// Opens a console on an agent. With a terminal on stdin and stdout (and
/// no `--notty`): the node's shell (or `-- CMD`) on a PTY, the local
/// terminal in raw mode with `~` escapes and window resizes. Otherwise on
/// pipes, as `session exec` streams. The exit code is the remote one;
/// 252 when the session was killed or taken over, 124 when the control
/// plane closed it for idleness or length.
pub async fn connect(ctx: &Context, args: ConnectArgs) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    let mode = args.mode();
    let tty = !args.notty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let interrupted = Interrupts::install()?;
    // Watching before the size is read, so no change is missed.
    let resizes = if tty {
        let winch = signal(SignalKind::window_change())
            .map_err(|e| ClientError::io("cannot watch the window size", e))?;
        Some(winch)
    } else {
        None
    };
    let size = if tty { local_window_size() } else { None };
    let options = ConsoleOptions {
        tty,
        term: tty.then(|| terminal::term_name(std::env::var("TERM").ok().as_deref())),
        command: console_command(&args.command),
        size,
        mode,
        force: args.force,
    };
    let session = tokio::select! {
        session = client.console(&args.agent, options) => session?,
        code = interrupted.wait() => return Ok(interrupted_exit(code, CLOSED)),
    };
    say(&connected_line(&args.agent, mode, tty));
    let (result, at_line_start) = match resizes {
        Some(winch) => run_tty(session, winch, size, &interrupted).await,
        None => run_pipes(session, mode, &interrupted).await,
    };
    // The terminal is back as it was by now, whatever happened.
    say(&format!(
        "{}Disconnecting...",
        if at_line_start { "" } else { "\n" }
    ));
    match result {
        Ok(Ending::Status(status)) => {
            if let Some(message) = stream::failure_message(&status) {
                cli::warn(&message);
            }
            Ok(stream::exit_code(&status))
        }
        Ok(Ending::Disconnected) => Ok(exit::OK),
        Err(ClientError::Cancelled) => Ok(interrupted_exit(interrupted.code(), CLOSED)),
        Err(e) => Err(e),
    }
}

/// `-- CMD ARGS…` as the metadata's command; none runs the node's shell.
fn console_command(words: &[String]) -> Option<MetadataCommand> {
    let (command, args) = words.split_first()?;
    Some(MetadataCommand {
        command: command.clone(),
        args: args.to_vec(),
    })
}

/// The line printed once the console is open.
fn connected_line(agent: &str, mode: ConsoleMode, tty: bool) -> String {
    match (mode, tty) {
        (ConsoleMode::Observe, true) => {
            format!("Connected to {agent} (observing; input is ignored). Type '~.' to disconnect.")
        }
        (ConsoleMode::Observe, false) => {
            format!("Connected to {agent} (observing). Interrupt (Ctrl-C) to disconnect.")
        }
        _ => format!("Connected to {agent}. Type 'exit' to disconnect."),
    }
}

/// The local window size (of stdout's terminal, else stdin's).
fn local_window_size() -> Option<TerminalSize> {
    terminal::window_size(std::io::stdout().as_fd())
        .or_else(|| terminal::window_size(std::io::stdin().as_fd()))
}

/// A status line of ours on stderr, on a line of its own; "\r\n" line ends
/// while the terminal is raw. Best effort: the terminal may be gone.
fn say(text: &str) {
    let mut line = format!("{text}\n").into_bytes();
    if terminal::is_raw() {
        line = terminal::crlf(&line);
    }
    let _ = std::io::stderr().write_all(&line);
}

/// The terminal side of `connect`: raw mode for exactly as long as the
/// session runs (the guard, the panic hook and the signal handlers all
/// restore it), SIGWINCH forwarded as resizes. Also returns whether the
/// output ended at the start of a line.
async fn run_tty(
    session: StreamSession,
    mut winch: Signal,
    size: Option<TerminalSize>,
    interrupted: &Interrupts,
) -> (Result<Ending, ClientError>, bool) {
    terminal::install_panic_hook();
    let raw = match terminal::RawMode::enter(std::io::stdin().as_fd()) {
        Ok(raw) => raw,
        Err(e) => {
            return (
                Err(ClientError::io("cannot put the terminal in raw mode", e)),
                true,
            );
        }
    };
    let (sizes, resizes) = watch::channel(size.unwrap_or(TerminalSize {
        width: 0,
        height: 0,
    }));
    let watcher = tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(now) = local_window_size() {
                sizes.send_if_modified(|last| std::mem::replace(last, now) != now);
            }
        }
    });
    // Read on the event loop; should the terminal not support it, through
    // a blocking thread as for pipes.
    let keys: Box<dyn tokio::io::AsyncRead + Unpin> =
        match terminal::TtyReader::new(std::io::stdin().as_fd()) {
            Ok(reader) => Box::new(reader),
            Err(_) => Box::new(tokio::io::stdin()),
        };
    let mut stdout = LineTracker::new(RawWriter::stdout());
    let stderr = stdout.alongside(RawWriter::stderr());
    let input = TerminalInput {
        keys,
        resizes: Some(resizes),
        escapes: true,
        help: stdout.alongside(RawWriter::stderr()),
        restore_terminal: true,
    };
    let result = session
        .run_terminal(input, &mut stdout, stderr, interrupted.wait())
        .await;
    watcher.abort();
    drop(raw);
    (result, stdout.at_line_start())
}

/// The pipes side of `connect`: stdin forwarded until end-of-file (not for
/// an observer), stdout and stderr apart.
async fn run_pipes(
    session: StreamSession,
    mode: ConsoleMode,
    interrupted: &Interrupts,
) -> (Result<Ending, ClientError>, bool) {
    let stdin = (mode != ConsoleMode::Observe).then(tokio::io::stdin);
    let mut stdout = LineTracker::new(RawWriter::stdout());
    let stderr = stdout.alongside(RawWriter::stderr());
    let result = session
        .run_until(stdin, &mut stdout, stderr, interrupted.wait())
        .await
        .map(Ending::Status);
    // Only a terminal has a cursor to put back at a line start.
    let at_line_start = stdout.at_line_start() || !std::io::stdout().is_terminal();
    (result, at_line_start)
}

/// Live exec and console sessions.
pub async fn active(ctx: &Context) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    let sessions = client.list_sessions().await?;
    if let Some(text) = output::structured(ctx.output, &sessions)? {
        cli::print(&text)?;
    } else if sessions.is_empty() {
        cli::warn("no active session");
    } else {
        cli::print(&output::sessions_table(&sessions))?;
    }
    Ok(exit::OK)
}

/// Ends a live session for everyone in it.
pub async fn kill(ctx: &Context, id: &str) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    client.kill_session(id).await?;
    if ctx.output == OutputFormat::Table {
        cli::print(&format!("Session {id} killed.\n"))?;
    }
    Ok(exit::OK)
}

/// SIGINT/SIGTERM/SIGHUP watcher: restores the terminal at once (if raw),
/// records 130, 143 or 129 and, should the session not wind down within
/// [`INTERRUPT_GRACE`], ends the process itself.
struct Interrupts {
    rx: watch::Receiver<i32>,
    code: Arc<AtomicI32>,
    task: tokio::task::JoinHandle<()>,
}

impl Interrupts {
    fn install() -> Result<Interrupts, ClientError> {
        let err = |e| ClientError::io("cannot install signal handlers", e);
        let mut sigint = signal(SignalKind::interrupt()).map_err(err)?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(err)?;
        let mut sighup = signal(SignalKind::hangup()).map_err(err)?;
        let (tx, rx) = watch::channel(0);
        let code = Arc::new(AtomicI32::new(0));
        let recorded = code.clone();
        let task = tokio::spawn(async move {
            let got = tokio::select! {
                _ = sigint.recv() => exit::INTERRUPTED,
                _ = sigterm.recv() => exit::TERMINATED,
                _ = sighup.recv() => exit::HANGUP,
            };
            // First the terminal: whatever comes next, the user's shell
            // gets it back as it was.
            terminal::restore();
            recorded.store(got, Ordering::SeqCst);
            let _ = tx.send(got);
            tokio::time::sleep(INTERRUPT_GRACE).await;
            terminal::restore();
            cli::warn("interrupted");
            std::process::exit(got);
        });
        Ok(Interrupts { rx, code, task })
    }

    /// Completes with the exit code once a signal arrived.
    fn wait(&self) -> impl Future<Output = i32> + 'static {
        let mut rx = self.rx.clone();
        async move {
            match rx.wait_for(|c| *c != 0).await {
                Ok(code) => *code,
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// The recorded exit code (130 if asked before any signal).
    fn code(&self) -> i32 {
        match self.code.load(Ordering::SeqCst) {
            0 => exit::INTERRUPTED,
            c => c,
        }
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_lines() {
        assert_eq!(
            connected_line("hub-1", ConsoleMode::Exclusive, true),
            "Connected to hub-1. Type 'exit' to disconnect."
        );
        assert_eq!(
            connected_line("hub-1", ConsoleMode::Share, false),
            "Connected to hub-1. Type 'exit' to disconnect."
        );
        assert!(connected_line("hub-1", ConsoleMode::Observe, true).contains("~."));
        assert!(
            connected_line("hub-1", ConsoleMode::Observe, true).starts_with("Connected to hub-1")
        );
    }

    #[test]
    fn console_commands() {
        assert_eq!(console_command(&[]), None);
        let words = ["top".to_string(), "-d".into(), "1".into()];
        assert_eq!(
            console_command(&words),
            Some(MetadataCommand {
                command: "top".into(),
                args: vec!["-d".into(), "1".into()],
            })
        );
    }
}
