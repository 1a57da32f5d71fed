//! gatekey-admin: the administrator's CLI and the client library that the
//! CLI, the integration tests and the benchmarks share.
//!
//! - [`client`]: [`Client`](client::Client), typed calls to the admin API
//!   over one kept-alive HTTPS connection.
//! - [`stream`]: streaming exec and console sessions over the admin stream
//!   protocol.
//! - [`terminal`]: the local terminal of `session connect` (raw mode that is
//!   always undone, window size, `~` escapes).
//! - [`error`], [`exit`]: one error type, one exit code per kind of failure.
//! - [`config`]: flags > environment > `~/.config/gatekey/admin.yaml`.
//! - [`output`]: tables, JSON and YAML.
//! - [`cli`]: the command line itself; [`main`] runs it.

pub mod api;
pub mod cli;
pub mod client;
mod cmd;
pub mod config;
pub mod error;
pub mod exit;
pub mod output;
pub mod stdio;
pub mod stream;
pub mod terminal;

pub use client::{Client, ClientConfig, ClientError};
pub use stream::{ConsoleMode, ConsoleOptions, ExecOptions, ExecSession, StreamSession};

/// Runs the CLI with the process's arguments; returns the exit code.
pub fn main() -> i32 {
    gatekey_proto::allocator::tune_for_streaming();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            cli::warn(&format!("cannot start the async runtime: {e}"));
            return exit::FAILURE;
        }
    };
    let code = runtime.block_on(cli::run_args(std::env::args_os()));
    // A blocking read of stdin may still be pending (stdin forwarded from a
    // pipe that never closed): don't wait for it.
    runtime.shutdown_background();
    code
}
