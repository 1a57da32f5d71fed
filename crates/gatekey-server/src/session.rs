//! Finding the agent a session is for and opening a stream on its link,
//! with every refusal turned into one clear API error.

use std::sync::Arc;

use gatekey_proto::channel::{self, Status};
use gatekey_proto::link::{Accept, Exec, Exit, Open, RejectCode, exit, open};
use gatekey_proto::mux::{OpenError, Stream};
use gatekey_proto::names;

use crate::api::error::{ApiError, ApiResult};
use crate::api::format_time;
use crate::auth::Caller;
use crate::authz::{self, Action};
use crate::live::{Kind, Live};
use crate::registry::AgentConn;
use crate::state::AppState;
use crate::store::NewAuditRecord;
use crate::store::Node;

/// A connected agent that may run sessions.
pub struct Target {
    pub node: Node,
    pub conn: Arc<AgentConn>,
}

/// Resolves a node name or id to a connected agent whose sessions are allowed
/// on both sides, once the caller is known to be allowed `action` on it (so
/// a refused caller learns nothing about the node's state).
pub async fn resolve(
    state: &AppState,
    caller: &Caller,
    action: Action,
    reference: &str,
) -> ApiResult<Target> {
    names::validate("agent name or id", reference).map_err(ApiError::invalid)?;
    let node = state.store.find_node(reference).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no agent named or with id {reference:?}: see `gatekey-admin session list`"
        ))
    })?;
    state
        .authorize(
            caller,
            action,
            Some(authz::Target::Node(node.node_type, &node.name)),
        )
        .await?;
    let Some(conn) = state.registry.get(&node.id) else {
        let when = match node.last_seen_at {
            Some(t) => format!(
                "last seen {}",
                format_time(t).replace('T', " ").replace('Z', " UTC")
            ),
            None => "it has never connected".to_string(),
        };
        return Err(ApiError::not_connected(format!(
            "agent {} is not connected ({when})",
            node.name
        )));
    };
    if !node.session_enabled {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "sessions_disabled_control_plane",
            format!(
                "remote sessions are disabled for {} on the control plane: enable them with `gatekey-admin {} update {} --session=true`",
                node.name,
                node.node_type.cli_noun(),
                node.id
            ),
        ));
    }
    if !conn.session_enabled {
        return Err(sessions_disabled_agent(&node.name));
    }
    Ok(Target { node, conn })
}

fn sessions_disabled_agent(name: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "sessions_disabled_agent",
        format!(
            "remote sessions are disabled in the agent's config on {name}: set `session_enabled: true` there and restart the agent"
        ),
    )
}

/// Opens an exec stream on the target's link.
pub async fn open_exec(
    state: &AppState,
    target: &Target,
    exec: Exec,
    user: &str,
) -> ApiResult<(Stream, Accept)> {
    open_stream(state, target, open::Kind::Exec(exec), user).await
}

/// Opens a stream of any kind on the target's link.
pub async fn open_stream(
    state: &AppState,
    target: &Target,
    kind: open::Kind,
    user: &str,
) -> ApiResult<(Stream, Accept)> {
    let open = Open {
        user: user.to_string(),
        kind: Some(kind),
        ..Default::default()
    };
    let name = &target.node.name;
    target
        .conn
        .mux
        .open(open, state.config.session_open_timeout)
        .await
        .map_err(|e| match e {
            OpenError::Rejected { code, message } => match code {
                RejectCode::SessionsDisabled => sessions_disabled_agent(name),
                RejectCode::TooManySessions => {
                    ApiError::conflict(format!("agent {name} refused the session: {message}"))
                }
                RejectCode::SpawnFailed => ApiError::agent_error(format!(
                    "agent {name} could not start the command: {message}"
                )),
                RejectCode::Invalid | RejectCode::Unsupported => {
                    ApiError::invalid(format!("agent {name} refused the session: {message}"))
                }
                RejectCode::Unspecified => {
                    ApiError::agent_error(format!("agent {name} refused the session: {message}"))
                }
            },
            OpenError::Timeout(t) => ApiError::agent_timeout(format!(
                "agent {name} did not accept the session within {}s",
                t.as_secs()
            )),
            OpenError::LinkClosed(r) | OpenError::Cancelled(r) => {
                ApiError::not_connected(format!("agent {name} went away: {r}"))
            }
        })
}

/// Records `session.opened`; the session must not start unless it is written.
pub async fn record_opened(
    state: &AppState,
    caller: &Caller,
    live: &Live,
    mode: &str,
) -> ApiResult<()> {
    state
        .audit(
            NewAuditRecord::new("session.opened")
                .by(caller)
                .agent(&live.agent)
                .session(&live.id)
                .detail(serde_json::json!({
                    "kind": live.kind,
                    "mode": mode,
                    "command": live.command,
                })),
        )
        .await
}

/// Records that a session recorded as opened could not start.
pub async fn record_open_failed(state: &AppState, caller: &Caller, live: &Live, error: &ApiError) {
    state
        .audit_after(
            NewAuditRecord::new("session.closed")
                .by(caller)
                .outcome("failed")
                .agent(&live.agent)
                .session(&live.id)
                .detail(serde_json::json!({
                    "kind": live.kind,
                    "command": live.command,
                    "reason": error.code,
                    "message": error.message,
                    "duration_ms": crate::store::now_ms() - live.started_at_ms,
                })),
        )
        .await;
}

/// What a new session on `target` looks like in the live table.
pub fn new_session(
    state: &AppState,
    caller: &Caller,
    target: &Target,
    kind: Kind,
    command: Option<String>,
    size: Option<(u16, u16)>,
) -> crate::live::NewSession {
    crate::live::NewSession {
        id: caller.session_id.clone(),
        kind,
        agent: target.node.name.clone(),
        agent_id: target.node.id.clone(),
        node_type: target.node.node_type,
        opened_by: caller.user.name.clone(),
        opened_from: caller.addr.map(|a| a.to_string()),
        command,
        size,
        close_timeout: state.config.request_timeout,
    }
}

/// Builds an exec request from a shell command line.
pub fn shell_exec(command: &str, timeout_secs: Option<u64>, stdin: bool) -> ApiResult<Exec> {
    names::validate_command(command).map_err(ApiError::invalid)?;
    Ok(Exec {
        shell_command: command.to_string(),
        stdin,
        timeout_ms: timeout_ms(timeout_secs)?,
        ..Default::default()
    })
}

/// Builds an exec request from an argument vector.
pub fn argv_exec(argv: Vec<String>, timeout_secs: Option<u64>, stdin: bool) -> ApiResult<Exec> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ApiError::invalid("command must not be empty"));
    }
    let total: usize = argv.iter().map(|a| a.len() + 1).sum();
    if total > gatekey_proto::limits::MAX_COMMAND || argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::invalid(
            "command is too long or contains a NUL byte",
        ));
    }
    Ok(Exec {
        argv,
        stdin,
        timeout_ms: timeout_ms(timeout_secs)?,
        ..Default::default()
    })
}

/// Longest timeout a request may ask for.
const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

fn timeout_ms(secs: Option<u64>) -> ApiResult<u32> {
    match secs {
        None | Some(0) => Ok(0),
        Some(s) if s > MAX_TIMEOUT_SECS => Err(ApiError::invalid(format!(
            "timeout must be at most {MAX_TIMEOUT_SECS} seconds"
        ))),
        // Above u32 milliseconds (49 days) cannot happen given the cap.
        Some(s) => Ok((s * 1000).min(u32::MAX as u64) as u32),
    }
}

/// The Kubernetes status for a process's end.
pub fn exit_status(x: &Exit) -> Status {
    if x.timed_out {
        return Status::failure(
            channel::REASON_TIMEOUT,
            "command timed out; its process group was killed",
        );
    }
    match x.status {
        Some(exit::Status::Code(0)) => Status::success(),
        Some(exit::Status::Code(c)) => Status::exit(c, None),
        Some(exit::Status::Signal(s)) => Status::exit(128 + s, Some(s)),
        None => Status::failure(
            channel::REASON_INTERNAL,
            format!("the agent reported no exit status: {}", x.message),
        ),
    }
}
