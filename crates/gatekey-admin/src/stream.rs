//! Streaming sessions over the admin stream protocol (`v5.channel.k8s.io`):
//! exec and console. Output arrives while the command runs, input is
//! forwarded with backpressure, and the exit status comes last on channel 3.
//!
//! One [`StreamSession`] type serves both: [`StreamSession::run_until`]
//! forwards a pipe (`session exec`, `session connect --notty`);
//! [`StreamSession::run_terminal`] forwards the keystrokes of a raw local
//! terminal with `~` escapes and window resizes (`session connect`).
//!
//! The byte path is kept short for throughput: each WebSocket message's
//! payload is written straight from the received buffer (no re-buffering),
//! and stdin is read directly into the buffer that becomes the message.

use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::channel::{self, Metadata, MetadataCommand, Status, TerminalSize};
use gatekey_proto::names;
use gatekey_proto::transport::{self, WsStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::api::NodeType;
use crate::client::{Client, Result, check_ref};
use crate::error::{self, ClientError};
use crate::exit;
use crate::terminal::{self, EscapeCommand, EscapeState};

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

/// How to open a console, for [`Client::console`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// A PTY on the node (everything arrives on stdout); `false` runs on
    /// pipes, with stdout and stderr apart.
    pub tty: bool,
    /// `TERM` for the remote side (tty only).
    pub term: Option<String>,
    /// A program and its arguments instead of the node's shell.
    pub command: Option<MetadataCommand>,
    /// The window size to start with (tty only).
    pub size: Option<TerminalSize>,
    pub mode: ConsoleMode,
    /// End the open console (its participants are told who took over) and
    /// open a new one.
    pub force: bool,
}

/// Whose console: a new one, or joining the open one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsoleMode {
    /// A console of one's own; refused (409) while another is open.
    #[default]
    Exclusive,
    /// Join the open console: same output, everybody may type.
    Share,
    /// Join the open console read-only.
    Observe,
}

impl ConsoleMode {
    /// The `mode` query parameter, `None` for exclusive.
    pub fn query(self) -> Option<&'static str> {
        match self {
            ConsoleMode::Exclusive => None,
            ConsoleMode::Share => Some("share"),
            ConsoleMode::Observe => Some("observe"),
        }
    }
}

/// An open exec or console session; consume it with
/// [`run`](StreamSession::run), [`run_until`](StreamSession::run_until) or
/// [`run_terminal`](StreamSession::run_terminal).
pub struct StreamSession {
    ws: WsStream,
    protocol: Option<String>,
    stdin: bool,
}

/// The name this type had when it served exec only.
pub type ExecSession = StreamSession;

/// How a session run by [`StreamSession::run_terminal`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The remote side ended it; the status says how (exit code, killed, …).
    Status(Status),
    /// The user left with `~.` (or the local terminal went away).
    Disconnected,
}

/// The local terminal's side of [`StreamSession::run_terminal`].
pub struct TerminalInput<R, H> {
    /// Keystrokes (the local terminal in raw mode).
    pub keys: R,
    /// Window sizes: every change is sent as a resize message.
    pub resizes: Option<watch::Receiver<TerminalSize>>,
    /// Recognise `~` escapes (`~.` disconnects, `~?` prints help to `help`).
    pub escapes: bool,
    /// Where `~?` writes its help (the local stderr).
    pub help: H,
    /// Put the local terminal back ([`terminal::restore`]) the moment the
    /// session is over, before the close handshake: keys typed meanwhile
    /// then reach the local shell as ordinary cooked input.
    pub restore_terminal: bool,
}

impl std::fmt::Debug for StreamSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSession")
            .field("protocol", &self.protocol)
            .field("stdin", &self.stdin)
            .finish()
    }
}

impl Client {
    /// Opens `GET /ws/v1/agents/{ref}/exec`. Errors the server gives before
    /// the upgrade come back as [`ClientError::Api`], with a hint naming the
    /// exact command to fix them where the client can tell.
    pub async fn exec_stream(&self, agent: &str, options: ExecOptions) -> Result<StreamSession> {
        check_ref("agent", agent)?;
        names::validate_command(&options.command).map_err(ClientError::InvalidArgument)?;
        let metadata = exec_metadata(&options.command, options.timeout, options.stdin);
        let path = format!(
            "/ws/v1/agents/{agent}/exec?metadata={}",
            percent_encode(&metadata)
        );
        self.open_stream(agent, &path, options.stdin).await
    }

    /// Opens `GET /ws/v1/agents/{ref}/console`: the node's shell (or
    /// `options.command`) on a PTY, or on pipes without `tty`. Refusals
    /// come back as for [`exec_stream`](Self::exec_stream); a busy console
    /// is a 409 ([`exit::CONFLICT`]) whose message names who holds it.
    pub async fn console(&self, agent: &str, options: ConsoleOptions) -> Result<StreamSession> {
        check_ref("agent", agent)?;
        if let Some(command) = &options.command {
            let line = std::iter::once(command.command.as_str())
                .chain(command.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            names::validate_command(&line).map_err(ClientError::InvalidArgument)?;
            if command.command.trim().is_empty() {
                return Err(ClientError::InvalidArgument(
                    "command must not be empty".into(),
                ));
            }
        }
        // Observers send nothing, not even end-of-file.
        let stdin = options.mode != ConsoleMode::Observe;
        let path = format!("/ws/v1/agents/{agent}/console?{}", console_query(&options));
        self.open_stream(agent, &path, stdin).await
    }

    /// Dials a session WebSocket with the API key and the channel
    /// subprotocols; `stdin` says whether the client will send input.
    async fn open_stream(&self, agent: &str, path: &str, stdin: bool) -> Result<StreamSession> {
        let key = self.require_key()?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE))
            .read_buffer_size(8 * 1024);
        let headers = [("authorization", format!("Bearer {key}"))];
        let dialed = transport::connect_ws(
            &self.endpoint,
            path,
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
                Ok(StreamSession {
                    ws,
                    protocol,
                    stdin,
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

/// The input side of a session.
enum Pump<R, H> {
    /// A pipe or file (or nothing): forwarded, then end-of-file.
    Stdin(Option<R>),
    /// A raw local terminal.
    Terminal(TerminalInput<R, H>),
}

/// How the input side finished.
enum PumpEnd {
    /// Everything sent (with end-of-file where the protocol has it); the
    /// session goes on until the status arrives.
    Done,
    /// `~.`, or the local terminal went away: end the session now.
    Disconnect,
}

impl StreamSession {
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
        stdout: O,
        stderr: E,
        cancel: C,
    ) -> Result<Status>
    where
        R: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
        C: Future,
    {
        let pump = Pump::<R, tokio::io::Sink>::Stdin(stdin);
        match self
            .drive(pump, stdout, stderr, cancel, false, false)
            .await?
        {
            Ending::Status(status) => Ok(status),
            // A pipe never disconnects on its own; kept total all the same.
            Ending::Disconnected => Err(ClientError::Cancelled),
        }
    }

    /// Runs an interactive session from a local terminal in raw mode:
    /// keystrokes are sent as they are read (through the `~` escapes when
    /// enabled), every new window size as a resize, remote output is written
    /// at once. Channel 2 carries gatekey's notices in a tty session; they
    /// are written to `stderr` on lines of their own, with "\r\n" line ends
    /// (the terminal does no output processing in raw mode). Ends with the
    /// remote status, with [`Ending::Disconnected`] on `~.` or when the
    /// keystrokes end, or with [`ClientError::Cancelled`] when `cancel`
    /// completes; the connection is closed in every case, which ends the
    /// console unless others share it.
    pub async fn run_terminal<R, H, O, E, C>(
        self,
        input: TerminalInput<R, H>,
        stdout: O,
        stderr: E,
        cancel: C,
    ) -> Result<Ending>
    where
        R: AsyncRead + Unpin,
        H: AsyncWrite + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
        C: Future,
    {
        let restore = input.restore_terminal;
        self.drive(Pump::Terminal(input), stdout, stderr, cancel, true, restore)
            .await
    }

    /// Runs input and output side by side until the status arrives, the
    /// input side disconnects, or `cancel` completes; then (after restoring
    /// the local terminal when asked) closes.
    async fn drive<R, H, O, E, C>(
        self,
        pump: Pump<R, H>,
        mut stdout: O,
        mut stderr: E,
        cancel: C,
        raw: bool,
        restore_terminal: bool,
    ) -> Result<Ending>
    where
        R: AsyncRead + Unpin,
        H: AsyncWrite + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
        C: Future,
    {
        let (mut sink, mut source) = self.ws.split();
        // v4 has no half-close: the remote stdin then ends with the session.
        let send_eof = self.stdin && self.protocol.as_deref() == Some(channel::V5);
        let sends_stdin = self.stdin;
        let outcome = {
            let sink = &mut sink;
            let pump = async move {
                match pump {
                    Pump::Stdin(stdin) => {
                        let stdin = stdin.filter(|_| sends_stdin);
                        pump_stdin(sink, stdin, send_eof).await?;
                        Ok(PumpEnd::Done)
                    }
                    Pump::Terminal(input) => pump_terminal(sink, input).await,
                }
            };
            let receive = receive(&mut source, &mut stdout, &mut stderr, raw);
            tokio::pin!(pump, receive, cancel);
            let mut pumping = true;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut cancel => break Err(ClientError::Cancelled),
                    result = &mut receive => break result.map(Ending::Status),
                    result = &mut pump, if pumping => match result {
                        Ok(PumpEnd::Done) => pumping = false,
                        Ok(PumpEnd::Disconnect) => break Ok(Ending::Disconnected),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        if restore_terminal {
            terminal::restore();
        }
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
            if !send(sink, buf.freeze()).await {
                // The connection is gone: the receiving side reports it.
                return std::future::pending().await;
            }
        }
    }
    if send_eof {
        let eof = Bytes::from_static(&[channel::CLOSE, channel::STDIN]);
        if !send(sink, eof).await {
            return std::future::pending().await;
        }
    }
    Ok(())
}

/// Forwards a raw terminal: each read (usually one keystroke) becomes one
/// stdin message at once, after the escape filter; window size changes
/// become resize messages. Returns on `~.` or when the keys end.
async fn pump_terminal<R, H>(
    sink: &mut SplitSink<WsStream, Message>,
    input: TerminalInput<R, H>,
) -> Result<PumpEnd>
where
    R: AsyncRead + Unpin,
    H: AsyncWrite + Unpin,
{
    enum Event {
        Keys(std::io::Result<usize>),
        Resize(Option<TerminalSize>),
    }
    let TerminalInput {
        mut keys,
        mut resizes,
        escapes,
        mut help,
        restore_terminal: _,
    } = input;
    let mut escape = EscapeState::new(escapes);
    let mut typed = BytesMut::with_capacity(STDIN_CHUNK);
    loop {
        let resized = async {
            match resizes.as_mut() {
                Some(rx) => match rx.changed().await {
                    Ok(()) => Some(*rx.borrow_and_update()),
                    Err(_) => None,
                },
                None => std::future::pending().await,
            }
        };
        // Both branches are cancel safe: `read_buf` keeps nothing it did
        // not return, `changed` keeps the change for the next call.
        let event = tokio::select! {
            read = keys.read_buf(&mut typed) => Event::Keys(read),
            size = resized => Event::Resize(size),
        };
        match event {
            Event::Resize(None) => resizes = None,
            Event::Resize(Some(size)) => {
                let mut frame = vec![channel::RESIZE];
                serde_json::to_writer(&mut frame, &size).expect("a size serializes");
                if !send(sink, frame.into()).await {
                    return std::future::pending().await;
                }
            }
            Event::Keys(read) => {
                let n = read.map_err(|e| ClientError::io("reading the local terminal", e))?;
                if n == 0 {
                    // A raw terminal reads no end-of-file (Ctrl-D is a
                    // byte): the terminal is gone.
                    return Ok(PumpEnd::Disconnect);
                }
                let mut rest = &typed[..];
                while !rest.is_empty() {
                    let mut frame = BytesMut::with_capacity(2 + rest.len());
                    frame.put_u8(channel::STDIN);
                    let (used, command) = escape.feed(rest, &mut frame);
                    rest = &rest[used..];
                    if frame.len() > 1 && !send(sink, frame.freeze()).await {
                        return std::future::pending().await;
                    }
                    match command {
                        Some(EscapeCommand::Disconnect) => return Ok(PumpEnd::Disconnect),
                        Some(EscapeCommand::Help) => {
                            let text =
                                terminal::crlf(format!("~?\n{}", terminal::ESCAPE_HELP).as_bytes());
                            // Best effort: the help is not worth ending the session.
                            let _ = write_chunk(&mut help, &text, "stderr").await;
                        }
                        None => {}
                    }
                }
                typed.clear();
            }
        }
    }
}

/// Sends one binary message; `false` when the connection is gone.
async fn send(sink: &mut SplitSink<WsStream, Message>, data: Bytes) -> bool {
    sink.send(Message::Binary(data)).await.is_ok()
}

/// Writes stdout/stderr chunks as they come until the status arrives. With
/// `raw` (a local terminal in raw mode), stderr text gets "\r\n" line ends
/// and starts on a line of its own.
async fn receive<O, E>(
    source: &mut SplitStream<WsStream>,
    stdout: &mut O,
    stderr: &mut E,
    raw: bool,
) -> Result<Status>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    // Whether the terminal's cursor is at the start of a line, as far as
    // the output written so far tells (raw mode only).
    let mut at_line_start = true;
    while let Some(message) = source.next().await {
        let message = message.map_err(|e| ClientError::SessionLost(lost_reason(&e)))?;
        match message {
            Message::Binary(data) => {
                let Some((&ch, payload)) = data.split_first() else {
                    continue;
                };
                match ch {
                    channel::STDOUT => {
                        write_chunk(stdout, payload, "stdout").await?;
                        if let Some(&last) = payload.last() {
                            at_line_start = last == b'\n';
                        }
                    }
                    channel::STDERR if raw => {
                        let mut text = Vec::with_capacity(payload.len() + 8);
                        if !at_line_start {
                            text.extend_from_slice(b"\r\n");
                        }
                        text.extend(terminal::crlf(payload));
                        write_chunk(stderr, &text, "stderr").await?;
                        if let Some(&last) = text.last() {
                            at_line_start = last == b'\n';
                        }
                    }
                    channel::STDERR => write_chunk(stderr, payload, "stderr").await?,
                    channel::STATUS => {
                        return serde_json::from_slice(payload).map_err(|e| {
                            ClientError::Protocol(format!("invalid exit status: {e}"))
                        });
                    }
                    // Close of a server stream, resize, or a future channel:
                    // nothing a client acts on.
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

/// Why the connection broke, in words for the "session lost" line.
fn lost_reason(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        // A peer gone without TLS close_notify, or without a FIN at all.
        Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the connection to the control plane closed unexpectedly".into()
        }
        Error::Io(io) => format!("connection to the control plane failed: {io}"),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "the control plane dropped the connection".into()
        }
        Error::ConnectionClosed | Error::AlreadyClosed => "connection closed".into(),
        other => error::one_line(&other.to_string()),
    }
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
/// code (128+N for a signal); 124 when the agent's timeout killed it or the
/// control plane ended an idle or overlong session; [`exit::SESSION_ENDED`]
/// when an administrator killed it or another user took the console over;
/// [`exit::SESSION_LOST`] when the agent went away; 1 for any other failure.
pub fn exit_code(status: &Status) -> i32 {
    match status.reason.as_str() {
        channel::REASON_TIMEOUT | channel::REASON_IDLE_TIMEOUT | channel::REASON_MAX_DURATION => {
            return exit::REMOTE_TIMEOUT;
        }
        channel::REASON_KILLED | channel::REASON_TAKEN_OVER => return exit::SESSION_ENDED,
        channel::REASON_SESSION_LOST => return exit::SESSION_LOST,
        _ => {}
    }
    match status.exit_code() {
        Some(code) => code.clamp(0, 255),
        None => exit::FAILURE,
    }
}

/// What to tell the user about a status, if anything: a plain non-zero exit
/// is silent (as with ssh); a timeout, a killed or taken-over session, or a
/// failure to run is not. The server's message says who and why; a status
/// without one gets a generic line.
pub fn failure_message(status: &Status) -> Option<String> {
    let server_said = error::one_line(&status.message);
    let detail = if server_said.is_empty() {
        status.reason.clone()
    } else {
        server_said.clone()
    };
    let or = |fallback: &str| {
        if server_said.is_empty() {
            fallback.to_string()
        } else {
            server_said.clone()
        }
    };
    match status.reason.as_str() {
        channel::REASON_TIMEOUT => {
            let what = match detail.strip_prefix("command ") {
                Some(rest) if detail.contains("timed out") => format!("remote command {rest}"),
                _ if detail.contains("timed out") => detail,
                _ => format!("remote command timed out ({detail})"),
            };
            return Some(format!("{what}; allow longer with --timeout DURATION"));
        }
        channel::REASON_KILLED => return Some(or("session killed by an administrator")),
        channel::REASON_TAKEN_OVER => return Some(or("another user took over this console")),
        channel::REASON_IDLE_TIMEOUT => {
            return Some(or("session closed after being idle too long"));
        }
        channel::REASON_MAX_DURATION => {
            return Some(or("session reached the maximum session duration"));
        }
        channel::REASON_SESSION_LOST => return Some(format!("session lost: {detail}")),
        _ => {}
    }
    if status.exit_code().is_some() {
        return None;
    }
    Some(format!("remote command failed: {detail}"))
}

/// The console's query string: `metadata` (the Kubernetes shape), `mode`
/// and `force`.
fn console_query(options: &ConsoleOptions) -> String {
    let metadata = Metadata {
        tty: options.tty,
        term: options.term.clone().filter(|_| options.tty),
        command: options.command.clone(),
        initial_dimensions: options.size.filter(|_| options.tty),
        // Said outright for any server that defaults it to false as for
        // exec; observers send nothing.
        stdin: (options.mode != ConsoleMode::Observe).then_some(true),
        ..Default::default()
    };
    let json = serde_json::to_string(&metadata).expect("metadata serializes");
    let mut query = format!("metadata={}", percent_encode(&json));
    if let Some(mode) = options.mode.query() {
        query.push_str("&mode=");
        query.push_str(mode);
    }
    if options.force {
        query.push_str("&force=true");
    }
    query
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
    fn console_endings_map_to_exit_codes() {
        for (reason, want) in [
            (channel::REASON_KILLED, exit::SESSION_ENDED),
            (channel::REASON_TAKEN_OVER, exit::SESSION_ENDED),
            (channel::REASON_IDLE_TIMEOUT, exit::REMOTE_TIMEOUT),
            (channel::REASON_MAX_DURATION, exit::REMOTE_TIMEOUT),
            (channel::REASON_SESSION_LOST, exit::SESSION_LOST),
        ] {
            assert_eq!(exit_code(&Status::failure(reason, "x")), want, "{reason}");
        }
        assert_eq!(exit::SESSION_ENDED, 252);
    }

    #[test]
    fn console_ending_messages() {
        let m = |reason: &str, message: &str| failure_message(&Status::failure(reason, message));
        assert_eq!(
            m(channel::REASON_KILLED, "session killed by alice").as_deref(),
            Some("session killed by alice")
        );
        assert_eq!(
            m(channel::REASON_TAKEN_OVER, "alice took over this console").as_deref(),
            Some("alice took over this console")
        );
        assert_eq!(
            m(channel::REASON_IDLE_TIMEOUT, "idle for 15m\n").as_deref(),
            Some("idle for 15m")
        );
        assert_eq!(
            m(channel::REASON_MAX_DURATION, "").as_deref(),
            Some("session reached the maximum session duration")
        );
        assert_eq!(
            m(channel::REASON_KILLED, "").as_deref(),
            Some("session killed by an administrator")
        );
        assert_eq!(
            m(channel::REASON_SESSION_LOST, "agent hub-1 disconnected").as_deref(),
            Some("session lost: agent hub-1 disconnected")
        );
        // No hint about --timeout: a console has none.
        assert!(
            !m(channel::REASON_IDLE_TIMEOUT, "")
                .unwrap()
                .contains("--timeout")
        );
    }

    fn decode_query(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                let mut bytes = Vec::new();
                let b = v.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' {
                        bytes.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        bytes.push(b[i]);
                        i += 1;
                    }
                }
                (k.to_string(), String::from_utf8(bytes).unwrap())
            })
            .collect()
    }

    #[test]
    fn console_query_shapes() {
        let tty = ConsoleOptions {
            tty: true,
            term: Some("xterm-256color".into()),
            command: None,
            size: Some(TerminalSize {
                width: 100,
                height: 30,
            }),
            mode: ConsoleMode::Exclusive,
            force: false,
        };
        let q = decode_query(&console_query(&tty));
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].0, "metadata");
        let v: serde_json::Value = serde_json::from_str(&q[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tty": true, "term": "xterm-256color", "stdin": true,
                               "initialDimensions": {"Width": 100, "Height": 30}})
        );

        let pipes = ConsoleOptions {
            tty: false,
            term: Some("ignored".into()),
            command: Some(MetadataCommand {
                command: "top".into(),
                args: vec!["-d".into(), "1 &x".into()],
            }),
            size: Some(TerminalSize {
                width: 1,
                height: 1,
            }),
            mode: ConsoleMode::Share,
            force: false,
        };
        let raw = console_query(&pipes);
        assert!(
            raw.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%=&".contains(&b)),
            "{raw}"
        );
        let q = decode_query(&raw);
        let v: serde_json::Value = serde_json::from_str(&q[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tty": false, "stdin": true,
                               "command": {"command": "top", "args": ["-d", "1 &x"]}})
        );
        assert_eq!(q[1], ("mode".into(), "share".into()));

        let observe = ConsoleOptions {
            mode: ConsoleMode::Observe,
            ..tty.clone()
        };
        let q = decode_query(&console_query(&observe));
        let v: serde_json::Value = serde_json::from_str(&q[0].1).unwrap();
        assert_eq!(v.get("stdin"), None);
        assert_eq!(q[1], ("mode".into(), "observe".into()));
        let force = ConsoleOptions { force: true, ..tty };
        assert!(console_query(&force).ends_with("&force=true"));
        assert!(!console_query(&force).contains("mode="));
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
