//! gatekey control plane: agent registry, admin API, session relay, storage.
//!
//! Start one in-process with [`Server::bind`] (port 0 works) and
//! [`Server::run`]; the `gatekey-server` binary is [`cli::main`].

pub mod agent_link;
pub mod api;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod lease;
pub mod live;
pub mod password;
pub mod registry;
pub mod relay;
pub mod secret;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod tls;
pub mod ws;

pub use config::Config;
pub use server::Server;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Listen(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
}
