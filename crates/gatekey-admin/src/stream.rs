//! Streaming exec over the admin stream protocol (`v5.channel.k8s.io`):
//! output arrives while the command runs, stdin is forwarded with
//! backpressure, and the exit status comes last on channel 3.
//!
//! The byte path is kept short for throughput: each WebSocket message's
//! payload is written straight from the received buffer (no re-buffering),
//! and stdin is read directly into the buffer that becomes the message.

use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::channel::{self, Status};
use gatekey_proto::names;
use gatekey_proto::transport::{self, WsStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::api::NodeType;
use crate::client::{Client, Result, check_ref};
use crate::error::{self, ClientError};
use crate::exit;

/// Largest message accepted from the server.
pub const MAX_MESSAGE: usize = 2 * 1024 * 1024;
/// Bytes of local stdin per stdin message.
pub const STDIN_CHUNK: usize = 64 * 1024;
/// How long the close handshake may take once the session is over.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What to run, for [`Client::exec_stream`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// A shell command line, run as `/bin/sh -c` on the node.
    pub command: String,
    /// Kill the remote process after this long (rounded up to whole
    /// seconds); `None` leaves the agent's default (60s).
    pub timeout: Option<Duration>,
    /// Whether the client will send stdin. When false the remote process
    /// reads end-of-file at once.
    pub stdin: bool,
}

/// An open exec session; consume it with [`ExecSession::run`].
pub struct ExecSession {
    ws: WsStream,
    protocol: Option<String>,
    stdin: bool,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession")
            .field("protocol", &self.protocol)
            .field("stdin", &self.stdin)
            .finish()
    }
}

impl Client {
    /// Opens `GET /ws/v1/agents/{ref}/exec`. Errors the server gives before
    /// the upgrade come back as [`ClientError::Api`], with a hint naming the
    /// exact command to fix them where the client can tell.
    pub async fn exec_stream(&self, agent: &str, options: ExecOptions) -> Result<ExecSession> {
        check_ref("agent", agent)?;
        names::validate_command(&options.command).map_err(ClientError::InvalidArgument)?;
        let key = self.require_key()?;
        let metadata = exec_metadata(&options.command, options.timeout, options.stdin);
        let path = format!(
            "/ws/v1/agents/{agent}/exec?metadata={}",
            percent_encode(&metadata)
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE))
            .read_buffer_size(8 * 1024);
        let headers = [("authorization", format!("Bearer {key}"))];
        let dialed = transport::connect_ws(
            &self.endpoint,
            &path,
            &headers,
            &channel::PROTOCOLS,
            self.tls.clone(),
            config,
            self.timeout,
        )
        .await;
        match dialed {
            Ok((ws, protocol)) => {
                keepalive(ws.get_ref().get_ref().0.get_ref());
                Ok(ExecSession {
                    ws,
                    protocol,
                    stdin: options.stdin,
                })
            }
            Err(e) => Err(self.explain(agent, ClientError::from(e)).await),
        }
    }

    /// Makes a refused session's error precise. The body before a refused
    /// upgrade can be lost (it is whatever arrived with the headers), so a
    /// bare 403/503 is diagnosed from the agent's record; a sessions-disabled
    /// error gets the exact command or file that enables sessions.
    async fn explain(&self, agent: &str, error: ClientError) -> ClientError {
        let ClientError::Api(mut api) = error else {
            return error;
        };
        let diagnose = api.code.is_empty() && matches!(api.status, 403 | 503);
        let wants_hint = matches!(
            api.code.as_str(),
            error::CODE_SESSIONS_DISABLED_AGENT | error::CODE_SESSIONS_DISABLED_CONTROL_PLANE
        );
        if !diagnose && (!wants_hint || api.already_advises()) {
            return ClientError::Api(api);
        }
        let Ok(record) = self.get_agent(agent).await else {
            return ClientError::Api(api);
        };
        if diagnose {
            let code = if !record.connected && api.status == 503 {
                Some(error::CODE_AGENT_NOT_CONNECTED)
            } else if record.session_enabled_agent == Some(false) {
                Some(error::CODE_SESSIONS_DISABLED_AGENT)
            } else if !record.session_enabled_control_plane {
                Some(error::CODE_SESSIONS_DISABLED_CONTROL_PLANE)
            } else {
                None
            };
            if let Some(code) = code {
                api.code = code.to_string();
            }
        }
        let kind = NodeType::parse(&record.kind);
        api.hint = match (api.code.as_str(), kind) {
            (error::CODE_SESSIONS_DISABLED_CONTROL_PLANE, Some(kind)) => Some(format!(
                "enable it with `gatekey-admin {} update {} --session=true`",
                kind.command(),
                record.id
            )),
            (error::CODE_SESSIONS_DISABLED_AGENT, Some(kind)) => Some(format!(
                "set `session_enabled: true` in {} on {} and restart its agent",
                kind.config_file(),
                record.name
            )),
            _ => None,
        };
        if api.message.is_empty() || api.message.starts_with("HTTP ") {
            api.message = match api.code.as_str() {
                error::CODE_AGENT_NOT_CONNECTED => {
                    format!("agent {} is not connected", record.name)
                }
                error::CODE_SESSIONS_DISABLED_AGENT => {
                    format!(
                        "remote sessions are disabled in the config of {}",
                        record.name
                    )
                }
                error::CODE_SESSIONS_DISABLED_CONTROL_PLANE => {
                    format!(
                        "remote sessions are disabled on the control plane for {}",
                        record.name
                    )
                }
                _ => std::mem::take(&mut api.message),
            };
        }
        ClientError::Api(api)
    }
}

impl ExecSession {
    /// The negotiated subprotocol (`v5.channel.k8s.io` normally).
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// Runs the session to its end: forwards `stdin` (when the session was
    /// opened with `stdin: true`; `None` sends end-of-file at once), writes
    /// remote stdout and stderr as they arrive, and returns the exit status.
    /// Use [`exit_code`] to turn the status into a process exit code.
    pub async fn run<R, O, E>(self, stdin: Option<R>, stdout: O, stderr: E) -> Result<Status>
    where
        R: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.run_until(stdin, stdout, stderr, std::future::pending::<()>())
            .await
    }

    /// [`run`](Self::run), ended early when `cancel` completes: the session is
    /// closed (the server then kills the remote process group) and the
    /// result is [`ClientError::Cancelled`].
    pub async fn run_until<R, O, E, C>(
        self,
        stdin: Option<R>,
        mut stdout: O,
        mut stderr: E,
        cancel: C,
    ) -> Result<Status>
    where
        R: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
        C: Future,
    {
        let (mut sink, mut source) = self.ws.split();
        // v4 has no half-close: the remote stdin then ends with the session.
        let send_eof = self.stdin && self.protocol.as_deref() == Some(channel::V5);
        let stdin = stdin.filter(|_| self.stdin);
        let outcome = {
            let pump = pump_stdin(&mut sink, stdin, send_eof);
            let receive = receive(&mut source, &mut stdout, &mut stderr);
            tokio::pin!(pump, receive, cancel);
            let mut pumping = true;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut cancel => break Err(ClientError::Cancelled),
                    result = &mut receive => break result,
                    result = &mut pump, if pumping => {
                        pumping = false;
                        if let Err(e) = result {
                            break Err(e);
                        }
                    }
                }
            }
        };
        // Close politely: the server stops the remote process if it still
        // runs, and answers our close; never wait long for it.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
            while let Some(Ok(_)) = source.next().await {}
        })
        .await;
        outcome
    }
}

/// Sends local stdin in [`STDIN_CHUNK`] pieces, each read straight into the
/// message buffer behind the channel byte. `send` waits for the socket, so
/// a slow remote reader slows the local read (backpressure, no buffering).
async fn pump_stdin<R: AsyncRead + Unpin>(
    sink: &mut SplitSink<WsStream, Message>,
    stdin: Option<R>,
    send_eof: bool,
) -> Result<()> {
    if let Some(mut input) = stdin {
        loop {
            let mut buf = BytesMut::with_capacity(1 + STDIN_CHUNK);
            buf.put_u8(channel::STDIN);
            let n = input
                .read_buf(&mut buf)
                .await
                .map_err(|e| ClientError::io("reading local stdin", e))?;
            if n == 0 {
                break;
            }
            if sink.send(Message::Binary(buf.freeze())).await.is_err() {
                // The connection is gone: the receiving side reports it.
                return std::future::pending().await;
            }
        }
    }
    if send_eof {
        let eof = Bytes::from_static(&[channel::CLOSE, channel::STDIN]);
        if sink.send(Message::Binary(eof)).await.is_err() {
            return std::future::pending().await;
        }
    }
    Ok(())
}

/// Writes stdout/stderr chunks as they come until the status arrives.
async fn receive<O, E>(
    source: &mut SplitStream<WsStream>,
    stdout: &mut O,
    stderr: &mut E,
) -> Result<Status>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    while let Some(message) = source.next().await {
        let message = message.map_err(|e| ClientError::SessionLost(e.to_string()))?;
        match message {
            Message::Binary(data) => {
                let Some((&ch, payload)) = data.split_first() else {
                    continue;
                };
                match ch {
                    channel::STDOUT => write_chunk(stdout, payload, "stdout").await?,
                    channel::STDERR => write_chunk(stderr, payload, "stderr").await?,
                    channel::STATUS => {
                        return serde_json::from_slice(payload).map_err(|e| {
                            ClientError::Protocol(format!("invalid exit status: {e}"))
                        });
                    }
                    // Close of a server stream, resize, or a future channel:
                    // nothing an exec client acts on.
                    _ => {}
                }
            }
            Message::Close(frame) => {
                let why = frame
                    .map(|f| error::one_line(f.reason.as_str()))
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "the control plane closed it before the exit status".into());
                return Err(ClientError::SessionLost(why));
            }
            _ => {}
        }
    }
    Err(ClientError::SessionLost(
        "connection closed before the exit status arrived".into(),
    ))
}

/// Writes and flushes at once so output without a newline shows at once.
async fn write_chunk<W: AsyncWrite + Unpin>(out: &mut W, payload: &[u8], name: &str) -> Result<()> {
    let result = async {
        out.write_all(payload).await?;
        out.flush().await
    }
    .await;
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => ClientError::BrokenPipe,
        _ => ClientError::io(format!("writing local {name}"), e),
    })
}

/// The process exit code a session's status stands for: the remote exit
/// code (128+N for a signal), 124 when the agent's timeout killed it, 1 for
/// any other failure.
pub fn exit_code(status: &Status) -> i32 {
    if status.reason == channel::REASON_TIMEOUT {
        return exit::REMOTE_TIMEOUT;
    }
    if status.reason == channel::REASON_SESSION_LOST {
        return exit::SESSION_LOST;
    }
    match status.exit_code() {
        Some(code) => code.clamp(0, 255),
        None => exit::FAILURE,
    }
}

/// What to tell the user about a status, if anything: a plain non-zero exit
/// is silent (as with ssh); a timeout or a failure to run is not.
pub fn failure_message(status: &Status) -> Option<String> {
    let detail = if status.message.is_empty() {
        status.reason.clone()
    } else {
        error::one_line(&status.message)
    };
    if status.reason == channel::REASON_TIMEOUT {
        let what = match detail.strip_prefix("command ") {
            Some(rest) if detail.contains("timed out") => format!("remote command {rest}"),
            _ if detail.contains("timed out") => detail,
            _ => format!("remote command timed out ({detail})"),
        };
        return Some(format!("{what}; allow longer with --timeout DURATION"));
    }
    if status.reason == channel::REASON_SESSION_LOST {
        return Some(format!("session lost: {detail}"));
    }
    if status.exit_code().is_some() {
        return None;
    }
    Some(format!("remote command failed: {detail}"))
}

/// The `metadata` query parameter, `{"shell", "timeout_seconds", "stdin"}`
/// as docs/api.md spells it (`channel::Metadata` reads it through an alias).
fn exec_metadata(command: &str, timeout: Option<Duration>, stdin: bool) -> String {
    let mut m = serde_json::Map::new();
    m.insert("shell".into(), command.into());
    if let Some(t) = timeout {
        m.insert("timeout_seconds".into(), whole_seconds(t).into());
    }
    m.insert("stdin".into(), stdin.into());
    serde_json::Value::Object(m).to_string()
}

/// TCP keepalive on the session's socket (idle 30s, then 3 probes 10s
/// apart): a control plane that vanishes without closing the connection
/// (host down, NAT state lost) ends the session as "lost" within about a
/// minute instead of hanging. Kernel probes are answered whatever the
/// server's application does, so a long silent command is never mistaken
/// for a dead server (a WebSocket ping could be: the server stops reading
/// the client while stdin waits for flow-control credit). Best effort.
fn keepalive(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: `fd` is an open socket borrowed for the duration of the
        // call; the kernel copies `value` from a valid pointer of the given size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatekey_proto::channel::Metadata;

    #[test]
    fn statuses_map_to_exit_codes() {
        assert_eq!(exit_code(&Status::success()), 0);
        assert_eq!(exit_code(&Status::exit(3, None)), 3);
        assert_eq!(exit_code(&Status::exit(137, Some(9))), 137);
        assert_eq!(
            exit_code(&Status::failure(
                channel::REASON_TIMEOUT,
                "timed out after 60s"
            )),
            exit::REMOTE_TIMEOUT
        );
        assert_eq!(
            exit_code(&Status::failure(channel::REASON_INTERNAL, "cannot start")),
            exit::FAILURE
        );
        assert_eq!(exit_code(&Status::exit(300, None)), 255);
        // A timeout is a timeout even when the killed process's code is reported.
        let mut killed = Status::exit(137, Some(9));
        killed.reason = channel::REASON_TIMEOUT.into();
        assert_eq!(exit_code(&killed), exit::REMOTE_TIMEOUT);
    }

    #[test]
    fn failure_messages() {
        assert_eq!(failure_message(&Status::success()), None);
        assert_eq!(failure_message(&Status::exit(1, None)), None);
        let m = failure_message(&Status::failure(
            channel::REASON_TIMEOUT,
            "timed out after 5s",
        ))
        .unwrap();
        assert_eq!(
            m,
            "timed out after 5s; allow longer with --timeout DURATION"
        );
        let m = failure_message(&Status::failure(
            channel::REASON_TIMEOUT,
            "command timed out; group killed",
        ))
        .unwrap();
        assert_eq!(
            m,
            "remote command timed out; group killed; allow longer with --timeout DURATION"
        );
        let m = failure_message(&Status::failure(channel::REASON_TIMEOUT, "")).unwrap();
        assert_eq!(
            m,
            "remote command timed out (Timeout); allow longer with --timeout DURATION"
        );
        let m =
            failure_message(&Status::failure(channel::REASON_INTERNAL, "no such shell")).unwrap();
        assert_eq!(m, "remote command failed: no such shell");
    }

    #[test]
    fn metadata_is_query_safe() {
        let json = exec_metadata("echo a&b=c #d", Some(Duration::from_millis(1500)), true);
        let enc = percent_encode(&json);
        assert!(
            enc.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "{enc}"
        );
        assert!(
            enc.contains("%22shell%22%3A%22echo%20a%26b%3Dc%20%23d%22"),
            "{enc}"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["timeout_seconds"], 2);
        assert_eq!(v["stdin"], true);
        // The shared protocol type reads the same document.
        let m: Metadata = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (m.shell.as_deref(), m.timeout_seconds, m.stdin),
            (Some("echo a&b=c #d"), Some(2), Some(true))
        );
        assert!(!m.tty);
        let v: serde_json::Value = serde_json::from_str(&exec_metadata("ls", None, false)).unwrap();
        assert_eq!(v, serde_json::json!({"shell": "ls", "stdin": false}));
    }
}
