//! Exec: streaming over the admin stream protocol (`GET /ws/v1/agents/{ref}/exec`)
//! and one-shot for scripts (`POST /api/v1/agents/{ref}/exec`).

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gatekey_proto::channel::{self, Metadata};
use gatekey_proto::limits;
use gatekey_proto::link::{CH_STDERR, CH_STDIN, CH_STDOUT, Exec, exit};
use gatekey_proto::mux::Event;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::error::{ApiError, ApiResult};
use crate::audit::{Capture, OutputCapture};
use crate::auth::{Caller, authenticate, check_origin};
use crate::authz::Action;
use crate::live::{Kind, Role};
use crate::relay::{self, Command, Participant};
use crate::server::RemoteAddr;
use crate::state::AppState;
use crate::store::NewAuditRecord;
use crate::{session, ws};

/// `GET /ws/v1/agents/{ref}/exec?metadata=…`
pub async fn stream(
    State(state): State<AppState>,
    Path(reference): Path<String>,
    req: Request,
) -> Response {
    match stream_inner(state, reference, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn stream_inner(state: AppState, reference: String, mut req: Request) -> ApiResult<Response> {
    let addr = req.extensions().get::<RemoteAddr>().map(|a| a.0);
    let mut caller = authenticate(&state, req.headers(), addr).await?;
    caller.session_id = req
        .extensions()
        .get::<crate::cluster::Proxied>()
        .map(|p| p.session_id.clone());
    check_origin(&state, req.headers(), &caller, false).await?;
    let exec = exec_from_query(req.uri().query().unwrap_or(""))?;
    let up = ws::prepare(&mut req, &channel::PROTOCOLS)?;
    let target = session::resolve(&state, &caller, Action::Exec, &reference).await?;
    let command = Some(exec_display(&exec));
    let (registration, commands) = state
        .sessions
        .register(session::new_session(
            &state,
            &caller,
            &target,
            Kind::Exec,
            command,
            None,
        ))
        .map_err(|_| ApiError::internal("exec sessions are never exclusive"))?;
    let live = registration.live.clone();
    session::record_opened(&state, &caller, &live, "exclusive").await?;
    let (stream, accept) = match session::open_exec(&state, &target, exec, &caller.user.name).await
    {
        Ok(x) => x,
        Err(e) => {
            session::record_open_failed(&state, &caller, &live, &e).await;
            return Err(e);
        }
    };
    tracing::info!(agent = %target.node.name, user = %caller.user.name, pid = accept.pid, session = %live.id, "exec session opened");
    let v5 = up.protocol == Some(channel::V5);
    let response = up.response();
    tokio::spawn(async move {
        match up.into_ws(client_ws_config()).await {
            Ok(ws) => {
                let first = Participant {
                    user: caller.user.name.clone(),
                    role: Role::Interactive,
                    addr,
                    ws,
                    v5,
                };
                relay::run(state, registration, stream, first, commands).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "exec WebSocket upgrade failed");
                let e = ApiError::internal(format!("the WebSocket upgrade failed: {e}"));
                session::record_open_failed(&state, &caller, &live, &e).await;
            }
        }
    });
    Ok(response)
}

/// WebSocket settings for admin clients.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(limits::MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(limits::MAX_CLIENT_MESSAGE))
}

/// The command line of an exec, for `session active`.
pub fn exec_display(exec: &Exec) -> String {
    if exec.argv.is_empty() {
        exec.shell_command.clone()
    } else {
        exec.argv.join(" ")
    }
}

/// Reads the command from `metadata` (JSON) or repeated `command=` parameters.
fn exec_from_query(query: &str) -> ApiResult<Exec> {
    let mut metadata: Option<Metadata> = None;
    let mut argv = Vec::new();
    let mut stdin_param = None;
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
            "command" => argv.push(v.into_owned()),
            "stdin" => stdin_param = Some(v == "true" || v == "1"),
            _ => {}
        }
    }
    let m = metadata.unwrap_or_default();
    if m.tty {
        return Err(ApiError::invalid(
            "tty sessions use the console endpoint /ws/v1/agents/{name}/console",
        ));
    }
    // As in Kubernetes, stdin is off unless asked for: a client that never
    // sends it must not leave the remote stdin open forever.
    let stdin = m.stdin.or(stdin_param).unwrap_or(false);
    match (m.shell, m.command) {
        (Some(shell), None) if argv.is_empty() => {
            session::shell_exec(&shell, m.timeout_seconds, stdin)
        }
        (None, Some(cmd)) if argv.is_empty() => {
            let mut v = vec![cmd.command];
            v.extend(cmd.args);
            session::argv_exec(v, m.timeout_seconds, stdin)
        }
        (None, None) if !argv.is_empty() => session::argv_exec(argv, m.timeout_seconds, stdin),
        (None, None) => Err(ApiError::invalid(
            "no command: pass metadata={\"shell\":\"CMD\"} or command=… parameters",
        )),
        _ => Err(ApiError::invalid(
            "give exactly one of metadata.shell, metadata.command or command= parameters",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    command: String,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    stdin: Option<String>,
}

#[derive(Serialize, Default)]
pub struct ExecResponse {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    duration_ms: u64,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

/// `POST /api/v1/agents/{ref}/exec`
pub async fn oneshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(reference): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ExecResponse>> {
    let req: ExecRequest = super::error::parse_body(&body)?;
    let exec = session::shell_exec(&req.command, req.timeout_seconds, req.stdin.is_some())?;
    let target = session::resolve(&state, &caller, Action::Exec, &reference).await?;
    // In the live table like any session, so `session kill` can end it.
    let (registration, mut commands) = state
        .sessions
        .register(session::new_session(
            &state,
            &caller,
            &target,
            Kind::Exec,
            Some(req.command.clone()),
            None,
        ))
        .map_err(|_| ApiError::internal("exec sessions are never exclusive"))?;
    let live = registration.live.clone();
    session::record_opened(&state, &caller, &live, "oneshot").await?;
    let started = Instant::now();
    let (mut stream, _) = match session::open_exec(&state, &target, exec, &caller.user.name).await {
        Ok(x) => x,
        Err(e) => {
            session::record_open_failed(&state, &caller, &live, &e).await;
            return Err(e);
        }
    };

    // Feed stdin concurrently: it may wait for credit while output must keep draining.
    let feeder = req.stdin.map(|input| {
        let handle = stream.handle();
        tokio::spawn(async move {
            if handle.send_data(CH_STDIN, Bytes::from(input)).await.is_ok() {
                let _ = handle.send_eof(CH_STDIN).await;
            }
        })
    });
    let limit = state.config.exec_output_limit;
    let deadline = req
        .timeout_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s) + state.config.exec_grace);
    let mut out = ExecResponse::default();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let collect = async {
        loop {
            let event = tokio::select! {
                event = stream.next() => match event {
                    Some(e) => e,
                    None => break,
                },
                Some(command) = commands.recv() => {
                    if let Command::End { message, .. } = command {
                        stream.handle().cancel(&message).await;
                        return Err(ApiError::new(StatusCode::CONFLICT, "session_ended", message));
                    }
                    continue;
                }
            };
            match event {
                Event::Data(d) => {
                    live.bytes_out.fetch_add(d.len() as u64, Ordering::Relaxed);
                    let (buf, truncated) = match d.channel() {
                        CH_STDOUT => (&mut stdout, &mut out.stdout_truncated),
                        CH_STDERR => (&mut stderr, &mut out.stderr_truncated),
                        _ => {
                            stream.consumed(d.len());
                            continue;
                        }
                    };
                    let payload = d.payload();
                    let room = limit.saturating_sub(buf.len());
                    buf.extend_from_slice(&payload[..payload.len().min(room)]);
                    *truncated |= payload.len() > room;
                    stream.consumed(payload.len());
                }
                Event::Exit(x) => {
                    out.timed_out = x.timed_out;
                    match x.status {
                        Some(exit::Status::Code(c)) => out.exit_code = Some(c),
                        Some(exit::Status::Signal(s)) => out.signal = Some(s),
                        None => {}
                    }
                    return Ok(());
                }
                Event::Cancelled(r) | Event::LinkClosed(r) => {
                    return Err(ApiError::not_connected(format!(
                        "agent {} went away during the command: {r}",
                        target.node.name
                    )));
                }
                _ => {}
            }
        }
        Err(ApiError::internal("session ended without an exit status"))
    };
    let result = match deadline {
        Some(d) => tokio::time::timeout(d, collect).await.unwrap_or_else(|_| {
            Err(ApiError::agent_timeout(format!(
                "agent {} did not report the command's end",
                target.node.name
            )))
        }),
        None => collect.await,
    };
    if let Some(f) = feeder {
        f.abort();
    }
    out.duration_ms = started.elapsed().as_millis() as u64;
    out.stdout = String::from_utf8_lossy(&stdout).into_owned();
    out.stderr = String::from_utf8_lossy(&stderr).into_owned();
    let mut detail = serde_json::json!({
        "kind": "exec",
        "command": req.command,
        "exit_code": out.exit_code,
        "signal": out.signal,
        "timed_out": out.timed_out,
        "duration_ms": out.duration_ms,
        "bytes_in": live.bytes_in.load(Ordering::Relaxed),
        "bytes_out": live.bytes_out.load(Ordering::Relaxed),
    });
    if let Err(e) = &result {
        detail["reason"] = e.code.into();
        detail["message"] = e.message.clone().into();
    } else if state.config.audit_capture == Capture::Full {
        let cap = state.config.audit_output_limit;
        let mut o = OutputCapture::new(cap);
        o.feed(&stdout);
        o.feed(&stderr);
        detail["output"] = o.detail()["output"].clone();
    }
    // On record before the caller hears the result.
    state
        .audit(
            NewAuditRecord::new("session.closed")
                .by(&caller)
                .outcome(if result.is_ok() { "ok" } else { "failed" })
                .agent(&live.agent)
                .session(&live.id)
                .detail(detail),
        )
        .await?;
    drop(registration);
    result?;
    tracing::info!(agent = %target.node.name, user = %caller.user.name, exit = ?out.exit_code, "one-shot exec finished");
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_forms() {
        let q = format!(
            "metadata={}",
            urlencode(r#"{"shell":"ip addr","timeout_seconds":5}"#)
        );
        let e = exec_from_query(&q).unwrap();
        assert_eq!(e.shell_command, "ip addr");
        assert_eq!(e.timeout_ms, 5000);
        assert!(!e.stdin);
        let e = exec_from_query("command=ls&command=-l&stdin=false").unwrap();
        assert_eq!(e.argv, vec!["ls", "-l"]);
        assert!(!e.stdin);
        let q = format!(
            "metadata={}",
            urlencode(r#"{"command":{"command":"ls","args":["-a"]}}"#)
        );
        assert_eq!(exec_from_query(&q).unwrap().argv, vec!["ls", "-a"]);
        assert!(exec_from_query("").is_err());
        assert!(exec_from_query("metadata=%7Bnot").is_err());
        let q = format!("metadata={}", urlencode(r#"{"tty":true,"shell":"x"}"#));
        assert!(exec_from_query(&q).is_err());
    }

    fn urlencode(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }
}
