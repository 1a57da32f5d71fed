//! Server side of the WebSocket upgrade (RFC 6455), done by hand so each
//! endpoint can refuse with a proper HTTP status and JSON body *before*
//! upgrading, and choose the subprotocol itself.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::api::error::ApiError;

pub type ServerWs = WebSocketStream<TokioIo<Upgraded>>;

/// A validated upgrade request, not yet answered.
pub struct Upgrade {
    on_upgrade: OnUpgrade,
    accept: String,
    pub protocol: Option<&'static str>,
}

/// Validates an upgrade request and picks the first of `supported` (in the
/// server's order of preference) that the client offers. With an empty
/// `supported`, no subprotocol is negotiated.
pub fn prepare(req: &mut Request, supported: &[&'static str]) -> Result<Upgrade, ApiError> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "invalid_argument",
            "this endpoint needs a WebSocket upgrade",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(ApiError::invalid("unsupported WebSocket version: use 13"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::invalid("missing Sec-WebSocket-Key"))?;
    let accept = derive_accept_key(key.as_bytes());
    let protocol = if supported.is_empty() {
        None
    } else {
        let offered = offered_protocols(headers);
        let chosen = supported
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
            .copied();
        if chosen.is_none() {
            return Err(ApiError::invalid(format!(
                "no supported WebSocket subprotocol offered: use one of {}",
                supported.join(", ")
            )));
        }
        chosen
    };
    let on_upgrade = req
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or_else(|| ApiError::internal("connection cannot be upgraded"))?;
    Ok(Upgrade {
        on_upgrade,
        accept,
        protocol,
    })
}

pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

impl Upgrade {
    /// The `101 Switching Protocols` answer.
    pub fn response(&self) -> Response {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&self.accept).expect("base64 is a valid header"),
        );
        if let Some(p) = self.protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        resp
    }

    /// Completes the upgrade once the 101 has been sent.
    pub async fn into_ws(self, config: WebSocketConfig) -> Result<ServerWs, hyper::Error> {
        let upgraded = self.on_upgrade.await?;
        Ok(
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await,
        )
    }
}
