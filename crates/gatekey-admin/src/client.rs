//! The admin API client: typed calls over HTTP/1.1 + TLS. One keep-alive
//! connection per [`Client`] is reused for successive requests (a CLI run or
//! a benchmark loop pays the TLS handshake once) and redialled transparently
//! when the server has closed it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gatekey_proto::names;
use gatekey_proto::transport::{self, Endpoint};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::api::{
    Agent, ApiKey, AuditPage, AuditRecord, AuditVerification, ExecRequest, ExecResponse,
    LiveSession, Node, NodeType, Participant, Role, ServerVersion, TroubleshootList, User, Whoami,
};
pub use crate::error::{ApiError, ClientError};

/// Result of every client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Largest response body read (a one-shot exec answer holds two streams of
/// up to 1 MiB each, JSON-escaped).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Default for [`ClientConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host[:port]`.
    pub server: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// PEM file of the CA to trust instead of the system roots.
    pub ca_cert: Option<PathBuf>,
    /// Bounds connecting (TCP + TLS) and each request/answer. A one-shot exec
    /// waits this long on top of the command's own timeout.
    pub timeout: Duration,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>) -> ClientConfig {
        ClientConfig {
            server: server.into(),
            api_key: None,
            ca_cert: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A client of one control plane. Cheap to share behind an `Arc`; requests
/// from several tasks take turns on the one connection (HTTP/1.1 has no
/// multiplexing), so use one `Client` per concurrent caller for parallelism.
pub struct Client {
    pub(crate) endpoint: Endpoint,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) api_key: Option<String>,
    pub(crate) timeout: Duration,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    connections: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.endpoint.url)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Parses the URL and loads the trust roots; does not connect yet.
    pub fn new(config: ClientConfig) -> Result<Client> {
        let endpoint = Endpoint::parse(&config.server)?;
        let tls = transport::client_config(config.ca_cert.as_deref())?;
        Ok(Client {
            endpoint,
            tls,
            api_key: config.api_key.filter(|k| !k.is_empty()),
            timeout: config.timeout,
            conn: tokio::sync::Mutex::new(None),
            connections: AtomicU64::new(0),
        })
    }

    /// The control plane URL, without a trailing slash.
    pub fn server(&self) -> &str {
        &self.endpoint.url
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// How many TLS connections the HTTP side has opened so far (keep-alive
    /// makes this 1 for a sequence of requests; tests check it).
    pub fn connections_opened(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    // ---- endpoints (docs/api.md) ----

    /// `GET /api/v1/version` (no key needed).
    pub async fn version(&self) -> Result<ServerVersion> {
        self.call(Method::GET, "/api/v1/version", None::<&()>, false)
            .await
    }

    /// `GET /api/v1/replicas`.
    pub async fn replicas(&self) -> Result<crate::api::Replicas> {
        self.call(Method::GET, "/api/v1/replicas", None::<&()>, true)
            .await
    }

    /// `GET /api/v1/agents[?connected=true]`.
    pub async fn list_agents(&self, connected_only: bool) -> Result<Vec<Agent>> {
        let path = if connected_only {
            "/api/v1/agents?connected=true"
        } else {
            "/api/v1/agents"
        };
        let list: crate::api::Items<Agent> =
            self.call(Method::GET, path, None::<&()>, true).await?;
        Ok(list.items)
    }

    /// `GET /api/v1/agents/{ref}`; `agent` is a node name or id.
    pub async fn get_agent(&self, agent: &str) -> Result<Agent> {
        check_ref("agent", agent)?;
        self.call(
            Method::GET,
            &format!("/api/v1/agents/{agent}"),
            None::<&()>,
            true,
        )
        .await
    }

    /// `POST /api/v1/agents/{ref}/exec`: runs a command to completion and
    /// returns its (capped) output.
    pub async fn exec_oneshot(&self, agent: &str, request: ExecRequest) -> Result<ExecResponse> {
        check_ref("agent", agent)?;
        names::validate_command(&request.command).map_err(ClientError::InvalidArgument)?;
        // The answer comes when the command ends: wait for its timeout too
        // (60s on the agent when none is given).
        let run = Duration::from_secs(request.timeout_seconds.unwrap_or(60));
        let path = format!("/api/v1/agents/{agent}/exec");
        self.call_with_timeout(
            Method::POST,
            &path,
            Some(&request),
            true,
            self.timeout + run,
        )
        .await
    }

    /// `POST {type path}`: registers a node; the answer carries its token,
    /// which is never shown again. `id` defaults to 8 random hex characters;
    /// `session_enabled` to the server's default when `None`.
    pub async fn create_node(
        &self,
        kind: NodeType,
        name: &str,
        id: Option<&str>,
        session_enabled: Option<bool>,
    ) -> Result<Node> {
        names::validate("name", name).map_err(ClientError::InvalidArgument)?;
        if let Some(id) = id {
            names::validate("id", id).map_err(ClientError::InvalidArgument)?;
        }
        #[derive(Serialize)]
        struct Create<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            session_enabled: Option<bool>,
        }
        self.call(
            Method::POST,
            kind.path(),
            Some(&Create {
                name,
                id,
                session_enabled,
            }),
            true,
        )
        .await
    }

    /// `GET {type path}`.
    pub async fn list_nodes(&self, kind: NodeType) -> Result<Vec<Node>> {
        let list: crate::api::Items<Node> = self
            .call(Method::GET, kind.path(), None::<&()>, true)
            .await?;
        Ok(list.items)
    }

    /// `GET {type path}/{ref}`.
    pub async fn get_node(&self, kind: NodeType, node: &str) -> Result<Node> {
        check_ref(kind.as_str(), node)?;
        self.call(
            Method::GET,
            &format!("{}/{node}", kind.path()),
            None::<&()>,
            true,
        )
        .await
    }

    /// `PATCH {type path}/{ref}`: the control plane's session switch.
    pub async fn update_node(
        &self,
        kind: NodeType,
        node: &str,
        session_enabled: bool,
    ) -> Result<Node> {
        check_ref(kind.as_str(), node)?;
        let body = serde_json::json!({ "session_enabled": session_enabled });
        self.call(
            Method::PATCH,
            &format!("{}/{node}", kind.path()),
            Some(&body),
            true,
        )
        .await
    }

    /// `DELETE {type path}/{ref}`: the agent is disconnected, its token revoked.
    pub async fn delete_node(&self, kind: NodeType, node: &str) -> Result<()> {
        check_ref(kind.as_str(), node)?;
        self.delete(&format!("{}/{node}", kind.path())).await
    }

    /// `GET /api/v1/sessions`: live exec and console sessions.
    pub async fn list_sessions(&self) -> Result<Vec<LiveSession>> {
        let list: crate::api::Sessions = self
            .call(Method::GET, "/api/v1/sessions", None::<&()>, true)
            .await?;
        Ok(list.sessions)
    }

    /// `DELETE /api/v1/sessions/{id}`: ends the session for every
    /// participant (status reason `SessionKilled`, "session killed by USER").
    pub async fn kill_session(&self, id: &str) -> Result<()> {
        names::validate("session id", id).map_err(ClientError::InvalidArgument)?;
        self.delete(&format!("/api/v1/sessions/{id}")).await
    }

    // ---- users, API keys, login (docs/api.md "Users, roles and scopes") ----

    /// `GET /api/v1/users`.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        let list: crate::api::Items<User> = self
            .call(Method::GET, "/api/v1/users", None::<&()>, true)
            .await?;
        Ok(list.items)
    }

    /// `GET /api/v1/users/{name}`.
    pub async fn get_user(&self, name: &str) -> Result<User> {
        check_user_name(name)?;
        self.call(
            Method::GET,
            &format!("/api/v1/users/{name}"),
            None::<&()>,
            true,
        )
        .await
    }

    /// `POST /api/v1/users`.
    pub async fn create_user(&self, user: &NewUser) -> Result<User> {
        check_user_name(&user.name)?;
        self.call(Method::POST, "/api/v1/users", Some(user), true)
            .await
    }

    /// `PATCH /api/v1/users/{name}`: only the fields that are `Some` change.
    pub async fn update_user(&self, name: &str, patch: &UserPatch) -> Result<User> {
        check_user_name(name)?;
        self.call(
            Method::PATCH,
            &format!("/api/v1/users/{name}"),
            Some(patch),
            true,
        )
        .await
    }

    /// `DELETE /api/v1/users/{name}`: its keys stop working too.
    pub async fn delete_user(&self, name: &str) -> Result<()> {
        check_user_name(name)?;
        self.no_content(Method::DELETE, &format!("/api/v1/users/{name}"), true)
            .await
    }

    /// `POST /api/v1/apikeys`: the answer's `key` is never shown again.
    pub async fn create_api_key(&self, key: &NewApiKey) -> Result<ApiKey> {
        if let Some(user) = &key.user {
            check_user_name(user)?;
        }
        self.call(Method::POST, "/api/v1/apikeys", Some(key), true)
            .await
    }

    /// `GET /api/v1/apikeys[?user=NAME]`.
    pub async fn list_api_keys(&self, user: Option<&str>) -> Result<Vec<ApiKey>> {
        let path = match user {
            Some(user) => {
                check_user_name(user)?;
                format!("/api/v1/apikeys?user={}", query_escape(user))
            }
            None => "/api/v1/apikeys".to_string(),
        };
        let list: crate::api::Items<ApiKey> =
            self.call(Method::GET, &path, None::<&()>, true).await?;
        Ok(list.items)
    }

    /// `DELETE /api/v1/apikeys/{id}`: the key stops working at once.
    pub async fn revoke_api_key(&self, id: &str) -> Result<()> {
        names::validate("API key id", id).map_err(ClientError::InvalidArgument)?;
        self.no_content(Method::DELETE, &format!("/api/v1/apikeys/{id}"), true)
            .await
    }

    /// `GET /api/v1/whoami`.
    pub async fn whoami(&self) -> Result<Whoami> {
        self.call(Method::GET, "/api/v1/whoami", None::<&()>, true)
            .await
    }

    /// `POST /api/v1/login` with `"client":"cli"` (no key needed): a new
    /// API key named `login`, in the answer's `key`.
    pub async fn login(&self, user: &str, password: &str) -> Result<ApiKey> {
        check_user_name(user)?;
        #[derive(Serialize)]
        struct Login<'a> {
            user: &'a str,
            password: &'a str,
            client: &'a str,
        }
        let body = Login {
            user,
            password,
            client: "cli",
        };
        self.call(Method::POST, "/api/v1/login", Some(&body), false)
            .await
            .map_err(|e| match e {
                // "invalid user or password" says it all: no --api-key advice.
                ClientError::Api(mut api) if api.status == 401 => {
                    api.hint = Some(String::new());
                    ClientError::Api(api)
                }
                other => other,
            })
    }

    /// `POST /api/v1/logout`: revokes the presented key if `login` made it.
    pub async fn logout(&self) -> Result<()> {
        self.no_content(Method::POST, "/api/v1/logout", true).await
    }

    // ---- audit log (docs/api.md "Audit log") ----

    /// `GET /api/v1/audit`: one page, newest first.
    pub async fn audit_page(
        &self,
        filter: &AuditFilter,
        limit: u32,
        before: Option<i64>,
    ) -> Result<AuditPage> {
        let mut query = filter.query();
        query.push(("limit", limit.to_string()));
        if let Some(before) = before {
            query.push(("before", before.to_string()));
        }
        self.call(
            Method::GET,
            &with_query("/api/v1/audit", &query),
            None::<&()>,
            true,
        )
        .await
    }

    /// The newest `limit` records matching `filter`, newest first, in
    /// pages of at most [`AUDIT_PAGE`].
    pub async fn list_audit(&self, filter: &AuditFilter, limit: u64) -> Result<Vec<AuditRecord>> {
        let mut records = Vec::new();
        let mut before = None;
        loop {
            let remaining = limit.saturating_sub(records.len() as u64);
            if remaining == 0 {
                return Ok(records);
            }
            let page = self
                .audit_page(filter, remaining.min(AUDIT_PAGE as u64) as u32, before)
                .await?;
            let empty = page.items.is_empty();
            records.extend(page.items);
            match page.next_before {
                Some(next) if !empty => before = Some(next),
                _ => return Ok(records),
            }
        }
    }

    /// `GET /api/v1/audit/verify`.
    pub async fn verify_audit(&self) -> Result<AuditVerification> {
        self.call(Method::GET, "/api/v1/audit/verify", None::<&()>, true)
            .await
    }

    /// `GET /api/v1/audit/export`: JSON lines, oldest first, read as they
    /// come (on a connection of its own) instead of all at once.
    pub async fn export_audit(&self, filter: &AuditFilter) -> Result<BodyStream> {
        let path = with_query("/api/v1/audit/export", &filter.query());
        self.stream_request(Method::GET, &path, None, self.timeout)
            .await
    }

    /// `GET /api/v1/troubleshoot`: the tools and where this key may run them.
    pub async fn troubleshoot_list(&self) -> Result<TroubleshootList> {
        self.call(Method::GET, "/api/v1/troubleshoot", None::<&()>, true)
            .await
    }

    /// `POST /api/v1/troubleshoot?location=…`: JSON lines as the tool runs.
    /// The wait between lines is bounded by `idle` (a silent traceroute hop
    /// or a scan of filtered ports can take a while).
    pub async fn troubleshoot(
        &self,
        location: &str,
        request: &serde_json::Value,
        idle: Duration,
    ) -> Result<BodyStream> {
        let path = with_query(
            "/api/v1/troubleshoot",
            &[("location", location.to_string())],
        );
        let body = Bytes::from(serde_json::to_vec(request).map_err(|e| {
            ClientError::InvalidArgument(format!("cannot encode the request: {e}"))
        })?);
        self.stream_request(Method::POST, &path, Some(body), idle)
            .await
    }

    /// Sends a request on a connection of its own and returns the body to
    /// read as it comes; an error status is read whole and turned into the
    /// usual error.
    async fn stream_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        idle: Duration,
    ) -> Result<BodyStream> {
        let key = self.require_key()?;
        let request = self.build_request(&method, path, body, Some(key))?;
        let head = async {
            let mut sender = self.connect().await?;
            sender.ready().await.map_err(|e| self.connection_error(e))?;
            sender
                .send_request(request)
                .await
                .map_err(|e| self.connection_error(e))
        };
        let response = tokio::time::timeout(self.timeout, head)
            .await
            .map_err(|_| ClientError::RequestTimeout {
                server: self.endpoint.url.clone(),
                after: self.timeout,
            })??;
        let status = response.status();
        let mut body = BodyStream {
            body: response.into_body(),
            server: self.endpoint.url.clone(),
            idle_timeout: idle,
        };
        if status.is_success() {
            return Ok(body);
        }
        body.idle_timeout = self.timeout;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.chunk().await? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > 64 * 1024 {
                break;
            }
        }
        Err(ClientError::Api(ApiError::from_response(
            status.as_u16(),
            &bytes,
        )))
    }

    // ---- plumbing ----

    /// A DELETE whose success answer has no body to read (204).
    async fn delete(&self, path: &str) -> Result<()> {
        self.no_content(Method::DELETE, path, true).await
    }

    /// A request without a body whose success answer has none either (204).
    async fn no_content(&self, method: Method, path: &str, auth: bool) -> Result<()> {
        let (status, body) = self.request(method, path, None, auth, self.timeout).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(ClientError::Api(ApiError::from_response(
                status.as_u16(),
                &body,
            )))
        }
    }

    pub(crate) fn require_key(&self) -> Result<&str> {
        self.api_key.as_deref().ok_or(ClientError::MissingApiKey)
    }

    async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        auth: bool,
    ) -> Result<T> {
        self.call_with_timeout(method, path, body, auth, self.timeout)
            .await
    }

    async fn call_with_timeout<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        auth: bool,
        timeout: Duration,
    ) -> Result<T> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(Bytes::from))
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (status, bytes) = self.request(method, path, body, auth, timeout).await?;
        if !status.is_success() {
            return Err(ClientError::Api(ApiError::from_response(
                status.as_u16(),
                &bytes,
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    /// Sends one request on the kept-alive connection (dialling it first if
    /// needed) and reads the whole answer.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        auth: bool,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes)> {
        let key = if auth {
            Some(self.require_key()?)
        } else {
            None
        };
        let work = async {
            // Held for the whole exchange: HTTP/1.1 serves one request at a time.
            let mut conn = self.conn.lock().await;
            let mut retried = false;
            loop {
                let reused = conn.as_ref().is_some_and(|c| !c.is_closed());
                if !reused {
                    *conn = Some(self.connect().await?);
                }
                let sender = conn.as_mut().expect("connection just set");
                if let Err(e) = sender.ready().await {
                    *conn = None;
                    if reused && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(self.connection_error(e));
                }
                let request = self.build_request(&method, path, body.clone(), key)?;
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        let collected =
                            Limited::new(response.into_body(), MAX_BODY).collect().await;
                        return match collected {
                            Ok(c) => Ok((status, c.to_bytes())),
                            Err(e) => {
                                *conn = None;
                                Err(ClientError::Connection {
                                    server: self.endpoint.url.clone(),
                                    detail: e.to_string(),
                                })
                            }
                        };
                    }
                    Err(mut e) => {
                        *conn = None;
                        // A kept-alive connection the server closed while idle:
                        // retry once if the request surely did not take effect.
                        let unsent = e.take_message().is_some();
                        let idempotent = method != Method::POST;
                        let closed_early =
                            e.error().is_incomplete_message() || e.error().is_canceled();
                        if reused && !retried && (unsent || (idempotent && closed_early)) {
                            retried = true;
                            continue;
                        }
                        return Err(self.connection_error(e.into_error()));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ClientError::RequestTimeout {
                server: self.endpoint.url.clone(),
                after: timeout,
            })?
    }

    fn build_request(
        &self,
        method: &Method,
        path: &str,
        body: Option<Bytes>,
        key: Option<&str>,
    ) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, self.endpoint.authority())
            .header(
                header::USER_AGENT,
                concat!("gatekey-admin/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/json");
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| {
                ClientError::InvalidArgument(format!("cannot build request for {path}: {e}"))
            })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tls = transport::connect_tls(&self.endpoint, self.tls.clone(), self.timeout).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.connection_error(e))?;
        // Drives the connection until both sides are done with it (the
        // sender is dropped with the Client, or the server closes).
        tokio::spawn(async move {
            let _ = connection.await;
        });
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }

    fn connection_error(&self, e: hyper::Error) -> ClientError {
        ClientError::Connection {
            server: self.endpoint.url.clone(),
            detail: e.to_string(),
        }
    }
}

/// Largest page of `GET /api/v1/audit` the server gives.
pub const AUDIT_PAGE: u32 = 1000;

/// `POST /api/v1/users`.
#[derive(Clone, Serialize)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
    pub scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `PATCH /api/v1/users/{name}`: `None` leaves a field as it is;
/// `password: Some(None)` removes the password.
#[derive(Clone, Default, Serialize)]
pub struct UserPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Option<String>>,
}

impl UserPatch {
    pub fn is_empty(&self) -> bool {
        self.role.is_none() && self.scopes.is_none() && self.password.is_none()
    }
}

/// `POST /api/v1/apikeys`; every field is optional (`user` defaults to
/// the caller).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewApiKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

/// The filters of `GET /api/v1/audit` and `/api/v1/audit/export`.
/// `since` and `until` are RFC 3339 times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// `session` matches `session` and every `session.*`.
    pub action: Option<String>,
    pub agent: Option<String>,
    pub user: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

impl AuditFilter {
    fn query(&self) -> Vec<(&'static str, String)> {
        [
            ("action", &self.action),
            ("agent", &self.agent),
            ("user", &self.user),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

/// A response body read chunk by chunk as it arrives.
pub struct BodyStream {
    body: Incoming,
    server: String,
    /// Longest wait for the next chunk.
    idle_timeout: Duration,
}

impl BodyStream {
    /// The next chunk of data; `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            let frame = tokio::time::timeout(self.idle_timeout, self.body.frame())
                .await
                .map_err(|_| ClientError::RequestTimeout {
                    server: self.server.clone(),
                    after: self.idle_timeout,
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(ClientError::Connection {
                        server: self.server.clone(),
                        detail: e.to_string(),
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// `path?k=v&…`, values percent-encoded.
fn with_query(path: &str, query: &[(&str, String)]) -> String {
    if query.is_empty() {
        return path.to_string();
    }
    let pairs: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", query_escape(v)))
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// Percent-encodes everything but the unreserved characters of RFC 3986.
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// User names (1–64 of `A-Za-z0-9._-`, not starting with `-`) go into URL
/// paths: only those pass.
pub(crate) fn check_user_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ClientError::InvalidArgument(format!(
            "invalid user name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -, not starting with -"
        )))
    }
}

/// Names and ids go into URL paths: only the documented characters pass.
pub(crate) fn check_ref(kind: &str, value: &str) -> Result<()> {
    names::validate(&format!("{kind} name or id"), value).map_err(ClientError::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_checked_before_any_request() {
        assert!(check_ref("agent", "hub-1").is_ok());
        let e = check_ref("agent", "../etc").unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::INVALID_ARGUMENT);
    }

    #[test]
    fn queries_are_escaped() {
        let filter = AuditFilter {
            action: Some("session".into()),
            since: Some("2026-11-23T10:00:00+02:00".into()),
            user: Some("a b&c".into()),
            ..Default::default()
        };
        assert_eq!(
            with_query("/api/v1/audit", &filter.query()),
            "/api/v1/audit?action=session&user=a%20b%26c&since=2026-11-23T10%3A00%3A00%2B02%3A00"
        );
        assert_eq!(with_query("/p", &[]), "/p");
        assert!(check_user_name("bob.smith_2").is_ok());
        for bad in ["", "-x", "a/b", "../x", &"a".repeat(65)] {
            let e = check_user_name(bad).unwrap_err();
            assert_eq!(e.exit_code(), crate::exit::INVALID_ARGUMENT, "{bad}");
        }
    }

    #[test]
    fn patches_send_only_what_changes() {
        let patch = UserPatch {
            password: Some(None),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&patch).unwrap(),
            r#"{"password":null}"#
        );
        assert!(UserPatch::default().is_empty());
    }

    #[test]
    fn bad_urls_are_invalid_arguments() {
        let e = Client::new(ClientConfig::new("http://plain")).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::INVALID_ARGUMENT);
    }
}
