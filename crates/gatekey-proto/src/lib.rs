//! gatekey's wire protocols and the pieces every binary shares.
//!
//! - [`link`]: the agent link (agent ⇄ control plane) — framing and messages.
//! - [`mux`]: streams multiplexed on one agent link, with per-stream flow control.
//! - [`channel`]: the admin stream protocol (`v5.channel.k8s.io`) clients speak.
//! - [`limits`], [`names`]: sizes and names checked before anything is allocated.
//! - [`transport`]: TLS client configuration and WebSocket dialing.
//! - [`readahead`]: large socket reads under TLS.
//! - [`allocator`]: allocator settings for bulk streams.
//! - [`duration`]: human durations (`60s`, `30m`) in configs and flags.

pub mod allocator;
pub mod channel;
pub mod duration;
pub mod limits;
pub mod link;
pub mod mux;
pub mod names;
pub mod readahead;
pub mod transport;

/// Version of the gatekey binaries (all crates share the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
