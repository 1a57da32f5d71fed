//! The admin REST API (`/api/v1`) and WebSocket endpoints (`/ws/…`).
//! See docs/api.md.

pub mod agents;
pub mod audit;
pub mod console;
pub mod error;
pub mod exec;
pub mod identity;
pub mod nodes;
pub mod troubleshoot;
pub mod ui;

use axum::Router;
use axum::routing::get;

use crate::agent_link;
use crate::state::AppState;
use crate::store::NodeType;

pub fn router(state: AppState) -> Router {
    Router::new()
        // The web console (docs/api.md "Web console").
        .route("/", get(ui::index))
        .route("/ui/{name}", get(ui::asset))
        .route("/api/v1/version", get(version))
        .route("/api/v1/replicas", get(replicas))
        .route("/api/v1/agents", get(agents::list))
        .route("/api/v1/agents/{reference}", get(agents::get))
        .route(
            "/api/v1/agents/{reference}/exec",
            axum::routing::post(exec::oneshot),
        )
        .route("/ws/v1/agents/{reference}/exec", get(exec::stream))
        .route("/ws/v1/agents/{reference}/console", get(console::console))
        .route("/ws/v1/devices/{reference}/console", get(console::console))
        .route("/api/v1/sessions", get(console::list))
        .route(
            "/api/v1/sessions/{id}",
            axum::routing::delete(console::kill),
        )
        .route(
            "/api/v1/users",
            get(identity::list_users).post(identity::create_user),
        )
        .route(
            "/api/v1/users/{name}",
            get(identity::get_user)
                .patch(identity::update_user)
                .delete(identity::delete_user),
        )
        .route(
            "/api/v1/apikeys",
            get(identity::list_keys).post(identity::create_key),
        )
        .route(
            "/api/v1/apikeys/{id}",
            axum::routing::delete(identity::revoke_key),
        )
        .route("/api/v1/whoami", get(identity::whoami))
        .route("/api/v1/login", axum::routing::post(identity::login))
        .route("/api/v1/logout", axum::routing::post(identity::logout))
        .route(
            "/api/v1/troubleshoot",
            get(troubleshoot::list).post(troubleshoot::run),
        )
        .route("/api/v1/audit", get(audit::list))
        .route("/api/v1/audit/verify", get(audit::verify))
        .route("/api/v1/audit/export", get(audit::export))
        .route("/ws/agent", get(agent_link::upgrade))
        .nest("/api/v1/gateways", nodes::routes(NodeType::Gateway))
        .nest("/api/v1/mesh/hubs", nodes::routes(NodeType::Hub))
        .nest("/api/v1/mesh/spokes", nodes::routes(NodeType::Spoke))
        .nest("/api/v1/devices", nodes::routes(NodeType::Device))
        .fallback(|| async { error::ApiError::not_found("no such endpoint: see docs/api.md") })
        // With replicas: requests for an agent held elsewhere go there.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::proxy::route,
        ))
        .with_state(state)
}

async fn version() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "version": gatekey_proto::VERSION,
        "link_protocol": [gatekey_proto::link::MIN_VERSION, gatekey_proto::link::MAX_VERSION],
    }))
}

/// The control-plane replicas this one hears, itself first (one,
/// `local`, without `bus_url`). Agent counts only for callers who may see
/// every agent.
async fn replicas(
    axum::extract::State(state): axum::extract::State<AppState>,
    caller: crate::auth::Caller,
) -> error::ApiResult<axum::Json<serde_json::Value>> {
    state
        .authorize(&caller, crate::authz::Action::List, None)
        .await?;
    let agents = state.registry.len() as u64;
    let mut items = match &state.cluster {
        Some(c) => c.replicas(agents),
        None => vec![crate::cluster::ReplicaView::this(
            &state.replica_name(),
            agents,
        )],
    };
    if !caller.reach.unrestricted() {
        for r in &mut items {
            r.agents = None;
        }
    }
    let installation = state.store.installation_id().await?;
    Ok(axum::Json(serde_json::json!({
        "installation": installation,
        "items": items,
    })))
}

/// RFC 3339 UTC time from Unix milliseconds.
pub fn format_time(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
