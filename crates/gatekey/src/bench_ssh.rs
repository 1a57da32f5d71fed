//! OpenSSH beside gatekey in the same run: a throwaway sshd on a loopback
//! port with generated keys, and the ssh measurements the gatekey scenarios
//! compare themselves with (exec latency over a ControlMaster connection,
//! bulk stdout and stdin, keystroke echo in bench_echo.rs).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A throwaway sshd on a loopback port with generated keys; killed and its
/// directory removed on drop.
pub(crate) struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl Sshd {
    /// Starts sshd. A full run installs openssh-server when it is missing;
    /// smoke runs (CI) skip the comparison instead.
    pub(crate) fn start(smoke: bool) -> Result<Sshd, String> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() {
            if smoke {
                return Err("sshd is not installed (a full run installs openssh-server)".into());
            }
            install_openssh_server()?;
        }
        let dir = std::env::temp_dir().join(format!(
            "gatekey-bench-sshd-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for key in ["host", "client"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()
                .map_err(|e| format!("ssh-keygen: {e}"))?;
            if !st.success() {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))
            .map_err(|e| e.to_string())?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        };
        // Ciphers, MACs and key exchange are left at their defaults: the
        // comparison is with what ssh negotiates out of the box. HOME is the
        // throwaway directory so the login shell (bash, which sshd makes
        // read ~/.bashrc even for a command) skips the user's rc files: the
        // agent runs `/bin/sh -c` without any, and a .bashrc that starts
        // pyenv costs 150 ms per command on this machine, not OpenSSH's cost.
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\nSetEnv HOME={d}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).map_err(|e| e.to_string())?;
        std::fs::create_dir_all("/run/sshd").ok();
        let mut cmd = Command::new(sshd);
        cmd.args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stderr(Stdio::null());
        // A killed benchmark (a CI timeout) must not leave sshd listening.
        // SAFETY: prctl is async-signal-safe and touches no parent state.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|e| format!("sshd: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("sshd did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Sshd { dir, port, child })
    }

    /// `ssh` with the throwaway key and no host-key prompts; add the
    /// remote command.
    pub(crate) fn ssh(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-i")
            .arg(self.dir.join("client"))
            .args(["-p", &self.port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "BatchMode=yes",
            ]);
        cmd
    }

    /// `user@127.0.0.1`.
    pub(crate) fn target(&self) -> String {
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        format!("{user}@127.0.0.1")
    }

    /// The cipher ssh negotiates by default (from `ssh -v`).
    pub(crate) fn cipher(&self) -> String {
        let out = self
            .ssh()
            .args(["-v", "-o", "LogLevel=DEBUG1"])
            .arg(self.target())
            .arg("true")
            .stdin(Stdio::null())
            .output();
        let Ok(out) = out else {
            return "unknown".into();
        };
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find_map(|l| l.split("kex: server->client cipher: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("unknown")
            .to_string()
    }

    /// `ssh host true` over a ControlMaster connection (no key exchange or
    /// authentication per run, like gatekey's keep-alive API connection):
    /// one whole ssh client process per sample, after 10 warm-up runs.
    pub(crate) fn mux_exec_latency(&self, runs: usize) -> Result<Vec<Duration>, String> {
        let control = self.dir.join("control");
        let mux = |cmd: &mut Command| {
            cmd.arg("-S").arg(&control);
        };
        let mut master = self.ssh();
        mux(&mut master);
        let mut master = master
            .args(["-M", "-N"])
            .arg(self.target())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("ssh master: {e}"))?;
        let check = || {
            let mut c = self.ssh();
            mux(&mut c);
            c.args(["-O", "check"])
                .arg(self.target())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            if Instant::now() > deadline {
                let _ = master.kill();
                let _ = master.wait();
                return Err("the ssh ControlMaster did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut samples = Vec::with_capacity(runs);
        let mut result = Ok(());
        for i in 0..runs + 10 {
            let mut c = self.ssh();
            mux(&mut c);
            let t = Instant::now();
            let st = c
                .arg(self.target())
                .arg("true")
                .stdin(Stdio::null())
                .status();
            let elapsed = t.elapsed();
            if !st.as_ref().is_ok_and(|s| s.success()) {
                result = Err(format!("ssh true failed: {st:?}"));
                break;
            }
            if i >= 10 {
                samples.push(elapsed);
            }
        }
        let _ = master.kill();
        let _ = master.wait();
        result.map(|()| samples)
    }

    /// `ssh host 'head -c N /dev/zero'` into /dev/null: elapsed time.
    pub(crate) fn stdout_throughput(&self, n: u64) -> Result<Duration, String> {
        let t = Instant::now();
        let st = self
            .ssh()
            .arg(self.target())
            .arg(format!("head -c {n} /dev/zero"))
            .stdin(Stdio::null())
            .stdout(devnull())
            .status()
            .map_err(|e| e.to_string())?;
        let d = t.elapsed();
        st.success()
            .then_some(d)
            .ok_or_else(|| format!("ssh head: {st}"))
    }

    /// `head -c N /dev/zero | ssh host 'cat > /dev/null'`: elapsed time.
    pub(crate) fn stdin_throughput(&self, n: u64) -> Result<Duration, String> {
        let mut head = Command::new("head")
            .args(["-c", &n.to_string(), "/dev/zero"])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("head: {e}"))?;
        let t = Instant::now();
        let st = self
            .ssh()
            .arg(self.target())
            .arg("cat > /dev/null")
            .stdin(head.stdout.take().expect("head stdout"))
            .stdout(devnull())
            .status()
            .map_err(|e| e.to_string());
        let d = t.elapsed();
        let _ = head.wait();
        let st = st?;
        st.success()
            .then_some(d)
            .ok_or_else(|| format!("ssh cat: {st}"))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn devnull() -> std::fs::File {
    std::fs::File::create("/dev/null").expect("/dev/null")
}

/// `apt-get install openssh-server`, refreshing the package lists once if
/// the first attempt fails (fresh containers often have none).
fn install_openssh_server() -> Result<(), String> {
    eprintln!("installing openssh-server for the OpenSSH comparison");
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "openssh-server",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = install()
        || (Command::new("apt-get")
            .args(["update", "-qq"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && install());
    if ok && Path::new("/usr/sbin/sshd").exists() {
        Ok(())
    } else {
        Err("cannot install openssh-server (apt-get as root)".into())
    }
}
