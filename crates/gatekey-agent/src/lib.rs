//! gatekey-agent: runs on a node, dials the control plane over one outbound
//! TLS WebSocket and serves the sessions the control plane opens on it.
//!
//! - [`config`]: the YAML config file, with one-line errors naming file, line and key.
//! - [`link`]: dialing, the hello/welcome handshake, reconnecting with backoff.
//! - [`exec`]: running commands in their own process groups, and consoles on
//!   pseudo-terminals, streaming their output.
//! - [`diag`]: built-in network diagnostics (ping, nslookup, traceroute, nc,
//!   nmap) run in the agent itself.
//! - [`pty`]: pseudo-terminals: allocation, starting a console's process on
//!   one, resizing, and ending every process of the console.
//! - [`cli`]: the `gatekey-agent` command line.
//!
//! Tests and embedders run an agent in-process with [`run`]:
//!
//! ```no_run
//! # async fn f() -> Result<(), gatekey_agent::Error> {
//! let mut config = gatekey_agent::Config::new("hub-1", "https://127.0.0.1:8443", "hub_…")?;
//! config.session_enabled = true;
//! config.ca_cert = Some("/var/lib/gatekey/tls/ca.pem".into());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let agent = tokio::spawn(gatekey_agent::run(config, async { let _ = stopped.await; }));
//! // … use the agent through the control plane …
//! let _ = stop.send(());
//! agent.await.unwrap()?;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod config;
#[cfg(test)]
mod console_tests;
pub mod diag;
pub mod exec;
pub mod link;
pub mod pty;
#[cfg(test)]
mod test_support;

use std::future::Future;

pub use config::{AgentType, Config, ConfigError};

/// Why the agent could not run. Connection failures are not errors: the
/// agent logs them and keeps retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `ca_cert` could not be loaded.
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Runtime(String),
}

/// Runs the agent until `shutdown` resolves, then closes the link (code 1001)
/// and returns once every process it started is dead.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    link::run_agent(config, shutdown).await
}
