//! Size limits, checked before allocating. Shared so both ends agree.

/// Largest WebSocket message on the agent link (data payload plus header).
pub const MAX_LINK_MESSAGE: usize = 1024 * 1024 + 64;
/// Largest encoded control message.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;
/// Largest data payload in one agent-link message.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Default per-stream receive window (bytes in flight before the sender waits).
pub const DEFAULT_WINDOW: u32 = 4 * 1024 * 1024;
/// Smallest window a peer may announce (must hold at least one full frame).
pub const MIN_WINDOW: u32 = 64 * 1024;
/// Largest window a peer may announce: bounds per-stream memory.
pub const MAX_WINDOW: u32 = 64 * 1024 * 1024;
/// Longest command line accepted for exec.
pub const MAX_COMMAND: usize = 32 * 1024;
/// Largest message a client may send on an admin stream (stdin chunk, resize, close).
pub const MAX_CLIENT_MESSAGE: usize = 1024 * 1024;
/// Longest `metadata` query parameter on the console endpoint.
pub const MAX_METADATA: usize = 64 * 1024;
