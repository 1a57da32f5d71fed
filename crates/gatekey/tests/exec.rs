//! `session exec` end to end: streams, exit codes, stdin, large transfers,
//! timeouts and cleanup on the node.

mod common;
use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn streams_exit_codes_and_signals() {
    let c = Cluster::start(&bins());
    let (node, _agent) = c.agent("mesh hub", "hub-1", true);

    let o = c.admin_run(&["session", "exec", "hub-1", "echo out; echo err >&2"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(stderr(&o), "err\n");

    assert_code(&c.admin_run(&["session", "exec", "hub-1", "exit 3"]), 3);
    // By id as well as by name; death by a signal is 128 + signal, as in shells.
    assert_code(
        &c.admin_run(&["session", "exec", &node.id, "kill -9 $$"]),
        137,
    );
    // Several words are joined like ssh does.
    let o = c.admin_run(&["session", "exec", "hub-1", "echo", "-n", "a", "b"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "a b");

    // stdin is forwarded when it is not a terminal, with its EOF.
    let mut child = c
        .admin()
        .args(["session", "exec", "hub-1", "tr a-z A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello gatekey\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "HELLO GATEKEY\n");
}

/// Output that has no newline is seen before the command ends.
#[test]
fn output_is_streamed_as_produced() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let mut child = c
        .admin()
        .args(["session", "exec", "hub-1", "printf ready; sleep 30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 5];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let r = out.read_exact(&mut buf).map(|_| buf);
        let _ = tx.send(r);
    });
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("partial line not streamed")
        .unwrap();
    assert_eq!(&got, b"ready");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn hundred_mib_each_way_arrive_intact() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    const SIZE: usize = 100 * 1024 * 1024;

    // stdout: random bytes from the node, checksummed there (on stderr) and here.
    let blob = c.dir.join("out.bin");
    let cmd = format!(
        "head -c {SIZE} /dev/urandom > {0} && cat {0} && sha256sum < {0} >&2",
        blob.display()
    );
    let o = c.admin_run(&["session", "exec", "hub-1", &cmd]);
    assert_code(&o, 0);
    assert_eq!(o.stdout.len(), SIZE);
    let remote_sum = stderr(&o)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let local_sum: String = sha256(&o.stdout)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(remote_sum, local_sum);

    // stdin: random bytes from here, checksummed on the node.
    let input: Vec<u8> = {
        let mut v = vec![0u8; SIZE];
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for chunk in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        v
    };
    let mut child = c
        .admin()
        .args(["session", "exec", "hub-1", "sha256sum; wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_code(&o, 0);
    let want: String = sha256(&input).iter().map(|b| format!("{b:02x}")).collect();
    let out = stdout(&o);
    assert!(out.starts_with(&want), "remote checksum {out} != {want}");
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let m = marker();
    let started = std::time::Instant::now();
    let o = c.admin_run(&[
        "session",
        "exec",
        "hub-1",
        "--timeout",
        "1s",
        &format!("sleep {m} & sleep {m}; echo never"),
    ]);
    assert_code(&o, 124);
    assert!(!stdout(&o).contains("never"));
    assert!(started.elapsed() < Duration::from_secs(20));
    wait_until(
        Duration::from_secs(10),
        "the timed-out processes to be gone",
        || processes_with(&m).is_empty(),
    );
}

#[test]
fn client_disconnect_kills_the_remote_command() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let m = marker();
    let mut child = c
        .admin()
        .args([
            "session",
            "exec",
            "hub-1",
            &format!("sleep {m} & sleep {m}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the remote command to start",
        || processes_with(&m).len() >= 2,
    );
    child.kill().unwrap();
    let _ = child.wait();
    wait_until(
        Duration::from_secs(10),
        "the remote command to be killed",
        || processes_with(&m).is_empty(),
    );
}

/// Stopping the agent ends its sessions' processes too.
#[test]
fn agent_shutdown_leaves_no_process_behind() {
    let c = Cluster::start(&bins());
    let (_, mut agent) = c.agent("mesh hub", "hub-1", true);
    let m = marker();
    let child = c
        .admin()
        .args(["session", "exec", "hub-1", &format!("sleep {m}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the remote command to start",
        || !processes_with(&m).is_empty(),
    );
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status:?}");
    wait_until(Duration::from_secs(10), "the command to be killed", || {
        processes_with(&m).is_empty()
    });
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 250);
}

/// A frame larger than the credit the receiver has left never stalls the
/// stream, even with the smallest window the control plane accepts.
#[test]
fn smallest_window_never_deadlocks() {
    let cfg =
        std::env::temp_dir().join(format!("gatekey-small-window-{}.yaml", std::process::id()));
    std::fs::write(&cfg, "stream_window: 65536\n").unwrap();
    let c = Cluster::start_with(&bins(), &["--config", cfg.to_str().unwrap()]);
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let cmd = "dd if=/dev/zero bs=65536 count=20 2>/dev/null; sleep .3; printf x; sleep .3; dd if=/dev/zero bs=65536 count=20 2>/dev/null";
    let o = c.admin_run(&["session", "exec", "hub-1", "--timeout", "30s", cmd]);
    assert_code(&o, 0);
    assert_eq!(o.stdout.len(), 2 * 20 * 65536 + 1);
    // And stdin the other way, through the same small window.
    let mut child = c
        .admin()
        .args(["session", "exec", "hub-1", "--timeout", "30s", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&vec![7u8; 3 << 20]));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_code(&o, 0);
    assert_eq!(stdout(&o).trim(), (3 << 20).to_string());
    let _ = std::fs::remove_file(cfg);
}

/// The exit status arrives even when the command ends while stdin is still
/// being sent (the stream's end races the client's input).
#[test]
fn exit_status_survives_unread_stdin() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    for _ in 0..10 {
        let mut yes = std::process::Command::new("yes")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let o = c
            .admin()
            .args(["session", "exec", "hub-1", "sleep 0.2; exit 3"])
            .stdin(yes.stdout.take().unwrap())
            .output()
            .unwrap();
        let _ = yes.kill();
        let _ = yes.wait();
        assert_code(&o, 3);
    }
}
