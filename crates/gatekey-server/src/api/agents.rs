//! `GET /api/v1/agents[/{ref}]`: registered nodes with their connection state.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::format_time;
use crate::auth::Caller;
use crate::authz::{Action, Target};
use crate::cluster::AgentInfo;
use crate::state::AppState;
use crate::store::Node;

#[derive(Serialize)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub node_type: &'static str,
    pub connected: bool,
    pub connected_at: Option<String>,
    pub last_seen: Option<String>,
    pub remote_addr: Option<String>,
    pub version: Option<String>,
    pub hostname: Option<String>,
    pub session_enabled: bool,
    pub session_enabled_agent: Option<bool>,
    pub session_enabled_control_plane: bool,
    /// The control-plane replica holding its link (with several replicas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl AgentView {
    pub fn new(node: &Node, conn: Option<&AgentInfo>) -> AgentView {
        let agent_side = conn
            .map(|c| c.session_enabled)
            .or(node.agent_session_enabled);
        AgentView {
            id: node.id.clone(),
            name: node.name.clone(),
            node_type: node.node_type.as_str(),
            connected: conn.is_some(),
            connected_at: conn.map(|c| format_time(c.connected_at)),
            last_seen: if conn.is_some() {
                Some(format_time(crate::store::now_ms()))
            } else {
                node.last_seen_at.map(format_time)
            },
            remote_addr: conn
                .map(|c| c.remote_addr.clone())
                .or_else(|| node.last_addr.clone()),
            version: conn
                .map(|c| c.version.clone())
                .or_else(|| node.agent_version.clone()),
            hostname: conn
                .map(|c| c.hostname.clone())
                .or_else(|| node.hostname.clone()),
            session_enabled: node.session_enabled && agent_side == Some(true),
            session_enabled_agent: agent_side,
            session_enabled_control_plane: node.session_enabled,
            replica: conn.map(|c| c.replica.clone()).filter(|r| !r.is_empty()),
        }
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    connected: Option<bool>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&caller, Action::List, None).await?;
    let nodes = state.store.list_nodes(None).await?;
    let conns: HashMap<String, AgentInfo> = state.connected_agents().await;
    let items: Vec<AgentView> = nodes
        .iter()
        .filter(|n| caller.reach.allows(Target::Node(n.node_type, &n.name)))
        .map(|n| AgentView::new(n, conns.get(&n.id)))
        .filter(|a| !q.connected.unwrap_or(false) || a.connected)
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(reference): Path<String>,
) -> ApiResult<Json<AgentView>> {
    let node =
        state.store.find_node(&reference).await?.ok_or_else(|| {
            ApiError::not_found(format!("no agent named or with id {reference:?}"))
        })?;
    state
        .authorize(
            &caller,
            Action::List,
            Some(Target::Node(node.node_type, &node.name)),
        )
        .await?;
    let conn = state.connected_agent(&node.id).await;
    Ok(Json(AgentView::new(&node, conn.as_ref())))
}
