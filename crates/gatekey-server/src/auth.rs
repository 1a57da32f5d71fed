//! Who is calling: API keys presented as `Authorization: Bearer gka_…`.

use axum::http::HeaderMap;

use crate::api::error::ApiError;
use crate::secret;
use crate::state::AppState;
use crate::store::{ApiKey, User, now_ms};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: User,
    pub key_id: String,
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

/// Checks the request's API key.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let token = bearer(headers).ok_or_else(|| {
        ApiError::unauthenticated(
            "missing API key: send Authorization: Bearer <key> (gatekey-admin login, or --api-key)",
        )
    })?;
    let wrong = || ApiError::unauthenticated("invalid API key");
    let presented = secret::parse(token)
        .filter(|p| p.prefix == secret::API_KEY_PREFIX)
        .ok_or_else(wrong)?;
    let (key, user): (ApiKey, User) = state
        .store
        .api_key(presented.lookup_id)
        .await?
        .ok_or_else(wrong)?;
    if !presented.matches(&key.key_hash) {
        return Err(wrong());
    }
    if key.revoked_at.is_some() {
        return Err(ApiError::unauthenticated(format!(
            "API key {:?} was revoked",
            key.name
        )));
    }
    if key.expires_at.is_some_and(|t| t <= now_ms()) {
        return Err(ApiError::unauthenticated(format!(
            "API key {:?} has expired",
            key.name
        )));
    }
    Ok(Caller {
        user,
        key_id: key.id,
    })
}
