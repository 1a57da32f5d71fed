//! Carrying a request to the replica that can serve it.
//!
//! Requests about one agent (its details, exec, console, diagnostics run
//! there) go to the replica holding the agent's link; killing a session
//! goes to the replica running it. The request travels whole through a
//! tunnel and is served by that replica's own API, so checks, errors and
//! audit records are the same wherever the client connected. A WebSocket
//! upgrade is spliced byte for byte; if the far replica or the broker goes
//! away mid-session, the client still gets a status saying so.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gatekey_proto::channel::{self, Status};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::tunnel::{self, OpenError, OpenRequest};
use super::{Cluster, Proxied, agent_subject, replica_subject};
use crate::api::error::ApiError;
use crate::bus::BusError;
use crate::server::RemoteAddr;
use crate::state::AppState;

/// Middleware: serves here what this replica can serve, carries the rest.
pub async fn route(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = state.cluster.clone() else {
        return next.run(req).await;
    };
    if req.extensions().get::<Proxied>().is_some() {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if !routable(&method, &path) {
        return next.run(req).await;
    }
    // Only a caller who could be served anywhere is carried: nobody without
    // a valid key makes this replica look things up or open tunnels.
    let headers = req.headers().clone();
    let addr = req.extensions().get::<RemoteAddr>().map(|a| a.0);
    if let Err(e) = known_caller(&state, &cluster, &headers, addr).await {
        return e.into_response();
    }
    let Some((subject, label, reference)) =
        destination(&state, &cluster, &method, &path, &query).await
    else {
        return next.run(req).await;
    };
    // Kept whole, so it can still be served here if the agent has left.
    let (mut parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_CARRIED_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_argument",
                format!("cannot read the request body (at most {MAX_CARRIED_BODY} bytes): {e}"),
            )
            .into_response();
        }
    };
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "replica_unavailable",
            format!("cannot reach the control-plane replica holding {label}: {e}"),
        )
        .into_response()
    };
    let mut open = OpenRequest {
        id: String::new(),
        client_addr: addr,
        from_replica: cluster.replica.clone(),
        protocol: super::PROTOCOL,
        window: 0,
        reply_to: None,
    };
    // Where a session's queue costs the broker real work (RabbitMQ), a
    // request answered at once does without one; on NATS a subject costs
    // nothing, and the tunnel measured as fast.
    let whole = cluster.bus.queues_are_costly()
        && answered_at_once(&method, &path)
        && body.len() <= MAX_WHOLE_BODY;
    let mut t = if whole {
        open.id = crate::live::new_session_id();
        match tunnel::open_whole(&cluster.bus, &subject, open, cluster.tunnel).await {
            Ok(t) => t,
            Err(e) => return unavailable(&e),
        }
    } else {
        let (id, inbox) = match cluster.inboxes.take().await {
            Ok(x) => x,
            Err(e) => return unavailable(&e),
        };
        open.id = id;
        tunnel::open(&cluster.bus, &subject, open, cluster.tunnel, inbox)
    };
    let opened = t.opened.take().expect("the opening side");
    let ended = t.ended.clone();
    let e = match forward(&mut parts, body.clone(), whole, t, label.clone()).await {
        Ok(r) => return r,
        Err(e) => e,
    };
    match tokio::time::timeout(cluster.tunnel.open_timeout, opened).await {
        // It left since we looked (or the name now means another node), and
        // nobody got the request: the handler here looks again and answers.
        Ok(Ok(Err(OpenError::Bus(BusError::NoResponders(_))))) => {
            if let Some(r) = &reference {
                cluster.forget_node(r);
            }
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        Ok(Ok(Err(e))) => unavailable(&e),
        _ => {
            let why = ended.borrow().clone().unwrap_or_else(|| e.to_string());
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "replica_unavailable",
                format!("the control-plane replica holding {label} failed to answer: {why}"),
            )
            .into_response()
        }
    }
}

/// Requests answered at once: one message there, the answer back, no
/// per-session queue (see `tunnel::open_whole`).
fn answered_at_once(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), segments(path).as_slice()),
        ("GET", ["api", "v1", "agents", _])
            | ("POST", ["api", "v1", "agents", _, "exec"])
            | ("DELETE", ["api", "v1", "sessions", _])
    )
}

/// A request path's segments, for matching routes.
fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').collect()
}

/// Larger bodies go through a tunnel with flow control both ways.
const MAX_WHOLE_BODY: usize = 64 * 1024;

/// Largest request body carried to another replica (the API's own limit
/// for JSON bodies).
const MAX_CARRIED_BODY: usize = 2 << 20;

/// Paths that may have to be served by another replica.
fn routable(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), segments(path).as_slice()),
        ("GET", ["api", "v1", "agents", _])
            | ("POST", ["api", "v1", "agents", _, "exec"])
            | ("GET", ["ws", "v1", "agents", _, "exec" | "console"])
            | ("GET", ["ws", "v1", "devices", _, "console"])
            | ("POST", ["api", "v1", "troubleshoot"])
            | ("DELETE", ["api", "v1", "sessions", _])
    )
}

/// Authenticates the caller here (the serving replica checks again, with
/// roles and scopes); a key seen valid in the last few seconds is not
/// looked up again.
async fn known_caller(
    state: &AppState,
    cluster: &Cluster,
    headers: &axum::http::HeaderMap,
    addr: Option<std::net::SocketAddr>,
) -> Result<(), ApiError> {
    let credential = crate::auth::bearer(headers)
        .map(str::to_string)
        .or_else(|| crate::auth::session_cookie(headers).map(str::to_string));
    if let Some(c) = &credential
        && cluster.caller_recently_valid(c)
    {
        return Ok(());
    }
    crate::auth::authenticate(state, headers, addr).await?;
    if let Some(c) = credential {
        cluster.remember_caller(c);
    }
    Ok(())
}

/// Where a request must be served, when not here: a subject and a label for
/// messages.
async fn destination(
    state: &AppState,
    cluster: &Cluster,
    method: &Method,
    path: &str,
    query: &str,
) -> Option<(String, String, Option<String>)> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let reference: String = match segments.as_slice() {
        ["api", "v1", "agents", r] if method == Method::GET => (*r).to_string(),
        ["api", "v1", "agents", r, "exec"] if method == Method::POST => (*r).to_string(),
        ["ws", "v1", "agents", r, "exec" | "console"] if method == Method::GET => (*r).to_string(),
        ["ws", "v1", "devices", r, "console"] if method == Method::GET => (*r).to_string(),
        ["api", "v1", "troubleshoot"] if method == Method::POST => {
            let location = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "location")
                .map(|(_, v)| v.into_owned())?;
            location.split_once(':')?.1.to_string()
        }
        ["api", "v1", "sessions", id] if method == Method::DELETE => {
            if state.sessions.get(id).is_some() || !super::valid_id(id) {
                return None;
            }
            let holder = cluster.session_holder(id).await?;
            return Some((replica_subject(&holder), format!("session {id}"), None));
        }
        _ => return None,
    };
    if gatekey_proto::names::validate("agent", &reference).is_err() {
        return None;
    }
    let (id, name) = match cluster.cached_node(&reference) {
        Some(hit) => hit,
        None => {
            let node = state.store.find_node(&reference).await.ok()??;
            cluster.cache_node(&reference, &node.id, &node.name);
            (node.id, node.name)
        }
    };
    if state.registry.get(&id).is_some() {
        return None;
    }
    Some((agent_subject(&id), format!("agent {name}"), Some(reference)))
}

/// Sends the request through the tunnel and hands back the far replica's
/// answer (splicing an upgraded connection).
async fn forward(
    parts: &mut axum::http::request::Parts,
    body: Bytes,
    whole: bool,
    t: tunnel::Tunnel,
    label: String,
) -> Result<Response, hyper::Error> {
    let mut out = Request::new(Body::from(body));
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = parts.uri.clone();
    *out.headers_mut() = parts.headers.clone();
    if whole {
        // The far replica's server ends its side once it answered.
        out.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(t.io)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(out).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    {
        let upstream = hyper::upgrade::on(&mut resp);
        let ended = t.ended;
        tokio::spawn(async move {
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => splice(client, upstream, ended, &label).await,
                Err(e) => tracing::debug!(error = %e, "tunnelled upgrade failed"),
            }
        });
        return Ok(resp.map(|_| Body::empty()));
    }
    drop_hop_by_hop(resp.headers_mut());
    Ok(resp.map(Body::new))
}

/// Removes what described the connection between the replicas (RFC 9110
/// section 7.6.1) from an answer carried back: the far replica's
/// `Connection: close` (a request answered at once) would otherwise close
/// the client's own keep-alive connection after every request.
fn drop_hop_by_hop(headers: &mut axum::http::HeaderMap) {
    use axum::http::header;
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| header::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Copies both ways between the client and the far replica. When the
/// tunnel breaks, the client gets a status (at a frame boundary) and a close.
async fn splice(
    client: hyper::upgrade::Upgraded,
    upstream: hyper::upgrade::Upgraded,
    mut ended: watch::Receiver<Option<String>>,
    label: &str,
) {
    let (mut client_rd, mut client_wr) = tokio::io::split(TokioIo::new(client));
    let (mut up_rd, mut up_wr) = tokio::io::split(TokioIo::new(upstream));
    let to_far = async {
        let _ = tokio::io::copy(&mut client_rd, &mut up_wr).await;
        let _ = up_wr.shutdown().await;
    };
    let to_client = async {
        let mut frames = FrameTracker::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match up_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    frames.feed(&buf[..n]);
                    if client_wr.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        // A broken tunnel has its reason set before its reader sees the end.
        let why = ended.borrow_and_update().clone();
        if let Some(why) = why
            && frames.at_boundary()
        {
            let status = Status::failure(
                channel::REASON_SESSION_LOST,
                format!("lost the control-plane replica holding {label}: {why}"),
            );
            let _ = client_wr
                .write_all(&ws_frame(0x2, &status.to_message()))
                .await;
            let _ = client_wr
                .write_all(&ws_frame(0x8, &1011u16.to_be_bytes()))
                .await;
        }
        let _ = client_wr.shutdown().await;
    };
    tokio::select! {
        _ = to_client => {}
        _ = async { to_far.await; std::future::pending::<()>().await } => {}
    }
}

/// One unmasked (server to client) WebSocket frame.
fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= u16::MAX as usize => {
            f.push(126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    Bytes::from(f)
}

/// Follows WebSocket frame boundaries in a byte stream, so that a status
/// is only ever added between frames.
#[derive(Default)]
struct FrameTracker {
    header: Vec<u8>,
    remaining: u64,
    /// Inside a fragmented message (a data frame without FIN, until the
    /// continuation that has it).
    fragmented: bool,
    /// A close frame went by: nothing may follow it.
    closed: bool,
}

impl FrameTracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(bytes.len() as u64)) as usize;
                self.remaining -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if let Some(len) = self.payload_len() {
                let fin = self.header[0] & 0x80 != 0;
                match self.header[0] & 0x0f {
                    0x1 | 0x2 => self.fragmented = !fin,
                    0x0 if fin => self.fragmented = false,
                    0x8 => self.closed = true,
                    _ => {}
                }
                self.header.clear();
                self.remaining = len;
            }
        }
    }

    /// The payload length once the header is complete.
    fn payload_len(&self) -> Option<u64> {
        let h = &self.header;
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let (ext, len7) = match h[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(n as u64)),
        };
        let need = 2 + ext + if masked { 4 } else { 0 };
        if h.len() < need {
            return None;
        }
        Some(match len7 {
            Some(n) => n,
            None if ext == 2 => u16::from_be_bytes([h[2], h[3]]) as u64,
            None => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
        })
    }

    /// Whether a new message may be added here.
    fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.remaining == 0 && !self.fragmented && !self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_headers_stay_between_the_replicas() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("connection", "close, x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-request-id", "r1".parse().unwrap());
        drop_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }

    #[test]
    fn frame_boundaries_are_followed_across_reads() {
        let mut stream = Vec::new();
        stream.extend(ws_frame(0x2, b"hello"));
        stream.extend(ws_frame(0x2, &vec![7u8; 300]));
        stream.extend(ws_frame(0x2, &vec![9u8; 70_000]));
        for split in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut t = FrameTracker::default();
            for chunk in stream.chunks(split) {
                t.feed(chunk);
            }
            assert!(t.at_boundary(), "split {split}");
            t.feed(&ws_frame(0x2, b"abc")[..3]);
            assert!(!t.at_boundary());
        }
    }

    #[test]
    fn nothing_is_added_inside_a_fragmented_message_or_after_a_close() {
        let mut t = FrameTracker::default();
        // A binary frame without FIN, then its final continuation.
        let mut first = ws_frame(0x2, b"part").to_vec();
        first[0] &= 0x7f;
        t.feed(&first);
        assert!(!t.at_boundary());
        t.feed(&ws_frame(0x0, b"rest"));
        assert!(t.at_boundary());
        t.feed(&ws_frame(0x8, &1000u16.to_be_bytes()));
        assert!(!t.at_boundary());
    }
}
