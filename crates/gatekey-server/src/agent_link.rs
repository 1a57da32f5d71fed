//! `GET /ws/agent`: where agents dial in. Authenticates the token, refuses a
//! second live connection for the same node, runs the hello/welcome
//! handshake and keeps the agent in the registry while its link lives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::link::{self, Frame, Hello, Welcome, control::Msg};
use gatekey_proto::mux::{Mux, MuxConfig, Side};
use gatekey_proto::{limits, names};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::api::error::{ApiError, ApiResult};
use crate::registry::AgentConn;
use crate::server::RemoteAddr;
use crate::state::AppState;
use crate::store::{AgentSeen, NewAuditRecord, Node, Note, now_ms};
use crate::ws::{self, ServerWs};
use crate::{auth, secret};

/// WebSocket close codes the control plane uses on agent links.
pub mod close {
    /// The hello does not match the token's node (name or type).
    pub const IDENTITY: u16 = 4003;
    /// The node was deleted on the control plane.
    pub const NODE_DELETED: u16 = 4004;
    /// Another live connection holds the node, or this one was replaced.
    pub const DUPLICATE: u16 = 4009;
    /// No link protocol version in common.
    pub const VERSION: u16 = 4010;
    /// The control plane is shutting down.
    pub const GOING_AWAY: u16 = 1001;
}

pub async fn upgrade(State(state): State<AppState>, req: Request) -> Response {
    match upgrade_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn upgrade_inner(state: AppState, req: Request) -> ApiResult<Response> {
    let addr = req
        .extensions()
        .get::<RemoteAddr>()
        .map(|a| a.0)
        .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
    match upgrade_checked(&state, req, addr).await {
        Err(e) if e.status == axum::http::StatusCode::UNAUTHORIZED => {
            state
                .audit_after(NewAuditRecord {
                    remote_addr: Some(addr.to_string()),
                    ..NewAuditRecord::new("auth.failed")
                        .outcome("denied")
                        .detail(serde_json::json!({"who": "agent", "reason": e.message}))
                })
                .await;
            Err(e)
        }
        other => other,
    }
}

async fn upgrade_checked(
    state: &AppState,
    mut req: Request,
    addr: SocketAddr,
) -> ApiResult<Response> {
    let token = auth::bearer(req.headers()).ok_or_else(|| {
        ApiError::unauthenticated("missing agent token: set `token` in the agent config")
    })?;
    let invalid = || {
        ApiError::unauthenticated("invalid agent token: the node was deleted or the token is wrong")
    };
    let presented = secret::parse(token).ok_or_else(invalid)?;
    let node = state
        .store
        .node_by_token_lookup(presented.lookup_id)
        .await?
        .filter(|n| {
            presented.matches(&n.token_hash) && presented.prefix == n.node_type.token_prefix()
        })
        .ok_or_else(|| {
            tracing::warn!(%addr, "agent refused: invalid token");
            invalid()
        })?;

    // One live link per node: a newcomer replaces the holder only once the
    // holder fails to answer a ping, so two copies of an agent never flap.
    if let Some(holder) = state.registry.get(&node.id) {
        if holder.mux.probe(state.config.liveness_probe_timeout).await {
            tracing::warn!(agent = %node.name, %addr, holder = %holder.remote_addr, "second connection for a live agent refused");
            return Err(ApiError::conflict(format!(
                "agent {} is already connected from {} and still answers; refusing a second connection with the same token",
                node.name, holder.remote_addr
            )));
        }
        tracing::info!(agent = %node.name, old = %holder.remote_addr, new = %addr, "previous link is dead; replacing it");
        holder
            .mux
            .close(close::DUPLICATE, "replaced by a new connection");
        state.registry.remove_conn(&node.id, holder.conn_id);
    }
    let claim = match &state.cluster {
        Some(cluster) => Some(claim_link(state, cluster, &node, addr).await?),
        None => None,
    };

    let up = ws::prepare(&mut req, &[])?;
    let response = up.response();
    let state = state.clone();
    tokio::spawn(async move {
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(64 * 1024)
            .max_message_size(Some(limits::MAX_LINK_MESSAGE))
            .max_frame_size(Some(limits::MAX_LINK_MESSAGE));
        match up.into_ws(config).await {
            Ok(ws) => serve(state, node, addr, ws, claim).await,
            Err(e) => tracing::warn!(%addr, error = %e, "agent WebSocket upgrade failed"),
        }
    });
    Ok(response)
}

/// Across replicas, one link per node is settled in the database: the claim
/// is atomic, and a claim held elsewhere is taken over only once its holder
/// says its link is dead, nobody listens for the agent any more, or the
/// holder's lease has run out.
async fn claim_link(
    state: &AppState,
    cluster: &crate::cluster::Cluster,
    node: &Node,
    addr: SocketAddr,
) -> ApiResult<LinkClaim> {
    let store = &state.store;
    let conn_id = state.registry.next_conn_id();
    let link = crate::lease::link_id(&state.instance, conn_id);
    let now = store.clock_ms().await?;
    let claim = |link: String| LinkClaim {
        store: store.clone(),
        node_id: node.id.clone(),
        link,
        conn_id,
    };
    let Some(holder) = store
        .claim_agent(&node.id, &state.instance, &link, now)
        .await?
    else {
        return Ok(claim(link));
    };
    let lease_cutoff = now - state.config.replica_timeout.as_millis() as i64;
    // This replica's own earlier link was settled by the check above.
    let take_over = holder.instance == state.instance
        || {
            let wait = state.config.liveness_probe_timeout + std::time::Duration::from_secs(1);
            match cluster
                .ask_agent(&node.id, crate::cluster::agent_op::PROBE, wait)
                .await
            {
                Ok(answer) if answer.as_ref() == b"alive" => {
                    tracing::warn!(agent = %node.name, %addr, "second connection for an agent live on another replica refused");
                    return Err(ApiError::conflict(format!(
                        "agent {} is already connected to another control-plane replica and still answers; refusing a second connection with the same token",
                        node.name
                    )));
                }
                // Its holder found it dead and closed it.
                Ok(_) => true,
                // Nobody listens for it: its holder is gone, unless it is
                // still between claiming and listening (the handshake).
                Err(crate::bus::BusError::NoResponders(_)) => {
                    let settle = state.config.handshake_timeout + std::time::Duration::from_secs(2);
                    now - holder.claimed_at > settle.as_millis() as i64
                        || !store.instance_live(&holder.instance, lease_cutoff).await?
                }
                Err(e) => {
                    if store.instance_live(&holder.instance, lease_cutoff).await? {
                        return Err(ApiError::conflict(format!(
                            "agent {} is held by another control-plane replica that cannot be asked whether its link is alive ({e}); refusing a second connection with the same token until it answers or its lease runs out",
                            node.name
                        )));
                    }
                    true
                }
            }
        };
    if take_over
        && store
            .take_agent_claim(&node.id, &holder.link, &state.instance, &link, now)
            .await?
    {
        tracing::info!(agent = %node.name, %addr, previous = %holder.link, "took over the agent's link claim");
        return Ok(claim(link));
    }
    Err(ApiError::conflict(format!(
        "agent {} is connecting through another control-plane replica at this moment; refusing a second connection with the same token",
        node.name
    )))
}

/// This replica's claim on an agent's link; released when dropped.
struct LinkClaim {
    store: crate::store::Store,
    node_id: String,
    link: String,
    conn_id: u64,
}

impl Drop for LinkClaim {
    fn drop(&mut self) {
        let (store, node_id, link) = (
            self.store.clone(),
            std::mem::take(&mut self.node_id),
            std::mem::take(&mut self.link),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release_agent(&node_id, &link).await {
                    tracing::warn!(error = %e, "cannot release an agent link claim; it lapses with this replica's lease");
                }
            });
        }
    }
}

async fn close_ws(mut ws: ServerWs, code: u16, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.chars().take(120).collect::<String>().into(),
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), ws.close(Some(frame))).await;
}

async fn read_hello(state: &AppState, ws: &mut ServerWs) -> Result<Hello, String> {
    let first = tokio::time::timeout(state.config.handshake_timeout, ws.next())
        .await
        .map_err(|_| format!("no hello within {:?}", state.config.handshake_timeout))?;
    match first {
        Some(Ok(Message::Binary(raw))) => match link::decode(raw) {
            Ok(Frame::Control(Msg::Hello(h))) => Ok(h),
            Ok(_) => Err("expected a hello".into()),
            Err(e) => Err(format!("malformed hello: {e}")),
        },
        Some(Ok(_)) => Err("expected a binary hello".into()),
        Some(Err(e)) => Err(format!("read failed: {e}")),
        None => Err("closed before the hello".into()),
    }
}

async fn serve(
    state: AppState,
    node: Node,
    addr: SocketAddr,
    mut ws: ServerWs,
    claim: Option<LinkClaim>,
) {
    let hello = match read_hello(&state, &mut ws).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(agent = %node.name, %addr, "agent handshake failed: {e}");
            close_ws(ws, CloseCode::Protocol.into(), &e).await;
            return;
        }
    };
    if let Err(e) = names::validate("agent name", &hello.name) {
        close_ws(ws, close::IDENTITY, &e).await;
        return;
    }
    if hello.name != node.name {
        let msg = format!(
            "this token belongs to node {:?}; set `name: {}` in the agent config",
            node.name, node.name
        );
        tracing::warn!(agent = %hello.name, %addr, "agent refused: {msg}");
        close_ws(ws, close::IDENTITY, &msg).await;
        return;
    }
    if !hello.agent_type.is_empty() && hello.agent_type != node.node_type.as_str() {
        let msg = format!(
            "this token is for a {}, but the agent says it is a {}",
            node.node_type.as_str(),
            hello.agent_type
        );
        tracing::warn!(agent = %node.name, %addr, "agent refused: {msg}");
        close_ws(ws, close::IDENTITY, &msg).await;
        return;
    }
    // Free text from the agent is stored and logged: keep it short and printable.
    let printable = |s: &str| {
        s.chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect::<String>()
    };
    let hello = Hello {
        hostname: printable(&hello.hostname),
        agent_version: printable(&hello.agent_version),
        ..hello
    };
    let Some(version) = link::negotiate(hello.min_version, hello.max_version) else {
        let msg = format!(
            "agent speaks link protocol {}..={}, this control plane {}..={}",
            hello.min_version,
            hello.max_version,
            link::MIN_VERSION,
            link::MAX_VERSION
        );
        tracing::warn!(agent = %node.name, %addr, "agent refused: {msg}");
        close_ws(ws, close::VERSION, &msg).await;
        return;
    };
    let cfg = &state.config;
    let welcome = Welcome {
        version,
        agent_id: node.id.clone(),
        server_version: gatekey_proto::VERSION.into(),
        heartbeat_interval_ms: cfg.heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
        max_message_bytes: limits::MAX_LINK_MESSAGE as u32,
    };
    if ws
        .send(Message::Binary(link::encode_control(Msg::Welcome(welcome))))
        .await
        .is_err()
    {
        return;
    }

    let mux_config = MuxConfig {
        recv_window: cfg.stream_window,
        heartbeat_interval: cfg.heartbeat_interval,
        heartbeat_timeout: cfg.heartbeat_timeout,
        ..MuxConfig::default()
    };
    let (mux, _) = Mux::start(ws, mux_config, Side::Opener);
    let conn = Arc::new(AgentConn {
        conn_id: claim
            .as_ref()
            .map_or_else(|| state.registry.next_conn_id(), |c| c.conn_id),
        node_id: node.id.clone(),
        name: node.name.clone(),
        node_type: node.node_type,
        mux: mux.clone(),
        remote_addr: addr,
        connected_at: now_ms(),
        version: hello.agent_version.clone(),
        hostname: hello.hostname.clone(),
        session_enabled: hello.session_enabled,
        link_version: version,
        capabilities: hello.capabilities.clone(),
    });
    if let Err(holder) = state.registry.insert(conn.clone()) {
        mux.close(
            close::DUPLICATE,
            &format!(
                "agent {} is already connected from {}",
                node.name, holder.remote_addr
            ),
        );
        return;
    }
    // Other replicas reach this agent through us while its link lives.
    let listener = crate::cluster::listen_agent(&state, conn.clone()).await;
    let seen = AgentSeen {
        addr: &addr.to_string(),
        version: &hello.agent_version,
        hostname: &hello.hostname,
        session_enabled: hello.session_enabled,
    };
    if let Err(e) = state.store.node_seen(&node.id, &seen).await {
        tracing::error!(agent = %node.name, error = %e, "cannot record the agent's connection");
    }
    tracing::info!(
        agent = %node.name, id = %node.id, r#type = node.node_type.as_str(), %addr,
        version = %hello.agent_version, sessions = hello.session_enabled, "agent connected"
    );
    let connected = Instant::now();
    // Should this control plane die with the link, the record of its end is
    // written by whoever notices (crate::lease).
    let link_key = format!(
        "agent:{}",
        crate::lease::link_id(&state.instance, conn.conn_id)
    );
    let lost = agent_record("agent.disconnected", &node, addr).detail(serde_json::json!({
        "type": node.node_type.as_str(),
        "reason": crate::lease::REASON_CONTROL_PLANE_LOST,
        "message": "the control plane holding this agent's link stopped (killed, crashed or its host lost)",
    }));
    let owe = Note::Owe {
        key: &link_key,
        instance: &state.instance,
        closing: &lost,
    };
    state
        .audit_after_noting(
            agent_record("agent.connected", &node, addr).detail(serde_json::json!({
                "type": node.node_type.as_str(),
                "version": hello.agent_version,
                "hostname": hello.hostname,
                "session_enabled": hello.session_enabled,
            })),
            Some(&owe),
        )
        .await;

    let reason = mux.closed().await;
    // Stop answering for it at once: it may already be connecting elsewhere.
    drop(listener);
    state.registry.remove_conn(&node.id, conn.conn_id);
    if let Err(e) = state.store.node_last_seen(&node.id).await {
        tracing::warn!(agent = %node.name, error = %e, "cannot record when the agent was last seen");
    }
    tracing::info!(agent = %node.name, %addr, "agent disconnected: {reason}");
    state
        .audit_after_noting(
            agent_record("agent.disconnected", &node, addr).detail(serde_json::json!({
                "type": node.node_type.as_str(),
                "reason": reason.to_string(),
                "connected_for_ms": connected.elapsed().as_millis() as u64,
            })),
            Some(&Note::Paid { key: &link_key }),
        )
        .await;
}

fn agent_record(action: &str, node: &Node, addr: SocketAddr) -> NewAuditRecord {
    NewAuditRecord {
        remote_addr: Some(addr.to_string()),
        ..NewAuditRecord::new(action).agent(&node.name)
    }
}
