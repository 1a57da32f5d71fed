//! `gatekey-server`: flags, environment and config file, then serve.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::{Config, Server};

/// Exit codes of gatekey-server.
pub mod exit {
    pub const OK: i32 = 0;
    pub const RUNTIME: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const CONFIG: i32 = 78;
}

/// gatekey control plane: agents dial in, administrators run sessions.
#[derive(Parser, Debug)]
#[command(name = "gatekey-server", version)]
struct Args {
    /// YAML config file (every key optional; see docs/configuration.md).
    #[arg(long, env = "GATEKEY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:8443].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the embedded database, TLS material and admin token [default: /var/lib/gatekey].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Database URL (sqlite://… or postgres://…) [default: SQLite in the data dir].
    #[arg(long)]
    database_url: Option<String>,
    /// Message bus joining replicas (nats://… or amqp://…) [default: none, one control plane].
    #[arg(long)]
    bus_url: Option<String>,
    /// This replica's name on the bus [default: random].
    #[arg(long)]
    replica_id: Option<String>,
    /// TLS certificate chain (PEM) [default: self-signed, CA in DATA_DIR/tls/ca.pem].
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace) [default: info].
    #[arg(long)]
    log_level: Option<String>,
}

pub fn main() -> i32 {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    let mut config = Config::default();
    let loaded = (|| {
        if let Some(path) = &args.config {
            config.apply_file(path)?;
        }
        config.apply_env(|k| std::env::var(k).ok())?;
        macro_rules! flag {
            ($($k:ident),*) => { $( if let Some(v) = args.$k.clone() { config.$k = v.into(); } )* };
        }
        flag!(listen, data_dir, log_level);
        if args.database_url.is_some() {
            config.database_url = args.database_url.clone();
        }
        if args.bus_url.is_some() {
            config.bus_url = args.bus_url.clone().filter(|u| !u.is_empty());
        }
        if args.replica_id.is_some() {
            config.replica_id = args.replica_id.clone();
        }
        if args.tls_cert.is_some() {
            config.tls_cert = args.tls_cert.clone();
            config.tls_key = args.tls_key.clone();
        }
        config.validate()
    })();
    if let Err(e) = loaded {
        eprintln!("gatekey-server: {e}");
        return exit::CONFIG;
    }
    init_logging(&config.log_level);
    gatekey_proto::allocator::tune_for_streaming();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let server = match Server::bind(config.clone()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("gatekey-server: {e}");
                return match e {
                    crate::Error::Config(_)
                    | crate::Error::Tls(_)
                    | crate::Error::Bus(crate::bus::BusError::IdTaken(_)) => exit::CONFIG,
                    _ => exit::RUNTIME,
                };
            }
        };
        println!(
            "gatekey control plane listening on https://{}",
            server.local_addr()
        );
        if let Some(ca) = &server.ca_cert {
            println!(
                "TLS: self-signed; clients trust {} (--ca-cert / ca_cert)",
                ca.display()
            );
        }
        if let Some(token) = &server.admin_token {
            println!(
                "bootstrap admin API key (shown once, saved to {}): {token}",
                config.data_dir.join("admin-token").display()
            );
        }
        server.run(shutdown_signal()).await;
        exit::OK
    })
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},sqlx=warn")));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
