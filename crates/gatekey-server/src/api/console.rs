//! Interactive consoles: `GET /ws/v1/agents/{ref}/console` (and the
//! `/ws/v1/devices/{ref}/console` path flightctl's clients use), and the
//! live-session API: `GET /api/v1/sessions`, `DELETE /api/v1/sessions/{id}`.
//!
//! An agent has at most one console. A second client is refused (409) unless
//! it asks to join (`mode=share`), watch (`mode=observe`) or take over
//! (`force=true`). Exec sessions are never blocked by consoles.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gatekey_proto::channel::{self, Metadata, TerminalSize};
use gatekey_proto::limits;
use gatekey_proto::link::Exec;

use super::error::{ApiError, ApiResult};
use super::exec::{client_ws_config, exec_display};
use crate::auth::{Caller, authenticate, check_origin};
use crate::authz::{Action, Target};
use crate::live::{Kind, Live, Role};
use crate::relay::{self, Command, Participant};
use crate::server::RemoteAddr;
use crate::state::AppState;
use crate::store::NewAuditRecord;
use crate::{session, ws};

/// How the client wants to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Exclusive,
    Share,
    Observe,
}

struct ConsoleRequest {
    exec: Exec,
    mode: Mode,
    force: bool,
    size: Option<(u16, u16)>,
}

/// `GET /ws/v1/agents/{ref}/console`
pub async fn console(
    State(state): State<AppState>,
    Path(reference): Path<String>,
    req: Request,
) -> Response {
    match console_inner(state, reference, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn console_inner(
    state: AppState,
    reference: String,
    mut req: Request,
) -> ApiResult<Response> {
    let addr = req.extensions().get::<RemoteAddr>().map(|a| a.0);
    let mut caller = authenticate(&state, req.headers(), addr).await?;
    caller.session_id = req
        .extensions()
        .get::<crate::cluster::Proxied>()
        .map(|p| p.session_id.clone());
    check_origin(&state, req.headers(), &caller, false).await?;
    let wanted = parse_query(req.uri().query().unwrap_or(""))?;
    let up = ws::prepare(&mut req, &channel::PROTOCOLS)?;
    let target = session::resolve(&state, &caller, Action::Console, &reference).await?;
    let user = caller.user.name.clone();
    let v5 = up.protocol == Some(channel::V5);
    let agent = target.node.name.clone();

    // Join, refuse or take over an open console.
    if let Some(open) = state.sessions.console_of(&target.node.id) {
        match (wanted.mode, wanted.force) {
            (Mode::Share | Mode::Observe, _) => {
                let cap = state.config.console_max_participants;
                if open.participants.lock().expect("participants lock").len() >= cap {
                    return Err(ApiError::conflict(format!(
                        "the console on {agent} already has {cap} participants, the most allowed (console_max_participants)"
                    )));
                }
                let role = if wanted.mode == Mode::Observe {
                    Role::Observe
                } else {
                    Role::Interactive
                };
                let response = up.response();
                tokio::spawn(async move {
                    match up.into_ws(client_ws_config()).await {
                        Ok(ws) => {
                            let p = Participant {
                                user,
                                role,
                                addr,
                                ws,
                                v5,
                            };
                            if let Err(Command::Join(p)) = open.command(Command::Join(Box::new(p)))
                            {
                                relay::refuse_late(*p, state.config.request_timeout).await;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "console WebSocket upgrade failed"),
                    }
                });
                return Ok(response);
            }
            (Mode::Exclusive, true) => take_over(&state, &open, &caller).await?,
            (Mode::Exclusive, false) => return Err(busy(&agent, &open)),
        }
    } else if wanted.mode == Mode::Observe {
        return Err(ApiError::not_found(format!(
            "no console is open on {agent} to observe"
        )));
    }

    let command = (!wanted.exec.argv.is_empty() || !wanted.exec.shell_command.is_empty())
        .then(|| exec_display(&wanted.exec));
    let (registration, commands) = state
        .sessions
        .register(session::new_session(
            &state,
            &caller,
            &target,
            Kind::Console,
            command,
            wanted.size,
        ))
        // Another client opened one between our check and now.
        .map_err(|open| busy(&agent, &open))?;
    let live = registration.live.clone();
    session::record_opened(&state, &caller, &live, "exclusive").await?;
    let (stream, accept) = match session::open_exec(&state, &target, wanted.exec, &user).await {
        Ok(x) => x,
        Err(e) => {
            session::record_open_failed(&state, &caller, &live, &e).await;
            return Err(e);
        }
    };
    tracing::info!(%agent, %user, pid = accept.pid, session = %live.id, "console opened");
    let response = up.response();
    tokio::spawn(async move {
        match up.into_ws(client_ws_config()).await {
            Ok(ws) => {
                let first = Participant {
                    user,
                    role: Role::Interactive,
                    addr,
                    ws,
                    v5,
                };
                relay::run(state, registration, stream, first, commands).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "console WebSocket upgrade failed");
                let e = ApiError::internal(format!("the WebSocket upgrade failed: {e}"));
                session::record_open_failed(&state, &caller, &live, &e).await;
            }
        }
    });
    Ok(response)
}

/// Ends `open`, telling its participants who took over, and waits for it to go.
async fn take_over(state: &AppState, open: &Live, caller: &Caller) -> ApiResult<()> {
    let user = &caller.user.name;
    tracing::info!(session = %open.id, agent = %open.agent, %user, "console taken over");
    state
        .audit(
            NewAuditRecord::new("session.taken_over")
                .by(caller)
                .agent(&open.agent)
                .session(&open.id)
                .detail(serde_json::json!({"kind": open.kind, "from": open.holders()})),
        )
        .await?;
    let _ = open.command(Command::End {
        reason: channel::REASON_TAKEN_OVER,
        message: format!("{user} took over this console"),
    });
    let wait = state.config.request_timeout;
    tokio::time::timeout(wait, open.wait_ended())
        .await
        .map_err(|_| {
            ApiError::agent_timeout(format!(
                "the console on {} did not end within {}s",
                open.agent,
                wait.as_secs()
            ))
        })
}

fn busy(agent: &str, open: &Live) -> ApiError {
    ApiError::conflict(format!(
        "a console on {agent} is already open by {} since {}: join it with --share, watch it with --observe, or take it over with --force",
        open.holders(),
        super::format_time(open.started_at_ms)
            .replace('T', " ")
            .replace('Z', " UTC")
    ))
}

fn parse_query(query: &str) -> ApiResult<ConsoleRequest> {
    let mut metadata: Option<Metadata> = None;
    let mut mode = Mode::Exclusive;
    let mut force = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "metadata" => {
                if v.len() > limits::MAX_METADATA {
                    return Err(ApiError::invalid("metadata is too long"));
                }
                metadata = Some(
                    serde_json::from_str(&v)
                        .map_err(|e| ApiError::invalid(format!("invalid metadata JSON: {e}")))?,
                );
            }
            "mode" => {
                mode = match &*v {
                    "" | "exclusive" => Mode::Exclusive,
                    "share" | "shared" => Mode::Share,
                    "observe" => Mode::Observe,
                    other => {
                        return Err(ApiError::invalid(format!(
                            "mode must be share or observe, not {other:?}"
                        )));
                    }
                }
            }
            "force" => force = v == "true" || v == "1",
            _ => {}
        }
    }
    if force && mode != Mode::Exclusive {
        return Err(ApiError::invalid(
            "force takes the console over; it cannot be combined with mode=share or mode=observe",
        ));
    }
    // A console is a terminal unless the client says otherwise.
    let m = metadata.unwrap_or(Metadata {
        tty: true,
        ..Default::default()
    });
    let size = m
        .initial_dimensions
        .filter(|d| d.width > 0 && d.height > 0)
        .map(|TerminalSize { width, height }| (width, height));
    let mut exec = match m.command.filter(|c| !c.command.is_empty()) {
        Some(c) => {
            let mut argv = vec![c.command];
            argv.extend(c.args);
            session::argv_exec(argv, m.timeout_seconds, true)?
        }
        None => match m.shell {
            Some(cmd) => session::shell_exec(&cmd, m.timeout_seconds, true)?,
            // The node's shell.
            None => Exec {
                stdin: true,
                ..Default::default()
            },
        },
    };
    if m.tty {
        exec.tty = true;
        exec.term = m
            .term
            .filter(|t| !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "xterm-256color".into());
        if let Some((w, h)) = size {
            exec.cols = w as u32;
            exec.rows = h as u32;
        }
    }
    Ok(ConsoleRequest {
        exec,
        mode,
        force,
        size,
    })
}

/// `GET /api/v1/sessions`
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&caller, Action::List, None).await?;
    let mut sessions: Vec<serde_json::Value> = state
        .sessions
        .list()
        .iter()
        .filter(|l| caller.reach.allows(Target::Node(l.node_type, &l.agent)))
        .filter_map(|l| serde_json::to_value(l.snapshot()).ok())
        .collect();
    if let Some(cluster) = &state.cluster {
        let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
        sessions.extend(cluster.remote_sessions().await.into_iter().filter(|v| {
            crate::store::NodeType::parse(&field(v, "agent_type"))
                .is_some_and(|t| caller.reach.allows(Target::Node(t, &field(v, "agent"))))
        }));
        sessions.sort_by_key(|v| (field(v, "started_at"), field(v, "id")));
    }
    Ok(Json(serde_json::json!({ "sessions": sessions })))
}

/// `DELETE /api/v1/sessions/{id}`
pub async fn kill(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let live = state
        .sessions
        .get(&id)
        .filter(|l| caller.reach.allows(Target::Node(l.node_type, &l.agent)))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no live session {id:?}: see `gatekey-admin session active`"
            ))
        })?;
    state
        .authorize(
            &caller,
            Action::KillSession,
            Some(Target::Node(live.node_type, &live.agent)),
        )
        .await?;
    state
        .audit(
            NewAuditRecord::new("session.killed")
                .by(&caller)
                .agent(&live.agent)
                .session(&live.id)
                .detail(serde_json::json!({"kind": live.kind, "users": live.holders()})),
        )
        .await?;
    tracing::info!(session = %live.id, agent = %live.agent, user = %caller.user.name, "session killed");
    let _ = live.command(Command::End {
        reason: channel::REASON_KILLED,
        message: format!("session killed by {}", caller.user.name),
    });
    let wait = state.config.request_timeout;
    tokio::time::timeout(wait, live.wait_ended())
        .await
        .map_err(|_| {
            ApiError::agent_timeout(format!(
                "session {id} was told to end but had not ended within {}s",
                wait.as_secs()
            ))
        })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    #[test]
    fn defaults_to_a_tty_shell() {
        let r = parse_query("").unwrap();
        assert!(r.exec.tty && r.exec.argv.is_empty() && r.exec.shell_command.is_empty());
        assert_eq!(r.exec.term, "xterm-256color");
        assert_eq!(r.mode, Mode::Exclusive);
    }

    #[test]
    fn flightctl_metadata() {
        let q = format!(
            "metadata={}&mode=observe",
            enc(
                r#"{"tty":true,"term":"xterm","command":{"command":"top","args":["-b"]},"initialDimensions":{"Width":120,"Height":40}}"#
            )
        );
        let r = parse_query(&q).unwrap();
        assert_eq!(r.exec.argv, vec!["top", "-b"]);
        assert_eq!((r.exec.cols, r.exec.rows), (120, 40));
        assert_eq!(r.exec.term, "xterm");
        assert_eq!(r.mode, Mode::Observe);
        let r = parse_query(&format!("metadata={}", enc(r#"{"tty":false}"#))).unwrap();
        assert!(!r.exec.tty);
    }

    #[test]
    fn bad_queries_are_refused() {
        assert!(parse_query("mode=steal").is_err());
        assert!(parse_query("mode=share&force=true").is_err());
        assert!(parse_query("metadata=%7B").is_err());
    }
}
