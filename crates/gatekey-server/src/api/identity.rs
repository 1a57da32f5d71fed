//! Users, API keys, `whoami`, and password login for the CLI and web UI.
//! See docs/api.md "Users, roles and scopes".

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult, parse_body};
use super::format_time;
use crate::auth::{Caller, SESSION_COOKIE};
use crate::authz::{Action, Role, parse_scopes};
use crate::server::RemoteAddr;
use crate::state::AppState;
use crate::store::{ApiKey, NewAuditRecord, User, now_ms};
use crate::{password, secret};

#[derive(Serialize)]
pub struct UserView {
    id: String,
    name: String,
    role: String,
    scopes: Vec<String>,
    has_password: bool,
    created_at: String,
    updated_at: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> UserView {
        UserView {
            id: u.id.clone(),
            name: u.name.clone(),
            role: u.role.clone(),
            scopes: u.scopes.clone(),
            has_password: u.password_hash.is_some(),
            created_at: format_time(u.created_at),
            updated_at: format_time(u.updated_at),
        }
    }
}

#[derive(Serialize)]
pub struct KeyView {
    id: String,
    user: String,
    name: String,
    prefix: String,
    scopes: Vec<String>,
    kind: String,
    created_at: String,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    last_used_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

fn key_view(k: &ApiKey, user: &User) -> KeyView {
    KeyView {
        id: k.id.clone(),
        user: user.name.clone(),
        name: k.name.clone(),
        prefix: format!("{}{}", secret::API_KEY_PREFIX, k.id),
        scopes: k.scopes.clone(),
        kind: k.kind.clone(),
        created_at: format_time(k.created_at),
        expires_at: k.expires_at.map(format_time),
        revoked_at: k.revoked_at.map(format_time),
        last_used_at: k.last_used_at.map(format_time),
        key: None,
    }
}

fn validate_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "invalid user name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -, not starting with -"
        )))
    }
}

fn validate_role(role: &str) -> ApiResult<()> {
    Role::parse(role).map(drop).ok_or_else(|| {
        ApiError::invalid(format!(
            "invalid role {role:?}: use admin, operator or viewer"
        ))
    })
}

fn validate_scopes(scopes: &[String]) -> ApiResult<()> {
    parse_scopes(scopes).map(drop).map_err(ApiError::invalid)
}

async fn hash_password(pw: String) -> ApiResult<String> {
    password::check(&pw).map_err(ApiError::invalid)?;
    tokio::task::spawn_blocking(move || password::hash(&pw))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::internal)
}

async fn find_user(state: &AppState, name: &str) -> ApiResult<User> {
    state
        .store
        .find_user(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no user named {name:?}")))
}

// ---- users ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    name: String,
    role: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    password: Option<String>,
}

pub async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    state.authorize(&caller, Action::ManageUsers, None).await?;
    let req: CreateUser = parse_body(&body)?;
    validate_name(&req.name)?;
    validate_role(&req.role)?;
    validate_scopes(&req.scopes)?;
    let password_hash = match req.password {
        Some(pw) => Some(hash_password(pw).await?),
        None => None,
    };
    let now = now_ms();
    let user = User {
        id: format!("u_{}", secret::random_hex(8)),
        name: req.name,
        role: req.role,
        scopes: req.scopes,
        password_hash,
        created_at: now,
        updated_at: now,
    };
    state.store.create_user(&user).await?;
    state
        .audit(
            NewAuditRecord::new("user.created")
                .by(&caller)
                .detail(serde_json::json!({"name": user.name, "role": user.role, "scopes": user.scopes, "password": user.password_hash.is_some()})),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(UserView::from(&user))))
}

pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&caller, Action::ManageUsers, None).await?;
    let users: Vec<UserView> = state
        .store
        .list_users()
        .await?
        .iter()
        .map(UserView::from)
        .collect();
    Ok(Json(serde_json::json!({ "items": users })))
}

pub async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<UserView>> {
    if caller.user.name != name {
        state.authorize(&caller, Action::ManageUsers, None).await?;
    }
    Ok(Json(UserView::from(&find_user(&state, &name).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// Absent: unchanged; null: removed; a string: set.
    #[serde(default, deserialize_with = "double_option")]
    password: Option<Option<String>>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

pub async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<UserView>> {
    let req: UpdateUser = parse_body(&body)?;
    let only_own_password = caller.user.name == name && req.role.is_none() && req.scopes.is_none();
    if !only_own_password {
        state.authorize(&caller, Action::ManageUsers, None).await?;
    } else if !caller.key.scopes.is_empty() {
        // A password logs in to keys without the key's limits.
        return Err(ApiError::forbidden(
            "a key limited by scopes may not change a password: use an unrestricted key",
        ));
    }
    let mut user = find_user(&state, &name).await?;
    let mut changed = serde_json::Map::new();
    let req_changes_role_or_scopes = req.role.is_some() || req.scopes.is_some();
    if let Some(role) = req.role {
        validate_role(&role)?;
        if user.role == "admin" && role != "admin" && state.store.admin_count().await? <= 1 {
            return Err(ApiError::conflict(format!(
                "{name} is the last admin: make another user admin first"
            )));
        }
        changed.insert("role".into(), role.clone().into());
        user.role = role;
    }
    if let Some(scopes) = req.scopes {
        validate_scopes(&scopes)?;
        changed.insert("scopes".into(), scopes.clone().into());
        user.scopes = scopes;
    }
    let password = match req.password {
        Some(Some(pw)) => {
            changed.insert("password".into(), "set".into());
            Some(Some(hash_password(pw).await?))
        }
        Some(None) => {
            changed.insert("password".into(), "removed".into());
            Some(None)
        }
        None => None,
    };
    // Only the columns asked for are written, so a slow password change
    // cannot put back a role or scopes an admin changed meanwhile.
    if req_changes_role_or_scopes {
        state.store.update_user(&user).await?;
    }
    if let Some(hash) = password {
        state
            .store
            .set_user_password(&user.id, hash.as_deref())
            .await?;
    }
    state
        .audit(
            NewAuditRecord::new("user.updated")
                .by(&caller)
                .detail(serde_json::json!({"name": name, "changed": changed})),
        )
        .await?;
    let user = find_user(&state, &name).await?;
    Ok(Json(UserView::from(&user)))
}

pub async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.authorize(&caller, Action::ManageUsers, None).await?;
    let user = find_user(&state, &name).await?;
    if user.role == "admin" && state.store.admin_count().await? <= 1 {
        return Err(ApiError::conflict(format!(
            "{name} is the last admin and cannot be deleted"
        )));
    }
    state.store.delete_user(&user.id).await?;
    state
        .audit(
            NewAuditRecord::new("user.deleted")
                .by(&caller)
                .detail(serde_json::json!({"name": name, "role": user.role})),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- API keys ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    expires_in_seconds: Option<u64>,
    #[serde(default)]
    scopes: Vec<String>,
}

/// Longest lifetime a key may be given (about ten years).
const MAX_KEY_SECONDS: u64 = 10 * 366 * 86400;

/// Mints a key for `user` and records it; returns the view with the secret.
async fn mint_key(
    state: &AppState,
    caller_record: NewAuditRecord,
    user: &User,
    name: String,
    kind: &str,
    expires_in_ms: Option<i64>,
    scopes: Vec<String>,
) -> ApiResult<KeyView> {
    let secret = secret::generate(secret::API_KEY_PREFIX);
    let now = now_ms();
    let key = ApiKey {
        id: secret.lookup_id,
        user_id: user.id.clone(),
        name,
        key_hash: secret.hash,
        scopes,
        kind: kind.into(),
        created_at: now,
        expires_at: expires_in_ms.map(|ms| now + ms),
        revoked_at: None,
        last_used_at: None,
    };
    state.store.create_api_key(&key).await?;
    state
        .audit(caller_record.detail(serde_json::json!({
            "id": key.id, "name": key.name, "user": user.name, "kind": kind,
            "scopes": key.scopes, "expires_at": key.expires_at.map(format_time),
        })))
        .await?;
    let mut view = key_view(&key, user);
    view.key = Some(secret.token);
    Ok(view)
}

pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<KeyView>)> {
    let req: CreateKey = parse_body(&body)?;
    let user_name = req.user.unwrap_or_else(|| caller.user.name.clone());
    if user_name != caller.user.name {
        state.authorize(&caller, Action::ManageUsers, None).await?;
    }
    let user = find_user(&state, &user_name).await?;
    let name = req.name.unwrap_or_else(|| "api".into());
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "a key name must be 1-64 printable characters",
        ));
    }
    validate_scopes(&req.scopes)?;
    let expires = match req.expires_in_seconds {
        Some(0) => return Err(ApiError::invalid("expires_in_seconds must be positive")),
        Some(s) if s > MAX_KEY_SECONDS => {
            return Err(ApiError::invalid(format!(
                "expires_in_seconds must be at most {MAX_KEY_SECONDS}"
            )));
        }
        Some(s) => Some(s as i64 * 1000),
        None => None,
    };
    // A key may not mint a key wider or longer-lived than itself: scoped
    // callers pass their key's scopes on, and no key outlives its maker.
    let mut scopes = req.scopes;
    if !caller.key.scopes.is_empty() {
        if scopes.is_empty() {
            scopes = caller.key.scopes.clone();
        } else if let Some(wider) = scopes.iter().find(|s| !caller.key.scopes.contains(s)) {
            return Err(ApiError::forbidden(format!(
                "this key is limited to {} and may not make a key for {wider}",
                caller.key.scopes.join(" ")
            )));
        }
    }
    let expires = match caller.key.expires_at {
        Some(end) => {
            let left = (end - crate::store::now_ms()).max(1);
            Some(expires.map_or(left, |e| e.min(left)))
        }
        None => expires,
    };
    let record = NewAuditRecord::new("apikey.created").by(&caller);
    let view = mint_key(&state, record, &user, name, "api", expires, scopes).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Deserialize)]
pub struct KeyQuery {
    #[serde(default)]
    user: Option<String>,
}

pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let is_admin = caller.role.allows(Action::ManageUsers);
    let user_id = match (&q.user, is_admin) {
        (Some(name), true) => Some(find_user(&state, name).await?.id),
        (None, true) => None,
        (Some(name), false) if *name != caller.user.name => {
            state.authorize(&caller, Action::ManageUsers, None).await?;
            Some(find_user(&state, name).await?.id)
        }
        (_, false) => Some(caller.user.id.clone()),
    };
    let items: Vec<KeyView> = state
        .store
        .list_api_keys(user_id.as_deref())
        .await?
        .iter()
        .map(|(k, u)| key_view(k, u))
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = id
        .strip_prefix(secret::API_KEY_PREFIX)
        .unwrap_or(&id)
        .to_string();
    let not_found = || {
        ApiError::not_found(format!(
            "no API key {id:?}: see `gatekey-admin apikey list`"
        ))
    };
    let (key, owner) = state.store.api_key(&id).await?.ok_or_else(not_found)?;
    if owner.id != caller.user.id {
        if !caller.role.allows(Action::ManageUsers) {
            // Someone else's key is not even there for a non-admin.
            return Err(not_found());
        }
        state.authorize(&caller, Action::ManageUsers, None).await?;
    }
    if key.revoked_at.is_some() {
        return Err(ApiError::conflict(format!(
            "API key {id} is already revoked"
        )));
    }
    state.store.revoke_api_key(&id).await?;
    state
        .audit(
            NewAuditRecord::new("apikey.revoked")
                .by(&caller)
                .detail(serde_json::json!({"id": id, "name": key.name, "user": owner.name})),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn whoami(caller: Caller) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "user": UserView::from(&caller.user),
        "key": key_view(&caller.key, &caller.user),
        "via": if caller.by_cookie { "cookie" } else { "api_key" },
    }))
}

// ---- login ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
    /// The web console's sign-in with an API key: the key becomes the
    /// session cookie as it is (no new key is minted).
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    client: Option<String>,
}

/// A valid hash to check against when the user does not exist, so the
/// answer takes as long as for a wrong password.
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| password::hash("not a password of anyone").unwrap_or_default())
}

pub async fn login(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let addr = req.extensions().get::<RemoteAddr>().map(|a| a.0);
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .map_err(|_| ApiError::invalid("the request body is too large"))?;
    let body: Login = parse_body(&body)?;
    let web = match body.client.as_deref() {
        None | Some("cli") => false,
        Some("web") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "client must be cli or web, not {other:?}"
            )));
        }
    };
    if web {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if origin.is_some_and(|o| !state.config.origin_allowed(o, host)) {
            return Err(ApiError::forbidden("cross-origin login refused"));
        }
    }
    let (user_name, given_password) = match (body.user, body.password, body.key) {
        (None, None, Some(key)) if web => return login_with_key(&state, &key, addr).await,
        (None, None, Some(_)) => {
            return Err(ApiError::invalid(
                "signing in with an API key is for the web console (client: web); other clients send the key itself",
            ));
        }
        (Some(user), Some(password), None) => (user, password),
        _ => {
            return Err(ApiError::invalid(
                "send user and password, or (for the web console) key",
            ));
        }
    };
    let user = state.store.find_user(&user_name).await?;
    let stored = user
        .as_ref()
        .and_then(|u| u.password_hash.clone())
        .unwrap_or_else(|| dummy_hash().to_string());
    let pw = given_password;
    let ok = tokio::task::spawn_blocking(move || password::verify(&pw, &stored))
        .await
        .unwrap_or(false);
    let user = match user {
        Some(u) if ok && u.password_hash.is_some() => u,
        _ => {
            state
                .audit_after(NewAuditRecord {
                    user: Some(user_name.clone()),
                    remote_addr: addr.map(|a| a.to_string()),
                    ..NewAuditRecord::new("auth.failed")
                        .outcome("denied")
                        .detail(serde_json::json!({"reason": "invalid user or password", "client": if web {"web"} else {"cli"}}))
                })
                .await;
            return Err(ApiError::unauthenticated("invalid user or password"));
        }
    };
    let record = NewAuditRecord {
        user: Some(user.name.clone()),
        remote_addr: addr.map(|a| a.to_string()),
        ..NewAuditRecord::new("auth.login")
    };
    let ttl = state.config.login_key_ttl.as_millis() as i64;
    let view = mint_key(
        &state,
        record,
        &user,
        if web { "web login" } else { "login" }.into(),
        "login",
        (ttl > 0).then_some(ttl),
        vec![],
    )
    .await?;
    if !web {
        return Ok((StatusCode::CREATED, Json(view)).into_response());
    }
    let token = view.key.clone().unwrap_or_default();
    let max_age = state.config.login_key_ttl.as_secs();
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={max_age}"
    );
    let mut response = Json(serde_json::json!({
        "user": UserView::from(&user),
        "key": KeyView { key: None, ..view },
    }))
    .into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    Ok(response)
}

/// `POST /api/v1/login` `{"key","client":"web"}`: checks the key as any
/// request's would be (a wrong, revoked or expired key is `401`, audited
/// `auth.failed`) and sets it as the session cookie, for as long as the key
/// lives and at most `login_key_ttl`. Logging out clears the cookie but does
/// not revoke such a key.
async fn login_with_key(
    state: &AppState,
    key: &str,
    addr: Option<std::net::SocketAddr>,
) -> ApiResult<Response> {
    let key = key.trim();
    let mut headers = HeaderMap::new();
    let bearer = secret::parse(key)
        .filter(|p| p.prefix == secret::API_KEY_PREFIX)
        .and_then(|_| HeaderValue::from_str(&format!("Bearer {key}")).ok());
    let Some(bearer) = bearer else {
        state
            .audit_after(NewAuditRecord {
                remote_addr: addr.map(|a| a.to_string()),
                ..NewAuditRecord::new("auth.failed")
                    .outcome("denied")
                    .detail(serde_json::json!({"reason": "invalid API key", "client": "web"}))
            })
            .await;
        return Err(ApiError::unauthenticated("invalid API key"));
    };
    headers.insert(header::AUTHORIZATION, bearer);
    let caller = crate::auth::authenticate(state, &headers, addr).await?;
    let prefix = format!("{}{}", secret::API_KEY_PREFIX, caller.key.id);
    state
        .audit(NewAuditRecord::new("auth.login").by(&caller).detail(
            serde_json::json!({"method": "api_key", "key": prefix, "key_name": caller.key.name, "client": "web"}),
        ))
        .await?;
    let ttl = state.config.login_key_ttl.as_secs();
    let left = caller
        .key
        .expires_at
        .map(|t| ((t - now_ms()).max(0) / 1000) as u64);
    let max_age = match (left, ttl) {
        (Some(l), 0) => Some(l),
        (Some(l), t) => Some(l.min(t)),
        (None, 0) => None,
        (None, t) => Some(t),
    };
    let mut cookie = format!("{SESSION_COOKIE}={key}; HttpOnly; Secure; SameSite=Strict; Path=/");
    if let Some(s) = max_age {
        cookie.push_str(&format!("; Max-Age={s}"));
    }
    let mut response = Json(serde_json::json!({
        "user": UserView::from(&caller.user),
        "key": key_view(&caller.key, &caller.user),
    }))
    .into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    Ok(response)
}

pub async fn logout(
    State(state): State<AppState>,
    caller: Caller,
    _headers: HeaderMap,
) -> ApiResult<Response> {
    if caller.key.kind == "login" && state.store.revoke_api_key(&caller.key.id).await? {
        state
            .audit(
                NewAuditRecord::new("apikey.revoked")
                    .by(&caller)
                    .detail(serde_json::json!({"id": caller.key.id, "name": caller.key.name, "user": caller.user.name, "why": "logout"})),
            )
            .await?;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "gatekey_session=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    Ok(response)
}
