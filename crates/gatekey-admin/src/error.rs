//! The one error type of the client library. Every variant knows its exit
//! code (see [`crate::exit`]) and renders as one line that says what to do.

use std::io;
use std::time::Duration;

use gatekey_proto::transport::TransportError;
use serde::Deserialize;

use crate::exit;

/// An error answer of the admin API: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: u16,
    /// The machine-readable code (`not_found`, …); empty when the body was
    /// not the API's JSON (e.g. a proxy's error page).
    pub code: String,
    pub message: String,
    /// What the user can do about it, when the client knows more than the
    /// server said (e.g. the exact command that enables sessions). An empty
    /// hint means none at all, not even the default one.
    pub hint: Option<String>,
}

pub const CODE_INVALID_ARGUMENT: &str = "invalid_argument";
pub const CODE_UNAUTHENTICATED: &str = "unauthenticated";
pub const CODE_FORBIDDEN: &str = "forbidden";
pub const CODE_SESSIONS_DISABLED_AGENT: &str = "sessions_disabled_agent";
pub const CODE_SESSIONS_DISABLED_CONTROL_PLANE: &str = "sessions_disabled_control_plane";
pub const CODE_NOT_FOUND: &str = "not_found";
pub const CODE_CONFLICT: &str = "conflict";
pub const CODE_AGENT_ERROR: &str = "agent_error";
pub const CODE_AGENT_NOT_CONNECTED: &str = "agent_not_connected";
pub const CODE_AGENT_TIMEOUT: &str = "agent_timeout";
pub const CODE_INTERNAL: &str = "internal";

impl ApiError {
    /// Builds the error from an HTTP status and body. A body that is not the
    /// API's JSON is kept (shortened, on one line) as the message.
    pub fn from_response(status: u16, body: &[u8]) -> ApiError {
        #[derive(Deserialize)]
        struct Body {
            code: String,
            #[serde(default)]
            message: String,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => ApiError {
                status,
                code: b.code,
                message: one_line(&b.message),
                hint: None,
            },
            Err(_) => {
                let text = one_line(&String::from_utf8_lossy(body));
                let reason = http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                let message = if text.is_empty() {
                    format!("HTTP {status} {reason}").trim_end().to_string()
                } else {
                    format!("HTTP {status} {reason}: {}", truncate(&text, 200))
                };
                ApiError {
                    status,
                    code: String::new(),
                    message,
                    hint: None,
                }
            }
        }
    }

    /// The exit code for this answer: by `code`, or by HTTP status when the
    /// body carried no code.
    pub fn exit_code(&self) -> i32 {
        match self.code.as_str() {
            CODE_INVALID_ARGUMENT => exit::INVALID_ARGUMENT,
            CODE_UNAUTHENTICATED => exit::UNAUTHENTICATED,
            CODE_FORBIDDEN => exit::FORBIDDEN,
            CODE_SESSIONS_DISABLED_AGENT => exit::SESSIONS_DISABLED_AGENT,
            CODE_SESSIONS_DISABLED_CONTROL_PLANE => exit::SESSIONS_DISABLED_CONTROL_PLANE,
            CODE_NOT_FOUND => exit::NOT_FOUND,
            CODE_CONFLICT => exit::CONFLICT,
            CODE_AGENT_NOT_CONNECTED => exit::NOT_CONNECTED,
            CODE_AGENT_TIMEOUT => exit::AGENT_TIMEOUT,
            CODE_AGENT_ERROR | CODE_INTERNAL => exit::FAILURE,
            _ => match self.status {
                400 | 422 => exit::INVALID_ARGUMENT,
                401 => exit::UNAUTHENTICATED,
                403 => exit::FORBIDDEN,
                404 => exit::NOT_FOUND,
                409 => exit::CONFLICT,
                // A proxy in front of a control plane that is down.
                502 | 503 => exit::UNREACHABLE,
                _ => exit::FAILURE,
            },
        }
    }

    /// Whether the server's message already says what to do (then a hint
    /// of ours would only repeat it).
    pub fn already_advises(&self) -> bool {
        let m = self.message.as_str();
        match self.code.as_str() {
            CODE_SESSIONS_DISABLED_CONTROL_PLANE => m.contains("--session"),
            CODE_SESSIONS_DISABLED_AGENT => m.contains("session_enabled"),
            _ => m.contains("--api-key") || m.contains("gatekey-admin login"),
        }
    }

    fn default_hint(&self) -> Option<&'static str> {
        match self.code.as_str() {
            CODE_UNAUTHENTICATED => {
                Some("pass --api-key KEY (or set GATEKEY_API_KEY) or run `gatekey-admin login`")
            }
            CODE_SESSIONS_DISABLED_AGENT => Some(
                "set `session_enabled: true` in the node's /etc/gatekey/<role>.yaml and restart its agent",
            ),
            CODE_SESSIONS_DISABLED_CONTROL_PLANE => Some(
                "enable it with `gatekey-admin <gateway|mesh hub|mesh spoke|device> update ID --session=true`",
            ),
            _ if self.code.is_empty() && self.status == 401 => {
                Some("pass --api-key KEY (or set GATEKEY_API_KEY) or run `gatekey-admin login`")
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message = if self.message.is_empty() {
            self.code.as_str()
        } else {
            self.message.as_str()
        };
        f.write_str(message)?;
        if let Some(hint) = self.hint.as_deref().or_else(|| self.default_hint())
            && !hint.is_empty()
            && !self.already_advises()
        {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no control plane URL: pass --server URL, set GATEKEY_SERVER or run `gatekey-admin login --server URL`"
    )]
    MissingServer,
    #[error("no API key: pass --api-key KEY, set GATEKEY_API_KEY or run `gatekey-admin login`")]
    MissingApiKey,
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{}", transport_message(.0))]
    Transport(TransportError),
    #[error("{0}")]
    Api(ApiError),
    #[error("no answer from {server} within {}", gatekey_proto::duration::format(*.after))]
    RequestTimeout { server: String, after: Duration },
    #[error("connection to {server} failed: {detail}")]
    Connection { server: String, detail: String },
    #[error("unexpected answer from the control plane: {0}")]
    Protocol(String),
    #[error("session lost: {0}")]
    SessionLost(String),
    #[error("interrupted")]
    Cancelled,
    #[error("broken pipe on local output")]
    BrokenPipe,
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn transport_message(e: &TransportError) -> String {
    match e {
        TransportError::Untrusted { .. } => format!(
            "{e}: pass --ca-cert FILE or set GATEKEY_CA_CERT (for a self-signed control plane: DATA_DIR/tls/ca.pem)"
        ),
        TransportError::Unreachable { .. } | TransportError::Timeout(_) => {
            format!("{e} (is the control plane running and --server right?)")
        }
        other => other.to_string(),
    }
}

impl ClientError {
    /// The process exit code for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::MissingServer | ClientError::Config(_) => exit::FAILURE,
            ClientError::MissingApiKey => exit::UNAUTHENTICATED,
            ClientError::InvalidArgument(_) => exit::INVALID_ARGUMENT,
            ClientError::Transport(t) => match t {
                TransportError::InvalidUrl(_) => exit::INVALID_ARGUMENT,
                TransportError::CaCert { .. } => exit::FAILURE,
                TransportError::Unreachable { .. } | TransportError::Timeout(_) => {
                    exit::UNREACHABLE
                }
                TransportError::Untrusted { .. } => exit::UNTRUSTED,
                TransportError::Tls { .. } => exit::UNREACHABLE,
                TransportError::Http { status, body } => {
                    ApiError::from_response(*status, body.as_bytes()).exit_code()
                }
                TransportError::Handshake(_) => exit::FAILURE,
            },
            ClientError::Api(api) => api.exit_code(),
            ClientError::RequestTimeout { .. } | ClientError::Connection { .. } => {
                exit::UNREACHABLE
            }
            ClientError::Protocol(_) => exit::FAILURE,
            ClientError::SessionLost(_) => exit::SESSION_LOST,
            ClientError::Cancelled => exit::INTERRUPTED,
            ClientError::BrokenPipe => exit::BROKEN_PIPE,
            ClientError::Io { .. } => exit::FAILURE,
        }
    }

    /// The API error code (`not_found`, …) when the server answered with one.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            ClientError::Api(api) if !api.code.is_empty() => Some(&api.code),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> ClientError {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<TransportError> for ClientError {
    /// An HTTP answer before a WebSocket upgrade carries the API's JSON error.
    fn from(e: TransportError) -> ClientError {
        match e {
            TransportError::Http { status, body } => {
                ClientError::Api(ApiError::from_response(status, body.as_bytes()))
            }
            other => ClientError::Transport(other),
        }
    }
}

/// Replaces line breaks so every error stays on one line.
pub(crate) fn one_line(s: &str) -> String {
    let s = s.trim();
    if s.contains(['\n', '\r']) {
        s.split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        s.to_string()
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, body: &str) -> ClientError {
        ClientError::from(TransportError::Http {
            status,
            body: body.to_string(),
        })
    }

    #[test]
    fn api_codes_map_to_exit_codes() {
        let cases = [
            (400, "invalid_argument", exit::INVALID_ARGUMENT),
            (401, "unauthenticated", exit::UNAUTHENTICATED),
            (403, "forbidden", exit::FORBIDDEN),
            (
                403,
                "sessions_disabled_agent",
                exit::SESSIONS_DISABLED_AGENT,
            ),
            (
                403,
                "sessions_disabled_control_plane",
                exit::SESSIONS_DISABLED_CONTROL_PLANE,
            ),
            (404, "not_found", exit::NOT_FOUND),
            (409, "conflict", exit::CONFLICT),
            (502, "agent_error", exit::FAILURE),
            (503, "agent_not_connected", exit::NOT_CONNECTED),
            (504, "agent_timeout", exit::AGENT_TIMEOUT),
            (500, "internal", exit::FAILURE),
        ];
        for (status, code, want) in cases {
            let e = api(status, &format!(r#"{{"code":"{code}","message":"m"}}"#));
            assert_eq!(e.exit_code(), want, "{code}");
            assert_eq!(e.api_code(), Some(code));
        }
    }

    #[test]
    fn bodies_without_code_map_by_status() {
        assert_eq!(api(404, "").exit_code(), exit::NOT_FOUND);
        assert_eq!(
            api(401, "<html>nope</html>").exit_code(),
            exit::UNAUTHENTICATED
        );
        assert_eq!(api(502, "Bad Gateway").exit_code(), exit::UNREACHABLE);
        assert_eq!(api(418, "").exit_code(), exit::FAILURE);
        assert_eq!(api(404, "").to_string(), "HTTP 404 Not Found");
        assert_eq!(
            api(500, "a\nb").to_string(),
            "HTTP 500 Internal Server Error: a b"
        );
    }

    #[test]
    fn transport_errors_map_to_exit_codes() {
        let unreachable = ClientError::from(TransportError::Unreachable {
            addr: "127.0.0.1:1".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(unreachable.exit_code(), exit::UNREACHABLE);
        let untrusted = ClientError::from(TransportError::Untrusted {
            addr: "h:1".into(),
            detail: "UnknownIssuer".into(),
        });
        assert_eq!(untrusted.exit_code(), exit::UNTRUSTED);
        let text = untrusted.to_string();
        assert!(
            text.contains("--ca-cert FILE") && text.contains("GATEKEY_CA_CERT"),
            "{text}"
        );
        assert_eq!(
            ClientError::from(TransportError::Timeout("h:1".into())).exit_code(),
            exit::UNREACHABLE
        );
        assert_eq!(
            ClientError::from(TransportError::InvalidUrl("x".into())).exit_code(),
            exit::INVALID_ARGUMENT
        );
    }

    #[test]
    fn local_errors_map_to_exit_codes() {
        assert_eq!(
            ClientError::MissingApiKey.exit_code(),
            exit::UNAUTHENTICATED
        );
        assert_eq!(ClientError::MissingServer.exit_code(), exit::FAILURE);
        assert!(
            ClientError::MissingServer
                .to_string()
                .contains("gatekey-admin login")
        );
        assert_eq!(
            ClientError::SessionLost("x".into()).exit_code(),
            exit::SESSION_LOST
        );
        assert_eq!(ClientError::Cancelled.exit_code(), exit::INTERRUPTED);
        assert_eq!(
            ClientError::InvalidArgument("x".into()).exit_code(),
            exit::INVALID_ARGUMENT
        );
        assert_eq!(ClientError::BrokenPipe.exit_code(), exit::BROKEN_PIPE);
    }

    #[test]
    fn messages_carry_hints() {
        let e = api(
            401,
            r#"{"code":"unauthenticated","message":"unknown API key"}"#,
        );
        assert_eq!(
            e.to_string(),
            "unknown API key; pass --api-key KEY (or set GATEKEY_API_KEY) or run `gatekey-admin login`"
        );
        let e = api(
            403,
            r#"{"code":"sessions_disabled_control_plane","message":"sessions are disabled for hub-1"}"#,
        );
        assert!(e.to_string().contains("--session=true"));
        let mut inner = match e {
            ClientError::Api(a) => a,
            _ => unreachable!(),
        };
        inner.hint =
            Some("enable it with `gatekey-admin mesh hub update a1 --session=true`".into());
        assert_eq!(
            inner.to_string(),
            "sessions are disabled for hub-1; enable it with `gatekey-admin mesh hub update a1 --session=true`"
        );
        // An empty hint silences the default one (a failed password login).
        let mut wrong_password = match api(
            401,
            r#"{"code":"unauthenticated","message":"invalid user or password"}"#,
        ) {
            ClientError::Api(a) => a,
            _ => unreachable!(),
        };
        wrong_password.hint = Some(String::new());
        assert_eq!(wrong_password.to_string(), "invalid user or password");
        // A server message that already advises is not repeated.
        let e = api(
            403,
            r#"{"code":"sessions_disabled_agent","message":"disabled in the agent's config: set `session_enabled: true`"}"#,
        );
        assert_eq!(
            e.to_string(),
            "disabled in the agent's config: set `session_enabled: true`"
        );
    }
}
