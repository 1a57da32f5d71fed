//! Helpers for the tests of sessions: a real agent-link over an in-memory
//! pipe, with the test as the control plane, and /proc inspection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gatekey_proto::link::{self, Accept, Exec, Exit, Open, exit, open};
use gatekey_proto::mux::{Event, Mux, MuxConfig, OpenError, Side, Stream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::config::Config;
use crate::exec::Executor;

pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn config(session_enabled: bool) -> Config {
    let mut c = Config::new("node-1", "https://cp.example", "hub_test").unwrap();
    c.session_enabled = session_enabled;
    c.kill_grace = Duration::from_millis(300);
    c.exit_drain_timeout = Duration::from_millis(300);
    c
}

/// A real link over an in-memory pipe: the test holds the opener (the
/// control plane's side), the executor serves the acceptor side.
pub(crate) async fn link(config: Config) -> (Mux, Mux, Arc<Executor>) {
    link_with(config, MuxConfig::default()).await
}

/// [`link`], with the control plane's side configured by `server`.
pub(crate) async fn link_with(config: Config, server: MuxConfig) -> (Mux, Mux, Arc<Executor>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (agent_ws, server_ws) = tokio::join!(
        WebSocketStream::from_raw_socket(a, Role::Client, None),
        WebSocketStream::from_raw_socket(b, Role::Server, None)
    );
    let (server, _) = Mux::start(server_ws, server, Side::Opener);
    let (agent, incoming) = Mux::start(agent_ws, MuxConfig::default(), Side::Acceptor);
    let executor = Arc::new(Executor::new(Arc::new(config)));
    let e = executor.clone();
    tokio::spawn(async move { e.serve(incoming.expect("acceptor queue")).await });
    (server, agent, executor)
}

pub(crate) fn shell(cmd: &str) -> Exec {
    Exec {
        shell_command: cmd.into(),
        ..Default::default()
    }
}

pub(crate) async fn open(server: &Mux, exec: Exec) -> Result<(Stream, Accept), OpenError> {
    let open = Open {
        user: "tester".into(),
        kind: Some(open::Kind::Exec(exec)),
        ..Default::default()
    };
    server.open(open, OPEN_TIMEOUT).await
}

#[derive(Debug, Default)]
pub(crate) struct Output {
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    pub(crate) eofs: Vec<u8>,
    pub(crate) exit: Option<Exit>,
}

/// Reads a stream to its end, granting credit as bytes arrive.
pub(crate) async fn collect(stream: &mut Stream) -> Output {
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

pub(crate) async fn run(server: &Mux, exec: Exec) -> Output {
    let (mut stream, _) = open(server, exec).await.expect("accepted");
    within("the exit", collect(&mut stream)).await
}

pub(crate) fn code(out: &Output) -> Option<exit::Status> {
    out.exit.as_ref().expect("an exit").status
}

/// Processes whose command line contains `marker` (zombies have none).
pub(crate) fn procs_with(marker: &str) -> Vec<i32> {
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
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails instead of hanging when the agent does not finish something.
pub(crate) async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A unique `sleep` duration: it shows in /proc as the marker of that test's processes.
pub(crate) fn marker() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}.{}{:04}",
        900_000 + std::process::id() % 1000,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
