//! Node registration per type: `/api/v1/gateways`, `/api/v1/mesh/hubs`,
//! `/api/v1/mesh/spokes`, `/api/v1/devices`. Creating a node mints its agent
//! token, shown once.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use gatekey_proto::names;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult, parse_body};
use super::format_time;
use crate::agent_link::close;
use crate::auth::Caller;
use crate::authz::{Action, Target};
use crate::secret;
use crate::state::AppState;
use crate::store::{NewAuditRecord, Node, NodeType, now_ms};
use bytes::Bytes;

pub fn routes(t: NodeType) -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(move |s: State<AppState>, c: Caller| list(t, s, c))
                .post(move |s: State<AppState>, c: Caller, b: Bytes| create(t, s, c, b)),
        )
        .route(
            "/{reference}",
            get(move |s: State<AppState>, c: Caller, p: Path<String>| get_one(t, s, c, p))
                .patch(
                    move |s: State<AppState>, c: Caller, p: Path<String>, b: Bytes| {
                        update(t, s, c, p, b)
                    },
                )
                .delete(move |s: State<AppState>, c: Caller, p: Path<String>| delete(t, s, c, p)),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNode {
    name: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    session_enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateNode {
    session_enabled: Option<bool>,
}

#[derive(Serialize)]
pub struct NodeView {
    id: String,
    name: String,
    #[serde(rename = "type")]
    node_type: &'static str,
    session_enabled: bool,
    created_at: String,
    connected: bool,
    last_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

fn view(n: &Node, connected: bool) -> NodeView {
    NodeView {
        id: n.id.clone(),
        name: n.name.clone(),
        node_type: n.node_type.as_str(),
        session_enabled: n.session_enabled,
        created_at: format_time(n.created_at),
        connected,
        last_seen: if connected {
            Some(format_time(now_ms()))
        } else {
            n.last_seen_at.map(format_time)
        },
        token: None,
    }
}

async fn find(t: NodeType, state: &AppState, reference: &str) -> ApiResult<Node> {
    names::validate("name or id", reference).map_err(ApiError::invalid)?;
    state
        .store
        .find_node(reference)
        .await?
        .filter(|n| n.node_type == t)
        .ok_or_else(|| {
            ApiError::not_found(format!("no {} named or with id {reference:?}", t.as_str()))
        })
}

async fn create(
    t: NodeType,
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<NodeView>)> {
    state.authorize(&caller, Action::ManageNodes, None).await?;
    let req: CreateNode = parse_body(&body)?;
    names::validate("name", &req.name).map_err(ApiError::invalid)?;
    let id = match req.id {
        Some(id) => {
            names::validate("id", &id).map_err(ApiError::invalid)?;
            id
        }
        None => secret::random_hex(4),
    };
    let token = secret::generate(t.token_prefix());
    let now = now_ms();
    let node = Node {
        id,
        name: req.name,
        node_type: t,
        token_lookup: token.lookup_id,
        token_hash: token.hash,
        session_enabled: req.session_enabled.unwrap_or(true),
        created_at: now,
        updated_at: now,
        last_seen_at: None,
        last_addr: None,
        agent_version: None,
        hostname: None,
        agent_session_enabled: None,
    };
    state.store.create_node(&node).await?;
    state
        .audit(
            NewAuditRecord::new("node.created")
                .by(&caller)
                .agent(&node.name)
                .detail(serde_json::json!({"type": t.as_str(), "id": node.id, "session_enabled": node.session_enabled})),
        )
        .await?;
    tracing::info!(node = %node.name, id = %node.id, r#type = t.as_str(), "node created");
    let mut v = view(&node, false);
    v.token = Some(token.token);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn list(
    t: NodeType,
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&caller, Action::List, None).await?;
    let connected = state.connected_agents().await;
    let items: Vec<NodeView> = state
        .store
        .list_nodes(Some(t))
        .await?
        .iter()
        .filter(|n| caller.reach.allows(Target::Node(n.node_type, &n.name)))
        .map(|n| view(n, connected.contains_key(&n.id)))
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn get_one(
    t: NodeType,
    State(state): State<AppState>,
    caller: Caller,
    Path(reference): Path<String>,
) -> ApiResult<Json<NodeView>> {
    let node = find(t, &state, &reference).await?;
    state
        .authorize(&caller, Action::List, Some(Target::Node(t, &node.name)))
        .await?;
    let connected = state.connected_agent(&node.id).await.is_some();
    Ok(Json(view(&node, connected)))
}

async fn update(
    t: NodeType,
    State(state): State<AppState>,
    caller: Caller,
    Path(reference): Path<String>,
    body: Bytes,
) -> ApiResult<Json<NodeView>> {
    state.authorize(&caller, Action::ManageNodes, None).await?;
    let req: UpdateNode = parse_body(&body)?;
    let mut node = find(t, &state, &reference).await?;
    if let Some(enabled) = req.session_enabled {
        state.store.set_node_session(&node.id, enabled).await?;
        state
            .audit(
                NewAuditRecord::new("node.updated")
                    .by(&caller)
                    .agent(&node.name)
                    .detail(serde_json::json!({"type": t.as_str(), "session_enabled": enabled, "was": node.session_enabled})),
            )
            .await?;
        node.session_enabled = enabled;
        tracing::info!(node = %node.name, id = %node.id, enabled, "control-plane session switch changed");
    }
    let connected = state.connected_agent(&node.id).await.is_some();
    Ok(Json(view(&node, connected)))
}

async fn delete(
    t: NodeType,
    State(state): State<AppState>,
    caller: Caller,
    Path(reference): Path<String>,
) -> ApiResult<StatusCode> {
    state.authorize(&caller, Action::ManageNodes, None).await?;
    let node = find(t, &state, &reference).await?;
    state.store.delete_node(&node.id).await?;
    state
        .audit(
            NewAuditRecord::new("node.deleted")
                .by(&caller)
                .agent(&node.name)
                .detail(serde_json::json!({"type": t.as_str(), "id": node.id})),
        )
        .await?;
    if let Some(conn) = state.registry.remove(&node.id) {
        conn.mux
            .close(close::NODE_DELETED, "node deleted on the control plane");
    } else if let Some(cluster) = &state.cluster {
        // Its link may be held by another replica.
        let _ = cluster
            .ask_agent(
                &node.id,
                crate::cluster::agent_op::DROP,
                state.config.request_timeout,
            )
            .await;
    }
    tracing::info!(node = %node.name, id = %node.id, "node deleted; its token no longer works");
    Ok(StatusCode::NO_CONTENT)
}
