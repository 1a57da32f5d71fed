//! Consoles (`Exec.tty`) end to end through the executor: real
//! pseudo-terminals, real shells, a real agent link with the test as the
//! control plane.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use gatekey_proto::limits;
use gatekey_proto::link::{self, Exec, Exit, RejectCode, exit};
use gatekey_proto::mux::{Event, MuxConfig, OpenError, Stream};

use crate::config::Config;
use crate::test_support::*;

/// Agent settings for console tests: /bin/sh as the shell, whatever the
/// account running the tests has.
fn console_config() -> Config {
    let mut c = config(true);
    c.console_shell = Some(PathBuf::from("/bin/sh"));
    c
}

/// An interactive shell on an 80x24 terminal.
fn tty() -> Exec {
    Exec {
        tty: true,
        stdin: true,
        cols: 80,
        rows: 24,
        ..Default::default()
    }
}

/// The test's side of a console: what it printed so far, and a cursor
/// after the last thing found in it.
struct Console {
    stream: Stream,
    out: Vec<u8>,
    seen: usize,
}

impl Console {
    async fn open(server: &gatekey_proto::mux::Mux, exec: Exec) -> Console {
        let (stream, _) = open(server, exec).await.expect("console accepted");
        Console {
            stream,
            out: Vec::new(),
            seen: 0,
        }
    }

    async fn send(&self, text: &str) {
        self.stream
            .handle()
            .send_data(link::CH_STDIN, Bytes::copy_from_slice(text.as_bytes()))
            .await
            .unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    /// Reads output (granting credit) until `want` appears after the last
    /// thing found.
    async fn expect(&mut self, want: &str) {
        let found = within(&format!("{want:?} in the console's output"), async {
            loop {
                if let Some(i) = find(&self.out[self.seen..], want.as_bytes()) {
                    return Some(self.seen + i + want.len());
                }
                match self.stream.next().await {
                    Some(Event::Data(d)) => {
                        assert_eq!(d.channel(), link::CH_STDOUT);
                        self.out.extend_from_slice(&d.payload());
                        self.stream.consumed(d.len());
                    }
                    Some(Event::Eof(_)) => {}
                    _ => return None,
                }
            }
        })
        .await;
        match found {
            Some(end) => self.seen = end,
            None => panic!("console ended before {want:?}; output {:?}", self.text()),
        }
    }

    /// Reads to the end: the exit.
    async fn finish(&mut self) -> Exit {
        within("the console's exit", async {
            loop {
                match self.stream.next().await {
                    Some(Event::Data(d)) => {
                        self.out.extend_from_slice(&d.payload());
                        self.stream.consumed(d.len());
                    }
                    Some(Event::Eof(ch)) => assert_eq!(ch, link::CH_STDOUT),
                    Some(Event::Exit(x)) => return x,
                    other => panic!("unexpected {other:?}; output {:?}", self.text()),
                }
            }
        })
        .await
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// State letter of a process (R, S, T, Z…).
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_runs_commands_and_reports_its_exit_code() {
    let (server, _agent, executor) = link(console_config()).await;
    let mut con = Console::open(&server, tty()).await;
    con.send("echo $((6*7))\n").await;
    con.expect("42").await;
    con.send("exit 7\n").await;
    let exit = con.finish().await;
    assert_eq!(exit.status, Some(exit::Status::Code(7)));
    assert!(!exit.timed_out);
    eventually("the session slot is free", || executor.running() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_size_starts_as_asked_and_follows_resizes() {
    let (server, _agent, _) = link(console_config()).await;
    let mut con = Console::open(&server, tty()).await;
    con.send("stty size\n").await;
    con.expect("24 80").await;
    let h = con.stream.handle();
    h.send_resize(100, 30).await.unwrap();
    con.send("stty size\n").await;
    con.expect("30 100").await;
    // A side of 0 is ignored; huge sizes are clamped.
    h.send_resize(0, 50).await.unwrap();
    con.send("stty size\n").await;
    con.expect("30 100").await;
    h.send_resize(u32::MAX, 2).await.unwrap();
    con.send("stty size\n").await;
    con.expect("2 1000").await;
    con.send("exit\n").await;
    con.finish().await;

    // The kernel tells the foreground process group (SIGWINCH). The loop
    // gives the shell a moment between commands to run its trap.
    let mut con = Console::open(
        &server,
        Exec {
            shell_command: "trap 'echo winched' WINCH; echo ready; while :; do sleep 0.05; done"
                .into(),
            ..tty()
        },
    )
    .await;
    con.expect("ready").await;
    con.stream.handle().send_resize(81, 25).await.unwrap();
    con.expect("winched").await;
    drop(con);

    // 0 means the default size, and the initial size is clamped too.
    for (cols, rows, want) in [(0, 0, "24 80"), (100_000, 3, "3 1000")] {
        let out = run(
            &server,
            Exec {
                argv: vec!["stty".into(), "size".into()],
                cols,
                rows,
                ..tty()
            },
        )
        .await;
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(want),
            "{:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(code(&out), Some(exit::Status::Code(0)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_without_newline_is_seen_at_once() {
    let (server, _agent, _) = link(console_config()).await;
    let mut con = Console::open(
        &server,
        Exec {
            shell_command: "printf 'password: '; read x; echo \"got $x\"".into(),
            ..tty()
        },
    )
    .await;
    // The process is blocked reading the terminal, so this shows only if
    // the agent forwards partial lines at once.
    match within("the prompt", con.stream.next()).await {
        Some(Event::Data(d)) => {
            assert_eq!(&d.payload()[..], b"password: ");
            con.stream.consumed(d.len());
        }
        other => panic!("expected the prompt, got {other:?}"),
    }
    con.send("s3cret\n").await;
    con.expect("got s3cret").await;
    let exit = con.finish().await;
    assert_eq!(exit.status, Some(exit::Status::Code(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_interrupts_the_foreground_job_and_the_shell_survives() {
    let (server, _agent, _) = link(console_config()).await;
    let m = marker();
    let mut con = Console::open(&server, tty()).await;
    con.send(&format!("sleep {m}\n")).await;
    eventually("the sleep runs", || !procs_with(&m).is_empty()).await;
    con.send("\x03").await;
    eventually("^C ended the sleep", || procs_with(&m).is_empty()).await;
    con.send("echo after-$((1+1))\n").await;
    con.expect("after-2").await;
    con.send("exit 3\n").await;
    assert_eq!(con.finish().await.status, Some(exit::Status::Code(3)));
}

/// Starts, from the console's shell: a background job (in a process group
/// of its own: job control); one that ignores SIGHUP and has a scrubbed
/// environment (found only by its session id); one that leaves the session
/// (found only by the console's id in its environment).
async fn start_jobs(con: &Console) -> Vec<String> {
    let marks = vec![marker(), marker(), marker()];
    con.send(&format!("sleep {} &\n", marks[0])).await;
    con.send(&format!(
        "env -i sh -c \"trap '' HUP; exec sleep {}\" &\n",
        marks[1]
    ))
    .await;
    con.send(&format!("setsid sleep {} &\n", marks[2])).await;
    for m in &marks {
        eventually("the job runs", || !procs_with(m).is_empty()).await;
    }
    marks
}

async fn all_gone(marks: &[String]) {
    for m in marks {
        eventually(&format!("no process with {m} survives"), || {
            procs_with(m).is_empty()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_every_job_of_the_console() {
    let (server, _agent, executor) = link(console_config()).await;
    let con = Console::open(&server, tty()).await;
    let marks = start_jobs(&con).await;
    let pid = procs_with(&marks[0])[0];
    // Job control: the background job is in a process group of its own.
    let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_eq!(pgid.as_raw(), pid);
    drop(con); // sends Cancel
    all_gone(&marks).await;
    eventually("the session slot is free", || executor.running() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_left_running_when_the_shell_exits_are_killed() {
    let (server, _agent, executor) = link(console_config()).await;
    let mut con = Console::open(&server, tty()).await;
    let marks = start_jobs(&con).await;
    con.send("exit 5\n").await;
    let exit = con.finish().await;
    assert_eq!(exit.status, Some(exit::Status::Code(5)));
    // The exit is sent once everything is dead.
    for m in &marks {
        assert!(procs_with(m).is_empty(), "{m} survived the console");
    }
    assert_eq!(executor.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_loss_kills_the_console() {
    let (server, _agent, executor) = link(console_config()).await;
    let con = Console::open(&server, tty()).await;
    let marks = start_jobs(&con).await;
    server.close(1001, "server shutting down");
    all_gone(&marks).await;
    within("all sessions to end", executor.wait_idle()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_holds_output_at_the_window() {
    let window = limits::MIN_WINDOW;
    let (server, _agent, _) = link_with(
        console_config(),
        MuxConfig {
            recv_window: window,
            ..MuxConfig::default()
        },
    )
    .await;
    let m = marker();
    let (mut stream, accept) = open(
        &server,
        Exec {
            argv: vec!["yes".into(), m.clone()],
            ..tty()
        },
    )
    .await
    .unwrap();
    // Take output without granting credit, until none comes for a while.
    let mut received = 0usize;
    while let Ok(ev) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        match ev {
            Some(Event::Data(d)) => received += d.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(received > 0 && received <= window as usize, "{received}");
    // `yes` is alive and blocked writing to its terminal, not being read into
    // a growing buffer.
    let pid = accept.pid as i32;
    eventually("yes blocks writing", || state(pid) == Some('S')).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(pid), Some('S'));
    assert!(stream.try_next().is_none(), "output beyond the window");

    // Credit lets it go on.
    stream.consumed(received);
    match within("more output", stream.next()).await {
        Some(Event::Data(d)) => assert!(!d.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    drop(stream);
    eventually("yes is gone", || procs_with(&m).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_eof_types_ctrl_d_which_ends_the_shell() {
    let (server, _agent, _) = link(console_config()).await;
    let mut con = Console::open(&server, tty()).await;
    con.send("echo re$((1))ady\n").await;
    con.expect("re1ady").await;
    con.stream.handle().send_eof(link::CH_STDIN).await.unwrap();
    assert_eq!(con.finish().await.status, Some(exit::Status::Code(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_timeout_is_none_unless_asked_for() {
    let mut c = console_config();
    // For commands only.
    c.command_timeout = Duration::from_millis(100);
    let (server, _agent, _) = link(c).await;
    let out = run(
        &server,
        Exec {
            shell_command: "sleep 0.5; echo done".into(),
            ..tty()
        },
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("done"));
    assert_eq!(code(&out), Some(exit::Status::Code(0)));

    let m = marker();
    let out = run(
        &server,
        Exec {
            shell_command: format!("sleep {m}"),
            timeout_ms: 300,
            ..tty()
        },
    )
    .await;
    let exit = out.exit.unwrap();
    assert!(exit.timed_out, "{exit:?}");
    assert!(
        matches!(exit.status, Some(exit::Status::Signal(_))),
        "{exit:?}"
    );
    assert!(procs_with(&m).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_shell_is_the_accounts_started_by_name_at_home() {
    let mut c = config(true);
    c.console_shell = None;
    let (server, _agent, _) = link(c).await;
    // What the agent should pick, from the same passwd entry.
    let user = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap();
    let shell = match &user {
        Some(u) if crate::exec::usable_shell(&u.shell) => {
            u.shell.file_name().unwrap().to_string_lossy().into_owned()
        }
        _ => "sh".into(),
    };
    let home = match &user {
        Some(u) if u.dir.is_dir() => u.dir.display().to_string(),
        _ => "/".into(),
    };
    let mut con = Console::open(
        &server,
        Exec {
            term: String::new(),
            ..tty()
        },
    )
    .await;
    con.send("echo \"<$0|$TERM|$(pwd)|${GATEKEY_CONSOLE_ID:+marked}>\"\n")
        .await;
    // Not `-bash`: an interactive shell, not a login.
    con.expect(&format!("<{shell}|xterm-256color|{home}|marked>"))
        .await;
    con.send("exit\n").await;
    con.finish().await;

    // `term` is passed on.
    let out = run(
        &server,
        Exec {
            shell_command: "echo \"[$TERM]\"".into(),
            term: "vt100".into(),
            ..tty()
        },
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("[vt100]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consoles_are_refused_and_counted_like_other_sessions() {
    let (server, _agent, _) = link(config(false)).await;
    match open(&server, tty()).await {
        Err(OpenError::Rejected { code, .. }) => assert_eq!(code, RejectCode::SessionsDisabled),
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }

    let mut c = console_config();
    c.max_sessions = 1;
    let (server, _agent, executor) = link(c).await;
    let con = Console::open(&server, tty()).await;
    for exec in [
        tty(),
        Exec {
            shell_command: "true".into(),
            ..Default::default()
        },
    ] {
        match open(&server, exec).await {
            Err(OpenError::Rejected { code, .. }) => {
                assert_eq!(code, RejectCode::TooManySessions)
            }
            other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
        }
    }
    drop(con);
    eventually("the session slot is free", || executor.running() == 0).await;
    let out = run(
        &server,
        Exec {
            argv: vec!["true".into()],
            ..tty()
        },
    )
    .await;
    assert_eq!(code(&out), Some(exit::Status::Code(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_that_cannot_start_is_rejected_naming_the_setting() {
    let mut c = console_config();
    c.console_shell = Some(PathBuf::from("/nonexistent/shell"));
    let (server, _agent, executor) = link(c).await;
    match open(&server, tty()).await {
        Err(OpenError::Rejected { code, message }) => {
            assert_eq!(code, RejectCode::SpawnFailed);
            assert!(
                message.contains("/nonexistent/shell") && message.contains("console_shell"),
                "{message}"
            );
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    eventually("the session slot is free", || executor.running() == 0).await;
}
