//! `gatekey-admin session connect` driven like a user drives it: in a real
//! terminal (tmux), with keystrokes and screen captures. Checks the prompt,
//! window resizes, Ctrl-C, the exit code, the `~.` escape and that the local
//! terminal is left exactly as it was.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gatekey::testkit::Cluster;

use common::bins;

struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// A detached tmux server with one 100x30 window running a plain shell
    /// whose environment points `gatekey-admin` at the cluster (set by typing
    /// it: tmux's `-e` does not reach the shell everywhere).
    fn start(c: &Cluster, dir: &Path) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("SKIP: tmux is not installed (scripts/setup.sh installs it)");
            return None;
        }
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let admin_dir = c.bins.admin.parent().unwrap().display().to_string();
        let path = format!("{admin_dir}:{}", std::env::var("PATH").unwrap_or_default());
        let out = t.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            "/bin/sh",
        ]);
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
        // dash gives root its own prompt whatever the environment says.
        t.line(&format!(
            "export PATH='{path}' GATEKEY_SERVER='{}' GATEKEY_API_KEY='{}' GATEKEY_CA_CERT='{}' HOME='{}'; PS1='local$ '; clear",
            c.url,
            c.admin_key,
            c.ca_cert.display(),
            dir.join("home").display()
        ));
        t.wait_for("local$", Duration::from_secs(10));
        Some(t)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux")
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Types `text` literally, then Enter.
    fn line(&self, text: &str) {
        assert!(
            self.run(&["send-keys", "-t", "t", "-l", text])
                .status
                .success()
        );
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(
            &self
                .run(&["capture-pane", "-p", "-t", "t", "-S", "-200"])
                .stdout,
        )
        .into_owned()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.screen().matches(needle).count()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn connect_in_a_real_terminal() {
    let c = Cluster::start(&bins());
    let (_, _agent) = c.agent("mesh hub", "hub-1", true);
    let Some(t) = Tmux::start(&c, &c.dir) else {
        return;
    };
    let before = c.dir.join("stty-before");
    let after = c.dir.join("stty-after");
    t.line(&format!("stty -a > {}", before.display()));

    t.line("gatekey-admin session connect hub-1");
    t.wait_for(
        "Connected to hub-1. Type 'exit' to disconnect.",
        Duration::from_secs(15),
    );
    t.line("echo remote-$((6*7))");
    t.wait_for("remote-42", Duration::from_secs(10));

    // The window size follows the local terminal, now and after a resize.
    t.line("stty size");
    t.wait_for("30 100", Duration::from_secs(10));
    assert!(
        t.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    t.line("stty size");
    t.wait_for("40 120", Duration::from_secs(10));

    // Ctrl-C reaches the remote foreground process, not the CLI.
    t.line("sleep 100");
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["C-c"]);
    t.line("echo after-$((1+1))");
    t.wait_for("after-2", Duration::from_secs(10));

    // The remote exit code is the CLI's.
    t.line("exit 7");
    t.wait_for("Disconnecting...", Duration::from_secs(10));
    t.line("echo local-code=$?");
    t.wait_for("local-code=7", Duration::from_secs(10));

    // `~.` after a newline disconnects.
    t.line("gatekey-admin session connect hub-1");
    let connected = "Connected to hub-1. Type 'exit' to disconnect.";
    let deadline = Instant::now() + Duration::from_secs(15);
    while t.count(connected) < 2 {
        assert!(
            Instant::now() < deadline,
            "second connect failed:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["Enter"]);
    t.run(&["send-keys", "-t", "t", "-l", "~."]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.count("Disconnecting...") < 2 {
        assert!(
            Instant::now() < deadline,
            "~. did not disconnect:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The local terminal is exactly as it was.
    t.line(&format!(
        "stty -a > {}; echo saved-$((2+2))",
        after.display()
    ));
    t.wait_for("saved-4", Duration::from_secs(10));
    let (b, a) = (
        std::fs::read_to_string(&before).unwrap(),
        std::fs::read_to_string(&after).unwrap(),
    );
    // The window size changed on purpose; every mode flag must match.
    let modes = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(modes(&b), modes(&a), "terminal modes changed");
}
