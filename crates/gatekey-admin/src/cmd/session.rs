//! `session list` and `session exec`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::cli::{self, Context, ExecArgs};
use crate::error::ClientError;
use crate::exit;
use crate::output;
use crate::stdio::RawWriter;
use crate::stream::{self, ExecOptions};

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
        code = interrupted.wait() => return Ok(interrupted_exit(code)),
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
        Err(ClientError::Cancelled) => Ok(interrupted_exit(interrupted.code())),
        Err(e) => Err(e),
    }
}

fn interrupted_exit(code: i32) -> i32 {
    cli::warn("interrupted; the remote command was stopped");
    code
}

/// SIGINT/SIGTERM watcher: records 130 or 143 and, should the session not
/// wind down within [`INTERRUPT_GRACE`], ends the process itself.
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
        let (tx, rx) = watch::channel(0);
        let code = Arc::new(AtomicI32::new(0));
        let recorded = code.clone();
        let task = tokio::spawn(async move {
            let got = tokio::select! {
                _ = sigint.recv() => exit::INTERRUPTED,
                _ = sigterm.recv() => exit::TERMINATED,
            };
            recorded.store(got, Ordering::SeqCst);
            let _ = tx.send(got);
            tokio::time::sleep(INTERRUPT_GRACE).await;
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
