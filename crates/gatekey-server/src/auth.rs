//! Who is calling and what they may do. Callers present an API key
//! (`Authorization: Bearer gka_…`) or the web UI's `gatekey_session` cookie
//! holding one. Every refusal is audited.

use std::net::SocketAddr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};

use crate::api::error::ApiError;
use crate::authz::{Action, Reach, Role, Target, parse_scopes};
use crate::secret;
use crate::server::RemoteAddr;
use crate::state::{AppState, State};
use crate::store::{ApiKey, NewAuditRecord, User, now_ms};

/// The web UI's session cookie.
pub const SESSION_COOKIE: &str = "gatekey_session";

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: User,
    pub key: ApiKey,
    pub role: Role,
    pub reach: Reach,
    pub addr: Option<SocketAddr>,
    /// Authenticated by the session cookie (a browser), not a header.
    pub by_cookie: bool,
    /// The id a session opened by this request takes (set when another
    /// replica carried the request here).
    pub session_id: Option<String>,
}

impl Caller {
    /// "bob (operator)" for messages.
    pub fn who(&self) -> String {
        format!("user {} ({})", self.user.name, self.role.as_str())
    }
}

/// The bearer token in the request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The session cookie's value, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let addr = parts.extensions.get::<RemoteAddr>().map(|a| a.0);
        let mut caller = authenticate(state, &parts.headers, addr).await?;
        caller.session_id = parts
            .extensions
            .get::<crate::cluster::Proxied>()
            .map(|p| p.session_id.clone());
        // A browser's cookie is sent by any page it visits: a change must
        // come from a page of ours.
        if caller.by_cookie && parts.method != Method::GET && parts.method != Method::HEAD {
            check_origin(state, &parts.headers, &caller, true).await?;
        }
        Ok(caller)
    }
}

/// Checks the request's API key or session cookie.
pub async fn authenticate(
    state: &State,
    headers: &HeaderMap,
    addr: Option<SocketAddr>,
) -> Result<Caller, ApiError> {
    match authenticate_inner(state, headers, addr).await {
        Ok(c) => Ok(c),
        Err((e, key_hint)) => {
            if e.status == StatusCode::UNAUTHORIZED {
                state
                    .audit_after(NewAuditRecord {
                        remote_addr: addr.map(|a| a.to_string()),
                        ..NewAuditRecord::new("auth.failed")
                            .outcome("denied")
                            .detail(serde_json::json!({"reason": e.message, "key": key_hint}))
                    })
                    .await;
            }
            Err(e)
        }
    }
}

async fn authenticate_inner(
    state: &State,
    headers: &HeaderMap,
    addr: Option<SocketAddr>,
) -> Result<Caller, (ApiError, Option<String>)> {
    let (token, by_cookie) = match (bearer(headers), session_cookie(headers)) {
        (Some(t), _) => (t, false),
        (None, Some(c)) => (c, true),
        (None, None) => {
            return Err((
                ApiError::unauthenticated(
                    "missing API key: send Authorization: Bearer <key> (gatekey-admin login, or --api-key)",
                ),
                None,
            ));
        }
    };
    let wrong = || (ApiError::unauthenticated("invalid API key"), None);
    let presented = secret::parse(token)
        .filter(|p| p.prefix == secret::API_KEY_PREFIX)
        .ok_or_else(wrong)?;
    let hint = Some(format!("{}{}", secret::API_KEY_PREFIX, presented.lookup_id));
    let (key, user): (ApiKey, User) = state
        .store
        .api_key(presented.lookup_id)
        .await
        .map_err(|e| (e.into(), None))?
        .ok_or_else(|| (ApiError::unauthenticated("invalid API key"), hint.clone()))?;
    if !presented.matches(&key.key_hash) {
        return Err((ApiError::unauthenticated("invalid API key"), hint));
    }
    if key.revoked_at.is_some() {
        return Err((
            ApiError::unauthenticated(format!("API key {:?} was revoked", key.name)),
            hint,
        ));
    }
    let now = now_ms();
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err((
            ApiError::unauthenticated(format!("API key {:?} has expired", key.name)),
            hint,
        ));
    }
    let role = Role::parse(&user.role).ok_or_else(|| {
        (
            ApiError::internal(format!(
                "user {} has an unknown role {:?}",
                user.name, user.role
            )),
            None,
        )
    })?;
    let reach = Reach {
        user: parse_scopes(&user.scopes).map_err(|e| (ApiError::internal(e), None))?,
        key: parse_scopes(&key.scopes).map_err(|e| (ApiError::internal(e), None))?,
    };
    // Last use, at most once a minute per key, off the request path.
    if key.last_used_at.is_none_or(|t| now - t > 60_000) {
        let store = state.store.clone();
        let id = key.id.clone();
        tokio::spawn(async move {
            let _ = store.touch_api_key(&id, now).await;
        });
    }
    Ok(Caller {
        user,
        key,
        role,
        reach,
        addr,
        by_cookie,
        session_id: None,
    })
}

impl State {
    /// Refuses (403, audited) unless the caller's role allows `action` and,
    /// for a target, its scopes reach it.
    pub async fn authorize(
        &self,
        caller: &Caller,
        action: Action,
        target: Option<Target<'_>>,
    ) -> Result<(), ApiError> {
        let refusal = if action == Action::ManageUsers && !caller.key.scopes.is_empty() {
            Some(format!(
                "{} may not {} with a key limited by scopes",
                caller.who(),
                action.verb()
            ))
        } else if !caller.role.allows(action) {
            Some(format!(
                "{} may not {}: the {} role does not allow it",
                caller.who(),
                action.verb(),
                caller.role.as_str()
            ))
        } else if let Some(t) = target.filter(|t| !caller.reach.allows(*t)) {
            let scopes: Vec<&str> = caller
                .user
                .scopes
                .iter()
                .chain(caller.key.scopes.iter())
                .map(String::as_str)
                .collect();
            Some(format!(
                "{} may not {} on {}: outside its scopes {}",
                caller.who(),
                action.verb(),
                target_name(t),
                scopes.join(" ")
            ))
        } else {
            None
        };
        let Some(message) = refusal else {
            return Ok(());
        };
        let mut record = NewAuditRecord::new("access.denied")
            .by(caller)
            .outcome("denied")
            .detail(serde_json::json!({"action": action.verb(), "reason": message}));
        if let Some(Target::Node(_, name)) = target {
            record = record.agent(name);
        }
        self.audit_after(record).await;
        Err(ApiError::forbidden(message))
    }
}

pub fn target_name(t: Target<'_>) -> String {
    match t {
        Target::Node(ty, name) => format!("{}:{name}", ty.as_str()),
        Target::ControlPlane => crate::authz::CONTROL_PLANE.into(),
    }
}

/// Browsers send `Origin`; a page from elsewhere may not drive our
/// WebSockets or, with a cookie, change anything. Clients that send no
/// Origin are not browsers and pass, unless `required` (cookie changes).
pub async fn check_origin(
    state: &State,
    headers: &HeaderMap,
    caller: &Caller,
    required: bool,
) -> Result<(), ApiError> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let ok = match origin {
        Some(o) => state.config.origin_allowed(o, host),
        None => !required,
    };
    if ok {
        return Ok(());
    }
    let message = format!(
        "cross-origin request refused: origin {} is not this control plane's nor in allowed_origins",
        origin.unwrap_or("(none)")
    );
    state
        .audit_after(
            NewAuditRecord::new("access.denied")
                .by(caller)
                .outcome("denied")
                .detail(serde_json::json!({"reason": message})),
        )
        .await;
    Err(ApiError::forbidden(message))
}
