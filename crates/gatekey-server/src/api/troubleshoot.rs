//! Network troubleshooting from the control plane or any agent:
//! `GET /api/v1/troubleshoot` lists the tools and where they can run;
//! `POST /api/v1/troubleshoot?location=LOC` runs one and answers with JSON
//! lines as it goes (docs/api.md "Troubleshooting").

use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gatekey_diag::{Detached, Event, Limits, Outcome, Request, Tool};
use gatekey_proto::link::{CH_STDOUT, Diag, exit, open};
use gatekey_proto::mux::{Event as StreamEvent, Stream};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::error::{ApiError, ApiResult};
use crate::auth::Caller;
use crate::authz::{Action, CONTROL_PLANE, Target};
use crate::session;
use crate::state::AppState;
use crate::store::{NewAuditRecord, NodeType};

/// Longest event line accepted from an agent.
const MAX_LINE: usize = 64 * 1024;

/// Where a tool runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    ControlPlane,
    Node(NodeType, String),
}

impl Location {
    fn parse(s: Option<&str>) -> ApiResult<Location> {
        let s = s.unwrap_or(CONTROL_PLANE).trim();
        if s.is_empty() || s == CONTROL_PLANE {
            return Ok(Location::ControlPlane);
        }
        let bad = || {
            ApiError::invalid(format!(
                "invalid --location {s:?}: use control-plane, or gateway:ID, hub:ID, spoke:ID or device:ID (a name or an id)"
            ))
        };
        let (t, reference) = s.split_once(':').ok_or_else(bad)?;
        let node_type = NodeType::parse(t).ok_or_else(bad)?;
        if reference.is_empty() {
            return Err(bad());
        }
        Ok(Location::Node(node_type, reference.to_string()))
    }
}

fn limits(state: &AppState) -> Limits {
    Limits {
        max_scan_probes: state.config.troubleshoot_max_probes,
        ..Limits::default()
    }
}

/// `GET /api/v1/troubleshoot`: the tools, and the locations this caller may use.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&caller, Action::List, None).await?;
    let tools: Vec<_> = Tool::ALL
        .iter()
        .map(|t| serde_json::json!({"name": t.name(), "description": t.description()}))
        .collect();
    let may = caller.role.allows(Action::Troubleshoot);
    let mut locations = Vec::new();
    if may && caller.reach.allows(Target::ControlPlane) {
        locations.push(serde_json::json!({"location": CONTROL_PLANE, "label": "Control Plane"}));
    }
    if may {
        let mut conns: Vec<_> = state.connected_agents().await.into_values().collect();
        conns.sort_by(|a, b| (&a.node_type, &a.name).cmp(&(&b.node_type, &b.name)));
        for c in conns {
            let Some(node_type) = NodeType::parse(&c.node_type) else {
                continue;
            };
            if !c.session_enabled
                || !c.capabilities.iter().any(|k| k == "diag")
                || !caller.reach.allows(Target::Node(node_type, &c.name))
            {
                continue;
            }
            let Ok(Some(node)) = state.store.find_node(&c.node_id).await else {
                continue;
            };
            if !node.session_enabled {
                continue;
            }
            let t = node_type.as_str();
            let mut label = format!("{}{}", t[..1].to_uppercase(), &t[1..]);
            label.push_str(": ");
            label.push_str(&c.name);
            locations.push(serde_json::json!({
                "location": format!("{t}:{}", c.node_id),
                "type": t, "id": c.node_id, "name": c.name, "label": label,
            }));
        }
    }
    Ok(Json(
        serde_json::json!({"tools": tools, "locations": locations}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    #[serde(default)]
    location: Option<String>,
}

/// Parses a request body; errors name the tool or the field at fault.
fn parse_request(body: &[u8]) -> ApiResult<Request> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    let tool = value
        .get("tool")
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    if tool.parse::<Tool>().is_err() {
        return Err(ApiError::invalid(format!(
            "unknown tool {tool:?}: use ping, nslookup, traceroute, nc or nmap"
        )));
    }
    serde_json::from_value(value).map_err(|e| {
        let e = e.to_string();
        let e = e.split(" at line ").next().unwrap_or(&e).to_string();
        ApiError::invalid(format!("invalid {tool} request: {e}"))
    })
}

/// How a run ended, for the final line and the audit record.
enum Ending {
    Done(Outcome),
    Failed(String),
    /// The client went away.
    Cancelled,
}

/// `POST /api/v1/troubleshoot?location=LOC`, body: the request JSON.
pub async fn run(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<RunQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let request = parse_request(&body)?;
    let limits = limits(&state);
    request
        .validate(&limits)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let location = Location::parse(q.location.as_deref())?;
    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(16);
    let (label, agent) = match &location {
        Location::ControlPlane => {
            state
                .authorize(&caller, Action::Troubleshoot, Some(Target::ControlPlane))
                .await?;
            let (events_tx, forwarded) = forwarder(lines_tx.clone());
            let run = Detached::start(request.clone(), limits, events_tx);
            // The result line goes after the last event: the run's senders
            // are gone once it finished, so the forwarder drains and ends.
            let work = async move {
                let outcome = run.finish().await.map_err(|e| e.to_string());
                let _ = forwarded.await;
                outcome
            };
            spawn_run(
                state.clone(),
                caller,
                request,
                CONTROL_PLANE.into(),
                None,
                lines_tx,
                Box::pin(work),
            );
            (CONTROL_PLANE.to_string(), None)
        }
        Location::Node(t, reference) => {
            let node = state
                .store
                .find_node(reference)
                .await?
                .filter(|n| n.node_type == *t)
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "no {} named or with id {reference:?}: see `gatekey-admin troubleshoot list`",
                        t.as_str()
                    ))
                })?;
            let target = session::resolve(&state, &caller, Action::Troubleshoot, &node.id).await?;
            if !target.conn.capabilities.iter().any(|k| k == "diag") {
                return Err(ApiError::invalid(format!(
                    "agent {} (version {}) cannot run diagnostics: upgrade it",
                    node.name, target.conn.version
                )));
            }
            let request_json =
                serde_json::to_string(&request).map_err(|e| ApiError::internal(e.to_string()))?;
            let (stream, _) = session::open_stream(
                &state,
                &target,
                open::Kind::Diag(Diag { request_json }),
                &caller.user.name,
            )
            .await?;
            let label = format!("{}:{}", t.as_str(), node.name);
            let work = relay_agent(stream, request.tool(), lines_tx.clone());
            spawn_run(
                state.clone(),
                caller,
                request,
                label.clone(),
                Some(node.name.clone()),
                lines_tx,
                Box::pin(work),
            );
            (label, Some(node.name))
        }
    };
    tracing::info!(location = %label, agent = ?agent, "troubleshoot run started");
    let body = futures_util::stream::unfold(lines_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

type RunFuture = std::pin::Pin<Box<dyn Future<Output = Result<Outcome, String>> + Send>>;

/// Runs `work` (which streams event lines itself), then records the run and
/// sends the final line. A client that goes away cancels the work.
fn spawn_run(
    state: AppState,
    caller: Caller,
    request: Request,
    location: String,
    agent: Option<String>,
    lines: mpsc::Sender<Bytes>,
    work: RunFuture,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        let ending = tokio::select! {
            r = work => match r {
                Ok(o) => Ending::Done(o),
                Err(m) => Ending::Failed(m),
            },
            _ = lines.closed() => Ending::Cancelled,
        };
        let (outcome, result, last) = match &ending {
            Ending::Done(o) => (
                if o.success { "ok" } else { "failed" },
                serde_json::json!({"success": o.success, "summary": o.summary}),
                serde_json::json!({"event": "result", "tool": request.tool().name(), "location": location, "success": o.success, "summary": o.summary}),
            ),
            Ending::Failed(m) => (
                "failed",
                serde_json::json!({"error": m}),
                serde_json::json!({"event": "error", "tool": request.tool().name(), "location": location, "message": m}),
            ),
            Ending::Cancelled => (
                "failed",
                serde_json::json!({"cancelled": true}),
                serde_json::Value::Null,
            ),
        };
        let mut record = NewAuditRecord::new("troubleshoot.run")
            .by(&caller)
            .outcome(outcome)
            .detail(serde_json::json!({
                "tool": request.tool().name(),
                "request": request,
                "location": location,
                "result": result,
                "duration_ms": started.elapsed().as_millis() as u64,
            }));
        if let Some(a) = &agent {
            record = record.agent(a);
        }
        // On record before the caller sees the result.
        if let Err(e) = state.audit(record).await {
            let _ = lines
                .send(line(
                    &serde_json::json!({"event": "error", "message": e.message}),
                ))
                .await;
            return;
        }
        if !last.is_null() {
            let _ = lines.send(line(&last)).await;
        }
    });
}

fn line(v: &impl serde::Serialize) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// Forwards a local run's events as lines; returns the sender the run fills
/// and the task, which ends once every sender is gone and all is forwarded.
fn forwarder(lines: mpsc::Sender<Bytes>) -> (mpsc::Sender<Event>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Event>(16);
    let task = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if lines.send(line(&ev)).await.is_err() {
                return;
            }
        }
    });
    (tx, task)
}

/// Relays an agent's diagnostic stream: event lines (checked to be events,
/// so an agent cannot inject anything else into the answer), then its exit.
async fn relay_agent(
    mut stream: Stream,
    tool: Tool,
    lines: mpsc::Sender<Bytes>,
) -> Result<Outcome, String> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let Some(ev) = stream.next().await else {
            return Err("the agent ended the diagnostic without a result".into());
        };
        match ev {
            StreamEvent::Data(d) => {
                let n = d.len();
                if d.channel() == CH_STDOUT {
                    pending.extend_from_slice(&d.payload());
                    while let Some(at) = pending.iter().position(|&b| b == b'\n') {
                        let raw: Vec<u8> = pending.drain(..=at).collect();
                        let event: Event = serde_json::from_slice(&raw[..at])
                            .map_err(|e| format!("the agent sent an invalid event: {e}"))?;
                        if lines.send(line(&event)).await.is_err() {
                            stream.handle().cancel("the client went away").await;
                            return Err("cancelled".into());
                        }
                    }
                    if pending.len() > MAX_LINE {
                        stream.handle().cancel("event line too long").await;
                        return Err("the agent sent an event line that is too long".into());
                    }
                }
                stream.consumed(n);
            }
            StreamEvent::Exit(x) => {
                let code = match x.status {
                    Some(exit::Status::Code(c)) => c,
                    _ => 2,
                };
                return match code {
                    0 | 1 => Ok(Outcome {
                        tool,
                        success: code == 0,
                        summary: x.message,
                    }),
                    _ => Err(x.message),
                };
            }
            StreamEvent::Cancelled(r) | StreamEvent::LinkClosed(r) => {
                return Err(format!("the agent went away: {r}"));
            }
            StreamEvent::Rejected(r) => return Err(r.message),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(Location::parse(None).unwrap(), Location::ControlPlane);
        assert_eq!(
            Location::parse(Some("control-plane")).unwrap(),
            Location::ControlPlane
        );
        assert_eq!(
            Location::parse(Some("hub:hub-1")).unwrap(),
            Location::Node(NodeType::Hub, "hub-1".into())
        );
        for bad in ["hub", "router:x", "hub:", "spoke"] {
            assert!(Location::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
