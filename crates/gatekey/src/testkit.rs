//! Starts real gatekey processes on loopback with real TLS: a control plane
//! on a free port with its own data directory, agents with generated configs,
//! and the admin CLI pointed at them. Used by the integration tests and by
//! gatekey-bench; everything is killed and removed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Paths of the three binaries.
#[derive(Clone, Debug)]
pub struct Bins {
    pub server: PathBuf,
    pub agent: PathBuf,
    pub admin: PathBuf,
}

impl Bins {
    /// The binaries beside the running executable (or its parent directory,
    /// for test executables under `target/*/deps`).
    pub fn beside_current_exe() -> Bins {
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if !dir.join("gatekey-server").exists()
            && let Some(parent) = dir.parent()
        {
            dir = parent.to_path_buf();
        }
        let bins = Bins {
            server: dir.join("gatekey-server"),
            agent: dir.join("gatekey-agent"),
            admin: dir.join("gatekey-admin"),
        };
        for b in [&bins.server, &bins.agent, &bins.admin] {
            assert!(
                b.exists(),
                "{} is missing: build it first (cargo build -p gatekey)",
                b.display()
            );
        }
        bins
    }
}

/// A registered node.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub token: String,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A running control plane and the agents started through it.
pub struct Cluster {
    pub bins: Bins,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub url: String,
    pub ca_cert: PathBuf,
    pub admin_key: String,
    server: Option<Child>,
    server_args: Vec<String>,
}

impl Cluster {
    pub fn start(bins: &Bins) -> Cluster {
        Cluster::start_with(bins, &[])
    }

    /// Starts a control plane with extra `gatekey-server` arguments.
    pub fn start_with(bins: &Bins, extra_args: &[&str]) -> Cluster {
        Cluster::start_on(bins, "127.0.0.1:0", extra_args)
    }

    /// Starts a control plane listening on `listen` (e.g. an address that
    /// agents in a network namespace can reach).
    pub fn start_on(bins: &Bins, listen: &str, extra_args: &[&str]) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "gatekey-test-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            Instant::now().elapsed().as_nanos()
                ^ (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos())
        ));
        std::fs::create_dir_all(dir.join("home/.config")).expect("create test dir");
        let mut c = Cluster {
            bins: bins.clone(),
            ca_cert: dir.join("server/tls/ca.pem"),
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            url: String::new(),
            admin_key: String::new(),
            server: None,
            server_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        c.spawn_server(listen);
        c
    }

    /// Starts another replica of `first`'s installation: same database and
    /// bus (in `extra_args`), same TLS certificate and admin key.
    pub fn start_replica(first: &Cluster, extra_args: &[&str]) -> Cluster {
        let tls = first.dir.join("server/tls");
        let cert = tls.join("server.pem").display().to_string();
        let key = tls.join("server-key.pem").display().to_string();
        let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
        args.extend_from_slice(extra_args);
        let dir = std::env::temp_dir().join(format!(
            "gatekey-test-{}-{}-r",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("home/.config")).expect("create test dir");
        let mut c = Cluster {
            bins: first.bins.clone(),
            ca_cert: first.ca_cert.clone(),
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            url: String::new(),
            admin_key: first.admin_key.clone(),
            server: None,
            server_args: args.iter().map(|s| s.to_string()).collect(),
        };
        c.spawn_server("127.0.0.1:0");
        c
    }

    fn spawn_server(&mut self, listen: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        let mut child = Command::new(&self.bins.server)
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.dir.join("server"))
            .args(&self.server_args)
            .env("RUST_LOG", "info,gatekey_server=debug")
            .env_remove("GATEKEY_CONFIG")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn gatekey-server");
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the server never blocks.
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut addr = None;
        while addr.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    panic!(
                        "control plane did not start; log: {}",
                        self.log("server.log")
                    )
                });
            if let Some(rest) = line.split("listening on https://").nth(1) {
                addr = Some(rest.trim().parse::<SocketAddr>().expect("listen address"));
            }
        }
        // The bootstrap key is printed only on first start; afterwards it is
        // in the data dir (a replica joining a shared database has none: it
        // was given the first replica's).
        let key_file = self.dir.join("server/admin-token");
        if let Ok(key) = std::fs::read_to_string(&key_file) {
            self.admin_key = key.trim().to_string();
        }
        assert!(
            !self.admin_key.is_empty(),
            "no admin key: {}",
            key_file.display()
        );
        self.addr = addr.unwrap();
        self.url = format!("https://{}", self.addr);
        self.server = Some(child);
    }

    /// Stops the control plane (SIGTERM, or SIGKILL when `crash`) and starts
    /// it again on the same address and data directory.
    pub fn restart_server(&mut self, crash: bool) {
        self.stop_server(crash);
        let listen = self.addr.to_string();
        self.spawn_server(&listen);
    }

    pub fn stop_server(&mut self, crash: bool) {
        if let Some(mut child) = self.server.take() {
            let sig = if crash {
                libc_sig::KILL
            } else {
                libc_sig::TERM
            };
            signal(child.id(), sig);
            let _ = child.wait();
        }
    }

    /// The arguments this control plane was started with (beyond
    /// `--listen` and `--data-dir`).
    pub fn server_args(&self) -> &[String] {
        &self.server_args
    }

    /// The `--replica-id` this replica was started with.
    pub fn replica_id(&self) -> Option<&str> {
        let at = self.server_args.iter().position(|a| a == "--replica-id")?;
        self.server_args.get(at + 1).map(String::as_str)
    }

    /// `gatekey-admin audit list ARGS -o json`, as records.
    pub fn audit_records(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["audit", "list"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&self.admin_ok(&all)).expect("audit JSON");
        let items = v.as_array().or_else(|| v["items"].as_array()).cloned();
        items.unwrap_or_default()
    }

    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|c| c.id())
    }

    /// `gatekey-admin` pointed at this control plane through the environment,
    /// with a private HOME so no user config interferes.
    pub fn admin(&self) -> Command {
        let mut cmd = Command::new(&self.bins.admin);
        cmd.env("GATEKEY_SERVER", &self.url)
            .env("GATEKEY_API_KEY", &self.admin_key)
            .env("GATEKEY_CA_CERT", &self.ca_cert)
            .env("HOME", self.dir.join("home"))
            .env("XDG_CONFIG_HOME", self.dir.join("home/.config"));
        cmd
    }

    /// Runs `gatekey-admin ARGS` and returns its output.
    pub fn admin_run(&self, args: &[&str]) -> Output {
        self.admin()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gatekey-admin")
    }

    /// Runs `gatekey-admin ARGS`, panicking with its stderr unless it succeeds.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin_run(args);
        assert!(
            out.status.success(),
            "gatekey-admin {args:?} failed ({:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Registers a node: `noun` is `gateway`, `mesh hub`, `mesh spoke` or `device`.
    pub fn create_node(&self, noun: &str, name: &str) -> NodeInfo {
        let mut args: Vec<&str> = noun.split(' ').collect();
        args.extend(["create", name, "-o", "json"]);
        let v: serde_json::Value =
            serde_json::from_str(&self.admin_ok(&args)).expect("create -o json");
        NodeInfo {
            id: v["id"].as_str().expect("id").to_string(),
            name: v["name"].as_str().expect("name").to_string(),
            token: v["token"].as_str().expect("token").to_string(),
        }
    }

    /// Writes an agent config file and returns its path.
    pub fn agent_config(
        &self,
        name: &str,
        token: &str,
        session_enabled: bool,
        extra: &str,
    ) -> PathBuf {
        let dir = self.dir.join("agents");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{name}-{}.yaml",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(
            &path,
            format!(
                "name: {name}\ncontrol_plane_url: {}\ntoken: {token}\nca_cert: {}\nsession_enabled: {session_enabled}\n{extra}",
                self.url,
                self.ca_cert.display()
            ),
        )
        .unwrap();
        path
    }

    /// Starts `gatekey-agent --config PATH`.
    pub fn spawn_agent(&self, config: &Path) -> AgentProc {
        self.spawn_agent_in(config, None)
    }

    /// Starts an agent, inside network namespace `netns` when given.
    pub fn spawn_agent_in(&self, config: &Path, netns: Option<&str>) -> AgentProc {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).expect("agent log");
        let mut cmd = match netns {
            // `ip netns exec` execs the agent: the child's pid is the agent's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bins.agent);
                c
            }
            None => Command::new(&self.bins.agent),
        };
        let child = cmd
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,gatekey_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn gatekey-agent");
        AgentProc { child, log }
    }

    /// Registers a node of `noun` type, starts its agent and waits until it is connected.
    pub fn agent(&self, noun: &str, name: &str, session_enabled: bool) -> (NodeInfo, AgentProc) {
        let node = self.create_node(noun, name);
        let cfg = self.agent_config(name, &node.token, session_enabled, "");
        let proc = self.spawn_agent(&cfg);
        self.wait_for_agent(name, true, &proc);
        (node, proc)
    }

    /// Waits until `session list --all` does (or does not) show the agent.
    pub fn wait_for_agent(&self, name: &str, connected: bool, proc: &AgentProc) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.admin_run(&["session", "list", "--all", "-o", "json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let found = v
                    .as_array()
                    .or_else(|| v["items"].as_array())
                    .is_some_and(|items| {
                        items
                            .iter()
                            .any(|a| a["name"] == name && a["connected"] != false)
                    });
                if found == connected {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent {name} did not become connected={connected}; agent log:\n{}\nserver log:\n{}",
                std::fs::read_to_string(&proc.log).unwrap_or_default(),
                self.log("server.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tail of a log file in the cluster's directory.
    pub fn log(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        s.lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_server(true);
        if std::env::var_os("GATEKEY_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running agent process; killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc_sig::TERM);
        self.child.wait().expect("wait agent")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod libc_sig {
    pub const TERM: i32 = 15;
    pub const KILL: i32 = 9;
}

fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Waits for `f` to become true, polling; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = vec![];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty cmdline and are already dead; the CLI that
        // asked for the command carries the marker too but runs here.
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) && !cmdline.contains("gatekey-admin") {
            pids.push(pid);
        }
    }
    pids
}

/// A raw HTTPS request to the control plane, for tests that need exact
/// statuses and headers: HTTP/1.0 so the answer is never chunked.
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub key: Option<&'a str>,
    pub body: Option<String>,
    pub headers: Vec<(&'a str, String)>,
}

/// Status, headers (lowercase names) and body of an answer.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Cluster {
    /// Sends one request and reads the whole answer.
    pub async fn http(&self, req: HttpRequest<'_>) -> HttpAnswer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let endpoint = gatekey_proto::transport::Endpoint::parse(&self.url).expect("url");
        let tls = gatekey_proto::transport::client_config(Some(&self.ca_cert)).expect("tls");
        let mut s = gatekey_proto::transport::connect_tls(&endpoint, tls, Duration::from_secs(10))
            .await
            .expect("connect");
        let body = req.body.unwrap_or_default();
        let mut head = format!(
            "{} {} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
            req.method,
            req.path,
            self.addr,
            body.len()
        );
        if let Some(k) = req.key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        for (k, v) in &req.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(body.as_bytes()).await.expect("write");
        s.flush().await.expect("flush");
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        HttpAnswer {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// GET with a key.
    pub async fn get(&self, path: &str, key: &str) -> HttpAnswer {
        self.http(HttpRequest {
            method: "GET",
            path,
            key: Some(key),
            body: None,
            headers: vec![],
        })
        .await
    }

    /// A request with a JSON body and a key.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: serde_json::Value,
    ) -> HttpAnswer {
        self.http(HttpRequest {
            method,
            path,
            key: Some(key),
            body: Some(body.to_string()),
            headers: vec![],
        })
        .await
    }

    /// Creates a user with an API key through the API; returns the key.
    pub async fn user_with_key(&self, name: &str, role: &str, scopes: &[&str]) -> String {
        let r = self
            .send(
                "POST",
                "/api/v1/users",
                &self.admin_key,
                serde_json::json!({"name": name, "role": role, "scopes": scopes}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let r = self
            .send(
                "POST",
                "/api/v1/apikeys",
                &self.admin_key,
                serde_json::json!({"user": name, "name": "test"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["key"].as_str().expect("key").to_string()
    }
}

/// A TCP forwarder on loopback: each connection goes to the first backend
/// that accepts it, in turn (a load balancer in front of replicas, or a
/// link to a broker that a test can cut).
pub struct TcpForwarder {
    pub addr: SocketAddr,
    shared: std::sync::Arc<ForwarderShared>,
}

struct ForwarderShared {
    backends: std::sync::Mutex<Vec<SocketAddr>>,
    next: std::sync::atomic::AtomicUsize,
    open: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    live: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl TcpForwarder {
    pub fn start(backends: Vec<SocketAddr>) -> TcpForwarder {
        use std::sync::atomic::AtomicBool;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let addr = listener.local_addr().unwrap();
        let shared = std::sync::Arc::new(ForwarderShared {
            backends: std::sync::Mutex::new(backends),
            next: Default::default(),
            open: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            live: Default::default(),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                if !s.open.load(Ordering::Relaxed) {
                    continue;
                }
                let backends = s.backends.lock().unwrap().clone();
                let start = s.next.fetch_add(1, Ordering::Relaxed);
                let upstream = (0..backends.len()).find_map(|i| {
                    let b = backends[(start + i) % backends.len()];
                    std::net::TcpStream::connect_timeout(&b, Duration::from_secs(1)).ok()
                });
                let Some(upstream) = upstream else { continue };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                {
                    let mut live = s.live.lock().unwrap();
                    live.push(client.try_clone().unwrap());
                    live.push(upstream.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        TcpForwarder { addr, shared }
    }

    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.shared.backends.lock().unwrap() = backends;
    }

    /// Drops every forwarded connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.shared.open.store(false, Ordering::Relaxed);
        for c in self.shared.live.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.shared.open.store(true, Ordering::Relaxed);
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
        self.cut();
    }
}

/// A PostgreSQL schema of its own on the machine's server
/// (`GATEKEY_TEST_POSTGRES_URL`, default the local `test` database), made
/// with psql; `None` when there is no server.
pub fn postgres_schema_url(label: &str) -> Option<String> {
    let base = std::env::var("GATEKEY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!(
        "gk_{label}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let ok = Command::new("psql")
        .args([&base, "-q", "-c", &format!("CREATE SCHEMA {schema}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-csearch_path%3D{schema}"))
}

/// Starts `n` replicas `<run>-r1`…`<run>-rN` on one database and bus, with
/// `config_yaml` as their config file, and waits until each has heard the
/// others.
pub fn start_replicas(
    bins: &Bins,
    n: usize,
    db: &str,
    bus: &str,
    config_yaml: &str,
) -> Vec<Cluster> {
    let config = std::env::temp_dir().join(format!(
        "gatekey-replicas-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&config, config_yaml).expect("replica config");
    let config = config.display().to_string();
    let args = |id: String| -> Vec<String> {
        vec![
            "--config".into(),
            config.clone(),
            "--database-url".into(),
            db.into(),
            "--bus-url".into(),
            bus.into(),
            "--replica-id".into(),
            id,
        ]
    };
    let strs = |v: &[String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Unique on the broker, which test runs and parallel tests share:
    // "<run>-r1", "<run>-r2", …
    let run = format!(
        "t{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let first_args = strs(&args(format!("{run}-r1")));
    let first = Cluster::start_with(
        bins,
        &first_args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let mut all = vec![first];
    for i in 2..=n {
        let a = strs(&args(format!("{run}-r{i}")));
        let c = Cluster::start_replica(&all[0], &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        all.push(c);
    }
    for c in &all {
        wait_until(
            Duration::from_secs(20),
            "replicas to hear each other",
            || c.log("server.log").matches("replica joined").count() >= n - 1,
        );
    }
    all
}
