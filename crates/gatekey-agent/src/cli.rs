//! The `gatekey-agent` command line: parse arguments, load the config, set up
//! logging to stderr (journald collects it), run until SIGTERM or SIGINT.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error
//! (EX_CONFIG, so systemd units can tell "fix the file" from "crashed").

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use tracing::info;

use crate::{Config, Error};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_CONFIG: i32 = 78;

/// gatekey agent: keeps an outbound connection to the control plane and runs
/// the remote sessions it is asked for (only with `session_enabled: true`).
#[derive(Debug, Parser)]
#[command(name = "gatekey-agent", version)]
pub struct Args {
    /// The agent's YAML config, e.g. /etc/gatekey/hub.yaml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Check the config file and exit.
    #[arg(long)]
    pub check: bool,
}

/// Entry point of the `gatekey-agent` binary; returns the process exit code.
pub fn main() -> i32 {
    match Args::try_parse() {
        Ok(args) => main_with(args),
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() { EXIT_USAGE } else { EXIT_OK }
        }
    }
}

/// Runs the agent with parsed arguments; returns the process exit code.
pub fn main_with(args: Args) -> i32 {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatekey-agent: {e}");
            return EXIT_CONFIG;
        }
    };
    if args.check {
        if let Err(e) = crate::link::Connector::new(std::sync::Arc::new(config.clone())) {
            eprintln!("gatekey-agent: {}: {e}", config.file_display());
            return EXIT_CONFIG;
        }
        println!("config OK: {}", config.summary());
        return EXIT_OK;
    }
    init_logging(&config.log_level);

    gatekey_proto::allocator::tune_for_streaming();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatekey-agent: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal()
            .map_err(|e| Error::Runtime(format!("cannot install signal handlers: {e}")))?;
        crate::run(config, shutdown).await
    });
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("gatekey-agent: {e}");
            match e {
                Error::Config(_) | Error::Tls(_) => EXIT_CONFIG,
                Error::Runtime(_) => EXIT_FAILURE,
            }
        }
    }
}

/// Logs to stderr at `log_level`, unless RUST_LOG says otherwise.
fn init_logging(log_level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(log_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Resolves on SIGTERM (systemctl stop) or SIGINT (Ctrl-C).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = Args::try_parse_from([
            "gatekey-agent",
            "--config",
            "/etc/gatekey/hub.yaml",
            "--check",
        ])
        .unwrap();
        assert_eq!(a.config, PathBuf::from("/etc/gatekey/hub.yaml"));
        assert!(a.check);
        let e = Args::try_parse_from(["gatekey-agent"]).unwrap_err();
        assert!(e.use_stderr());
        assert_eq!(e.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn config_errors_exit_78() {
        let args = Args {
            config: "/nonexistent/gatekey/hub.yaml".into(),
            check: true,
        };
        assert_eq!(main_with(args), EXIT_CONFIG);
    }

    #[test]
    fn check_accepts_a_documented_config() {
        let dir = std::env::temp_dir().join(format!("gatekey-agent-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hub.yaml");
        std::fs::write(&path, "name: hub-1\ncontrol_plane_url: https://vpn.company.com\ntoken: hub_xxxxx\n\nsession_enabled: true\n")
            .unwrap();
        assert_eq!(
            main_with(Args {
                config: path.clone(),
                check: true
            }),
            EXIT_OK
        );
        std::fs::write(&path, "name: hub-1\nsesion_enabled: true\n").unwrap();
        assert_eq!(
            main_with(Args {
                config: path,
                check: true
            }),
            EXIT_CONFIG
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
