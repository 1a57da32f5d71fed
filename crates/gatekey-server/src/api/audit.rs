//! Reading the audit log: list with filters, verify the chain, export as
//! JSON lines. See docs/api.md "Audit log".

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use crate::auth::Caller;
use crate::authz::Action;
use crate::state::AppState;
use crate::store::{AuditFilter, Verification};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    before: Option<i64>,
}

fn parse_time(what: &str, s: &str) -> ApiResult<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            ApiError::invalid(format!(
                "invalid {what} {s:?}: use an RFC 3339 time like 2026-11-23T10:00:00Z"
            ))
        })
}

impl AuditQuery {
    fn filter(&self) -> ApiResult<AuditFilter> {
        let nonempty = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
        if let Some(a) = &self.action
            && (a.len() > 64
                || !a
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_'))
        {
            return Err(ApiError::invalid(format!(
                "invalid action {a:?}: e.g. session, session.closed, auth.failed"
            )));
        }
        Ok(AuditFilter {
            action: nonempty(&self.action),
            agent: nonempty(&self.agent),
            user: nonempty(&self.user),
            since_ms: self
                .since
                .as_deref()
                .map(|s| parse_time("since", s))
                .transpose()?,
            until_ms: self
                .until
                .as_deref()
                .map(|s| parse_time("until", s))
                .transpose()?,
            before_seq: self.before,
            after_seq: None,
        })
    }
}

/// `GET /api/v1/audit`
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&caller, Action::ReadAudit, None).await?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let items = state.store.list_audit(&q.filter()?, limit, false).await?;
    let next_before = (items.len() as i64 == limit)
        .then(|| items.last().map(|r| r.seq))
        .flatten();
    Ok(Json(
        serde_json::json!({ "items": items, "next_before": next_before }),
    ))
}

/// `GET /api/v1/audit/verify`
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Verification>> {
    state.authorize(&caller, Action::ReadAudit, None).await?;
    Ok(Json(state.store.verify_audit().await?))
}

/// `GET /api/v1/audit/export`: JSON lines, oldest first, read a page at a
/// time so memory stays flat however long the log.
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Response> {
    state.authorize(&caller, Action::ReadAudit, None).await?;
    let filter = q.filter()?;
    let pages = futures_util::stream::unfold(
        (state, filter, false),
        |(state, mut filter, done)| async move {
            if done {
                return None;
            }
            match state.store.list_audit(&filter, 1000, true).await {
                Ok(items) if items.is_empty() => None,
                Ok(items) => {
                    let mut out = Vec::with_capacity(items.len() * 400);
                    for r in &items {
                        if serde_json::to_writer(&mut out, r).is_ok() {
                            out.push(b'\n');
                        }
                    }
                    let last = items.len() < 1000;
                    filter.after_seq = items.last().map(|r| r.seq);
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(out)),
                        (state, filter, last),
                    ))
                }
                Err(e) => Some((
                    Err(std::io::Error::other(e.to_string())),
                    (state, filter, true),
                )),
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(pages),
    )
        .into_response())
}
