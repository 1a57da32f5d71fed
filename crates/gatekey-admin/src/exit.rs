//! Exit codes of `gatekey-admin`, one per kind of failure, so scripts can
//! react without parsing messages (documented in docs/cli.md).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (for `session exec` and `session connect`: the remote command's or shell's own exit code; `~.` also exits 0) |
//! | 1 | any other error (agent could not start the process, internal server error, local I/O) |
//! | 2 | usage error (unknown flag, missing argument) |
//! | 124 | the remote command timed out (`--timeout`, default 60s on the agent), or the control plane closed an idle console or one that reached the maximum session duration |
//! | 129 | terminated by SIGHUP (the terminal went away); the session is closed |
//! | 130 | interrupted by SIGINT (Ctrl-C; in a `session connect` terminal Ctrl-C is a key for the remote side instead); the remote process group is killed |
//! | 141 | local stdout closed (broken pipe); the remote process group is killed |
//! | 143 | terminated by SIGTERM; the remote process group is killed |
//! | 240 | control plane unreachable (connection refused, DNS, timeout) |
//! | 241 | control plane's TLS certificate not trusted (pass `--ca-cert FILE`) |
//! | 242 | authentication failed (missing, wrong, expired or revoked API key) |
//! | 243 | permission denied (the key's role or scope) |
//! | 244 | not found (unknown agent or node) |
//! | 245 | the agent is not connected |
//! | 246 | remote sessions disabled in the node's own config |
//! | 247 | remote sessions disabled on the control plane |
//! | 248 | conflict (name or id taken, console busy) |
//! | 249 | the agent did not answer in time |
//! | 250 | session lost (connection dropped before the exit status arrived) |
//! | 251 | invalid argument (rejected by the CLI or the server) |
//! | 252 | session ended by someone else: killed by an administrator (`session kill`) or the console taken over (`session connect --force`); the message says who |
//! | 253 | `audit verify`: the audit log's hash chain is broken (a record was changed, removed or reordered); the message names the first bad record |
//! | 254 | a troubleshooting tool could not run (the host does not resolve, the node lacks a privilege such as ICMP sockets); `1` means it ran and the target did not answer |
//!
//! For `session exec` and `session connect`, a remote exit code that collides with one of these
//! (e.g. a remote `exit 244`) is passed through unchanged, as ssh does; the
//! one-line message on stderr tells the cases apart.

pub const OK: i32 = 0;
pub const FAILURE: i32 = 1;
pub const USAGE: i32 = 2;
pub const REMOTE_TIMEOUT: i32 = 124;
pub const HANGUP: i32 = 129;
pub const INTERRUPTED: i32 = 130;
pub const BROKEN_PIPE: i32 = 141;
pub const TERMINATED: i32 = 143;
pub const UNREACHABLE: i32 = 240;
pub const UNTRUSTED: i32 = 241;
pub const UNAUTHENTICATED: i32 = 242;
pub const FORBIDDEN: i32 = 243;
pub const NOT_FOUND: i32 = 244;
pub const NOT_CONNECTED: i32 = 245;
pub const SESSIONS_DISABLED_AGENT: i32 = 246;
pub const SESSIONS_DISABLED_CONTROL_PLANE: i32 = 247;
pub const CONFLICT: i32 = 248;
pub const AGENT_TIMEOUT: i32 = 249;
pub const SESSION_LOST: i32 = 250;
pub const INVALID_ARGUMENT: i32 = 251;
pub const SESSION_ENDED: i32 = 252;
pub const AUDIT_BROKEN: i32 = 253;
pub const TROUBLESHOOT_FAILED: i32 = 254;
