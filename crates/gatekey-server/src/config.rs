//! Control-plane settings: defaults, then a YAML file (`--config`), then
//! `GATEKEY_*` environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything the control plane can be told.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on (agents, API, WebSockets share it).
    pub listen: SocketAddr,
    /// Where the embedded database, TLS material and admin token live.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default: SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// PEM certificate chain and key; default: a self-signed CA in `data_dir/tls`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names or addresses for the self-signed certificate.
    pub tls_san: Vec<String>,
    /// How often the control plane pings each agent.
    pub heartbeat_interval: Duration,
    /// An agent silent for this long is disconnected.
    pub heartbeat_timeout: Duration,
    /// Time for a new agent to send its hello after the upgrade.
    pub handshake_timeout: Duration,
    /// Time for a TLS handshake and HTTP request headers.
    pub request_timeout: Duration,
    /// Time for an agent to accept a new session.
    pub session_open_timeout: Duration,
    /// Time an already-connected agent has to prove it is alive when a second
    /// connection claims its name.
    pub liveness_probe_timeout: Duration,
    /// Extra time past a command's own timeout before the control plane gives up on the agent.
    pub exec_grace: Duration,
    /// At shutdown, how long sessions and agent links may take to write
    /// their own closing audit records once links are closed.
    pub shutdown_timeout: Duration,
    /// A console with no input and no output for this long is ended (zero: never).
    pub console_idle_timeout: Duration,
    /// Longest any session may last (zero: no limit).
    pub session_max_duration: Duration,
    /// Most clients in one console (the holder, those sharing, observers).
    pub console_max_participants: usize,
    /// Per-stream cap on output returned by the one-shot exec API.
    pub exec_output_limit: usize,
    /// Per-stream flow-control window on agent links.
    pub stream_window: u32,
    /// Most simultaneous connections (agents and clients).
    pub max_connections: usize,
    /// Idle time before TCP keepalive probes start on every connection, so a
    /// client or agent whose host vanished is found even when it was silent
    /// (three probes 10 s apart). Zero turns keepalive off.
    pub tcp_keepalive: Duration,
    /// Most probes (hosts × ports) one `nmap` run may send.
    pub troubleshoot_max_probes: u32,
    /// What the audit log keeps of sessions: off, commands or full.
    pub audit_capture: crate::audit::Capture,
    /// With `audit_capture: full`, output bytes kept per session.
    pub audit_output_limit: usize,
    /// Audit records older than this are pruned (zero: kept forever).
    pub audit_retention: Duration,
    /// Lifetime of keys made by `POST /api/v1/login`.
    pub login_key_ttl: Duration,
    /// Origins besides the control plane's own allowed to open WebSockets
    /// and to send cookie-authenticated changes (e.g. `https://ops.example.com`).
    pub allowed_origins: Vec<String>,
    /// The message bus between replicas: `nats://…` or `amqp://…`
    /// (docs/scaling.md). Unset: a single control plane.
    pub bus_url: Option<String>,
    /// This replica's name on the bus; default: a random one at each start.
    pub replica_id: Option<String>,
    /// A replica (or the far end of a cross-replica session) silent for this
    /// long is gone; heartbeats go out at a third of it.
    pub replica_timeout: Duration,
    /// Bytes in flight per direction of a cross-replica session.
    pub bus_window: u32,
    /// Idle agents a replica above its share hands to the others per
    /// heartbeat (cluster/rebalance.rs); 0: never.
    pub rebalance_batch: u32,
    /// On PostgreSQL, how long a starting replica waits for another one that
    /// is migrating the same schema before it gives up.
    pub migration_lock_timeout: Duration,
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8443".parse().expect("valid address"),
            data_dir: PathBuf::from("/var/lib/gatekey"),
            database_url: None,
            tls_cert: None,
            tls_key: None,
            tls_san: vec![],
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            session_open_timeout: Duration::from_secs(10),
            liveness_probe_timeout: Duration::from_secs(5),
            exec_grace: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(3),
            console_idle_timeout: Duration::from_secs(30 * 60),
            session_max_duration: Duration::ZERO,
            console_max_participants: 16,
            exec_output_limit: 1024 * 1024,
            stream_window: gatekey_proto::limits::DEFAULT_WINDOW,
            max_connections: 100_000,
            tcp_keepalive: Duration::from_secs(30),
            troubleshoot_max_probes: 1024,
            audit_capture: crate::audit::Capture::Commands,
            audit_output_limit: 1024 * 1024,
            audit_retention: Duration::ZERO,
            login_key_ttl: Duration::from_secs(12 * 3600),
            allowed_origins: vec![],
            bus_url: None,
            replica_id: None,
            replica_timeout: Duration::from_secs(15),
            bus_window: 4 * 1024 * 1024,
            rebalance_batch: 0,
            migration_lock_timeout: crate::store::DEFAULT_MIGRATION_LOCK_TIMEOUT,
            log_level: "info".into(),
        }
    }
}

/// The YAML file: every key optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_san: Option<Vec<String>>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    heartbeat_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    handshake_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    session_open_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    liveness_probe_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    exec_grace: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    shutdown_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    console_idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    session_max_duration: Option<Duration>,
    console_max_participants: Option<usize>,
    exec_output_limit: Option<usize>,
    stream_window: Option<u32>,
    max_connections: Option<usize>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    tcp_keepalive: Option<Duration>,
    troubleshoot_max_probes: Option<u32>,
    audit_capture: Option<String>,
    audit_output_limit: Option<usize>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    audit_retention: Option<Duration>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    login_key_ttl: Option<Duration>,
    allowed_origins: Option<Vec<String>>,
    bus_url: Option<String>,
    replica_id: Option<String>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    replica_timeout: Option<Duration>,
    bus_window: Option<u32>,
    rebalance_batch: Option<u32>,
    #[serde(default, deserialize_with = "gatekey_proto::duration::deserialize_opt")]
    migration_lock_timeout: Option<Duration>,
    log_level: Option<String>,
}

impl Config {
    /// Applies a YAML file. Errors name the file, line and key.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let f: FileConfig = yaml_serde::from_str(&text).map_err(|e| {
            let line = e
                .location()
                .map(|l| format!(":{}", l.line()))
                .unwrap_or_default();
            let msg = e.to_string();
            let msg = msg
                .split(" at line ")
                .next()
                .unwrap_or(&msg)
                .replace("unknown field", "unknown key");
            format!("{}{line}: {msg}", path.display())
        })?;
        macro_rules! set {
            ($($k:ident),*) => { $( if let Some(v) = f.$k { self.$k = v; } )* };
        }
        set!(
            listen,
            data_dir,
            heartbeat_interval,
            heartbeat_timeout,
            handshake_timeout,
            request_timeout,
            session_open_timeout,
            liveness_probe_timeout,
            exec_grace,
            shutdown_timeout,
            console_idle_timeout,
            session_max_duration,
            console_max_participants,
            exec_output_limit,
            stream_window,
            max_connections,
            tcp_keepalive,
            troubleshoot_max_probes,
            audit_output_limit,
            audit_retention,
            login_key_ttl,
            replica_timeout,
            bus_window,
            rebalance_batch,
            migration_lock_timeout,
            log_level
        );
        if let Some(v) = f.tls_san {
            self.tls_san = v;
        }
        if let Some(v) = f.allowed_origins {
            self.allowed_origins = v;
        }
        if let Some(v) = f.audit_capture {
            self.audit_capture =
                parse_capture(&v).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        macro_rules! set_opt {
            ($($k:ident),*) => { $( if f.$k.is_some() { self.$k = f.$k; } )* };
        }
        set_opt!(database_url, tls_cert, tls_key, bus_url, replica_id);
        Ok(())
    }

    /// Applies `GATEKEY_*` variables from `lookup` (the process environment in production).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let dur = |k: &str| -> Result<Option<Duration>, String> {
            lookup(k)
                .map(|v| gatekey_proto::duration::parse(&v).map_err(|e| format!("{k}: {e}")))
                .transpose()
        };
        let num = |k: &str| -> Result<Option<u64>, String> {
            lookup(k)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("{k}: expected a number, got {v:?}"))
                })
                .transpose()
        };
        if let Some(v) = lookup("GATEKEY_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|_| format!("GATEKEY_LISTEN: expected HOST:PORT, got {v:?}"))?;
        }
        if let Some(v) = lookup("GATEKEY_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = lookup("GATEKEY_DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let Some(v) = lookup("GATEKEY_TLS_CERT") {
            self.tls_cert = Some(v.into());
        }
        if let Some(v) = lookup("GATEKEY_TLS_KEY") {
            self.tls_key = Some(v.into());
        }
        if let Some(v) = lookup("GATEKEY_TLS_SAN") {
            self.tls_san = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = dur("GATEKEY_HEARTBEAT_INTERVAL")? {
            self.heartbeat_interval = v;
        }
        if let Some(v) = dur("GATEKEY_HEARTBEAT_TIMEOUT")? {
            self.heartbeat_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_HANDSHAKE_TIMEOUT")? {
            self.handshake_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_REQUEST_TIMEOUT")? {
            self.request_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_SESSION_OPEN_TIMEOUT")? {
            self.session_open_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_LIVENESS_PROBE_TIMEOUT")? {
            self.liveness_probe_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_EXEC_GRACE")? {
            self.exec_grace = v;
        }
        if let Some(v) = dur("GATEKEY_SHUTDOWN_TIMEOUT")? {
            self.shutdown_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_CONSOLE_IDLE_TIMEOUT")? {
            self.console_idle_timeout = v;
        }
        if let Some(v) = dur("GATEKEY_SESSION_MAX_DURATION")? {
            self.session_max_duration = v;
        }
        if let Some(v) = num("GATEKEY_CONSOLE_MAX_PARTICIPANTS")? {
            self.console_max_participants = v as usize;
        }
        if let Some(v) = num("GATEKEY_EXEC_OUTPUT_LIMIT")? {
            self.exec_output_limit = v as usize;
        }
        if let Some(v) = num("GATEKEY_STREAM_WINDOW")? {
            self.stream_window = v.min(u32::MAX as u64) as u32;
        }
        if let Some(v) = dur("GATEKEY_TCP_KEEPALIVE")? {
            self.tcp_keepalive = v;
        }
        if let Some(v) = num("GATEKEY_MAX_CONNECTIONS")? {
            self.max_connections = v as usize;
        }
        if let Some(v) = lookup("GATEKEY_AUDIT_CAPTURE") {
            self.audit_capture =
                parse_capture(&v).map_err(|e| format!("GATEKEY_AUDIT_CAPTURE: {e}"))?;
        }
        if let Some(v) = num("GATEKEY_TROUBLESHOOT_MAX_PROBES")? {
            self.troubleshoot_max_probes = v.min(u32::MAX as u64) as u32;
        }
        if let Some(v) = num("GATEKEY_AUDIT_OUTPUT_LIMIT")? {
            self.audit_output_limit = v as usize;
        }
        if let Some(v) = dur("GATEKEY_AUDIT_RETENTION")? {
            self.audit_retention = v;
        }
        if let Some(v) = dur("GATEKEY_LOGIN_KEY_TTL")? {
            self.login_key_ttl = v;
        }
        if let Some(v) = lookup("GATEKEY_ALLOWED_ORIGINS") {
            self.allowed_origins = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = lookup("GATEKEY_BUS_URL") {
            self.bus_url = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = lookup("GATEKEY_REPLICA_ID") {
            self.replica_id = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = dur("GATEKEY_REPLICA_TIMEOUT")? {
            self.replica_timeout = v;
        }
        if let Some(v) = num("GATEKEY_BUS_WINDOW")? {
            self.bus_window = v.min(u32::MAX as u64) as u32;
        }
        if let Some(v) = num("GATEKEY_REBALANCE_BATCH")? {
            self.rebalance_batch = v.min(u32::MAX as u64) as u32;
        }
        if let Some(v) = dur("GATEKEY_MIGRATION_LOCK_TIMEOUT")? {
            self.migration_lock_timeout = v;
        }
        if let Some(v) = lookup("GATEKEY_LOG_LEVEL") {
            self.log_level = v;
        }
        Ok(())
    }

    /// Checks values that other settings depend on.
    pub fn validate(&self) -> Result<(), String> {
        use gatekey_proto::limits::{MAX_WINDOW, MIN_WINDOW};
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&self.stream_window) {
            return Err(format!(
                "stream_window must be between {MIN_WINDOW} and {MAX_WINDOW} bytes"
            ));
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err("heartbeat_timeout must be longer than heartbeat_interval".into());
        }
        if self.heartbeat_interval.is_zero() {
            return Err("heartbeat_interval must be positive".into());
        }
        if self.console_max_participants == 0 {
            return Err("console_max_participants must be at least 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key must be set together".into());
        }
        if let Some(bus) = &self.bus_url {
            crate::bus::check_url(bus).map_err(|e| e.to_string())?;
            let url = self.database_url();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(
                    "bus_url joins replicas, which must share one database: set database_url to postgres://…"
                        .into(),
                );
            }
        }
        if let Some(id) = &self.replica_id
            && !crate::cluster::valid_id(id)
        {
            return Err(format!(
                "replica_id {id:?} must be 1-64 letters, digits, '-' or '_'"
            ));
        }
        if self.replica_timeout < Duration::from_secs(3) {
            return Err("replica_timeout must be at least 3s".into());
        }
        if self.rebalance_batch > 10_000 {
            return Err("rebalance_batch must be at most 10000 agents per heartbeat".into());
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.bus_window) {
            return Err("bus_window must be between 65536 and 67108864 bytes".into());
        }
        Ok(())
    }

    /// Whether a browser page from `origin` may use this control plane.
    pub fn origin_allowed(&self, origin: &str, own_host: Option<&str>) -> bool {
        let origin = origin.trim_end_matches('/');
        own_host.is_some_and(|h| origin.eq_ignore_ascii_case(&format!("https://{h}")))
            || self
                .allowed_origins
                .iter()
                .any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("gatekey.db").display()
            )
        })
    }
}

fn parse_capture(v: &str) -> Result<crate::audit::Capture, String> {
    crate::audit::Capture::parse(v.trim())
        .ok_or_else(|| format!("audit_capture must be off, commands or full, not {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_precedence_and_errors() {
        let dir = std::env::temp_dir().join(format!("gk-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("server.yaml");
        std::fs::write(
            &f,
            "listen: 127.0.0.1:9443\nheartbeat_interval: 5s\nsession_open_timeout: 3\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.apply_file(&f).unwrap();
        assert_eq!(c.listen.port(), 9443);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.session_open_timeout, Duration::from_secs(3));
        c.apply_env(|k| (k == "GATEKEY_LISTEN").then(|| "127.0.0.1:1".to_string()))
            .unwrap();
        assert_eq!(c.listen.port(), 1);
        assert!(
            c.apply_env(|k| (k == "GATEKEY_HEARTBEAT_TIMEOUT").then(|| "x".to_string()))
                .is_err()
        );

        std::fs::write(&f, "listen: 127.0.0.1:9443\nlisten_addr: x\n").unwrap();
        let err = Config::default().apply_file(&f).unwrap_err();
        assert!(err.contains("server.yaml:2"), "{err}");
        assert!(err.contains("unknown key `listen_addr`"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The documented server configs in deploy/config load and pass the
    /// checks made at start.
    #[test]
    fn documented_server_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
        for name in ["server.yaml", "server-replica.yaml"] {
            let mut c = Config::default();
            c.apply_file(&root.join(name)).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let mut c = Config::default();
        c.apply_file(&root.join("server-replica.yaml")).unwrap();
        assert_eq!(c.rebalance_batch, 20);
        c.rebalance_batch = 10_001;
        assert!(c.validate().unwrap_err().contains("rebalance_batch"));
    }
}
