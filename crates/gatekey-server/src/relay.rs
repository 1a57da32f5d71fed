//! The admin stream relay: one agent-link stream on one side, one or more
//! client WebSockets speaking the Kubernetes channel protocol on the other
//! (an exec has one client; a console may be shared or observed).
//!
//! It only moves bytes: agent output is forwarded without copying (an agent
//! data message minus its 5-byte header *is* a channel message), and credit
//! goes back to the agent only once every client's socket has taken the
//! bytes, so the slowest reader paces the remote process and memory stays
//! bounded by the stream window. A client that stops reading for longer
//! than the heartbeat timeout is dropped from the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::channel::{self, Status, TerminalSize};
use gatekey_proto::link::CH_STDIN;
use gatekey_proto::mux::{Event, LinkClosed, Stream, StreamHandle};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::audit::{Capture, LineCapture, OutputCapture};
use crate::live::{Commands, Kind, Live, ParticipantInfo, Registration, Role, addr_string, now_ms};
use crate::session::exit_status;
use crate::state::AppState;
use crate::store::NewAuditRecord;
use crate::ws::ServerWs;

/// Most agent messages forwarded before one flush.
const BATCH: usize = 32;

/// How far behind the fastest member of a shared session another member may
/// fall on one batch before it is dropped.
const LAG_ALLOWANCE: Duration = Duration::from_secs(5);

/// A client joining a session.
pub struct Participant {
    pub user: String,
    pub role: Role,
    pub addr: Option<SocketAddr>,
    pub ws: ServerWs,
    /// v5 of the channel protocol (stdin half-close on channel 255).
    pub v5: bool,
}

/// Orders for a running session.
pub enum Command {
    Join(Box<Participant>),
    /// End the session for everybody with this status reason and message.
    End {
        reason: &'static str,
        message: String,
    },
}

/// Timeouts of one session.
#[derive(Clone, Copy)]
pub struct Timeouts {
    /// Bounds sending the final status and close to a client.
    pub close: Duration,
    /// How often clients are pinged.
    pub heartbeat_interval: Duration,
    /// A client that neither sends nor takes anything for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// No input and no output for this long ends the session.
    pub idle: Option<Duration>,
    /// The session ends after this long regardless.
    pub max_duration: Option<Duration>,
}

struct Member {
    id: u64,
    user: String,
    tx: SplitSink<ServerWs, Message>,
    reader: JoinHandle<()>,
}

/// What a client's reader tells the relay.
enum FromReader {
    Gone { id: u64, why: &'static str },
    Notice { id: u64, text: String },
}

struct Relay {
    state: AppState,
    live: Arc<Live>,
    /// Output kept for the audit log (`audit_capture: full`).
    output: Option<OutputCapture>,
    handle: StreamHandle,
    members: Vec<Member>,
    next_id: u64,
    from_readers: mpsc::UnboundedSender<FromReader>,
    timeouts: Timeouts,
}

/// Runs a session until the process ends, it is ended, or every client left.
/// The handler has already recorded `session.opened`; the relay records
/// joins, departures, typed lines and output as configured, and the end,
/// each committed before the clients hear of it.
pub async fn run(
    state: AppState,
    registration: Registration,
    mut stream: Stream,
    first: Participant,
    mut commands: Commands,
) {
    let live = registration.live.clone();
    let timeouts = state.session_timeouts(live.kind == Kind::Console);
    let (from_readers, mut reader_events) = mpsc::unbounded_channel();
    let output = (state.config.audit_capture == Capture::Full)
        .then(|| OutputCapture::new(state.config.audit_output_limit));
    let mut relay = Relay {
        state: state.clone(),
        output,
        live: live.clone(),
        handle: stream.handle(),
        members: Vec::new(),
        next_id: 0,
        from_readers,
        timeouts,
    };
    relay.join(first, false).await;
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + timeouts.heartbeat_interval,
        timeouts.heartbeat_interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let status = loop {
        if relay.members.is_empty() {
            // A join queued just as the last client left keeps it going.
            match commands.try_recv() {
                Some(Command::Join(p)) => {
                    relay.join(*p, false).await;
                    continue;
                }
                Some(Command::End { .. }) | None => {
                    registration.unlist();
                    relay.handle.cancel("every client left").await;
                    relay
                        .record_end(&Status::failure(
                            channel::REASON_CANCELLED,
                            "every client left",
                        ))
                        .await;
                    return;
                }
            }
        }
        tokio::select! {
            // Orders and the clock before output, so a session streaming
            // flat out can still be killed, taken over, pinged and timed
            // out; agent events before client departures, so an exit that
            // races a client leaving still reaches the clients as a status.
            biased;
            Some(command) = commands.recv() => match command {
                Command::Join(p) => relay.join(*p, true).await,
                Command::End { reason, message } => {
                    relay.handle.cancel(&message).await;
                    break Status::failure(reason, message);
                }
            },
            _ = tick.tick() => {
                relay.broadcast(vec![Message::Ping(Bytes::new())]).await;
                if let Some(max) = timeouts.max_duration
                    && started.elapsed() >= max
                {
                    let message = format!("the session reached its maximum duration of {}", human(max));
                    relay.handle.cancel(&message).await;
                    relay.record_timeout("max_duration", &message).await;
                    break Status::failure(channel::REASON_MAX_DURATION, message);
                }
                if let Some(idle) = timeouts.idle {
                    let quiet = now_ms() - live.last_activity_ms.load(Ordering::Relaxed);
                    if quiet >= idle.as_millis() as i64 {
                        let message = format!("the session was idle (no input or output) for {}", human(idle));
                        relay.handle.cancel(&message).await;
                        relay.record_timeout("idle", &message).await;
                        break Status::failure(channel::REASON_IDLE_TIMEOUT, message);
                    }
                }
            }
            event = stream.next() => {
                let Some(event) = event else {
                    break Status::failure(channel::REASON_INTERNAL, "session ended without an exit status");
                };
                match event {
                    Event::Data(first) => {
                        let mut consumed = first.len();
                        let mut batch = vec![Message::Binary(first.channel_message())];
                        let mut pending = None;
                        while batch.len() < BATCH {
                            match stream.try_next() {
                                Some(Event::Data(d)) => {
                                    consumed += d.len();
                                    batch.push(Message::Binary(d.channel_message()));
                                }
                                Some(other) => {
                                    pending = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        live.bytes_out.fetch_add(consumed as u64, Ordering::Relaxed);
                        live.touch();
                        if let Some(o) = &mut relay.output {
                            for m in &batch {
                                if let Message::Binary(b) = m {
                                    o.feed(&b[1..]);
                                }
                            }
                        }
                        if let Some((reason, message)) = broadcast_or_end(&mut relay, batch, &mut commands).await {
                            relay.handle.cancel(&message).await;
                            break Status::failure(reason, message);
                        }
                        stream.consumed(consumed);
                        if let Some(final_status) = pending.and_then(final_event) {
                            break final_status;
                        }
                    }
                    other => {
                        if let Some(final_status) = final_event(other) {
                            break final_status;
                        }
                    }
                }
            }
            Some(event) = reader_events.recv() => match event {
                FromReader::Gone { id, why } => {
                    if let Some(user) = relay.remove(id) {
                        tracing::info!(session = %live.id, %user, why, "client left the session");
                        relay.record_left(&user, why).await;
                        if !relay.members.is_empty() {
                            relay.notice_all(&format!("{user} left")).await;
                        }
                    }
                }
                FromReader::Notice { id, text } => relay.notice(id, &text).await,
            },
        }
    };
    // Whoever waits for the end (kill, takeover) is answered now; late
    // joiners are refused (dropping `commands`) while the members get their
    // status.
    registration.unlist();
    drop(commands);
    relay.record_end(&status).await;
    relay.finish(status).await;
}

/// Broadcasts a batch while still obeying orders: a member that is slow to
/// take output (up to the heartbeat timeout) must not delay a kill or a
/// takeover. Joins that arrive meanwhile are admitted after the batch.
/// Returns the end order if one came.
async fn broadcast_or_end(
    relay: &mut Relay,
    batch: Vec<Message>,
    commands: &mut Commands,
) -> Option<(&'static str, String)> {
    let mut deferred = Vec::new();
    let ended = {
        let send = relay.broadcast(batch);
        tokio::pin!(send);
        loop {
            tokio::select! {
                biased;
                () = &mut send => break None,
                Some(command) = commands.recv() => match command {
                    Command::Join(p) => deferred.push(p),
                    Command::End { reason, message } => break Some((reason, message)),
                },
            }
        }
    };
    for p in deferred {
        if ended.is_some() {
            tokio::spawn(refuse_late(*p, relay.timeouts.close));
        } else {
            relay.join(*p, true).await;
        }
    }
    ended
}

/// Tells a client whose join arrived after the session ended, and closes it.
pub async fn refuse_late(p: Participant, close: Duration) {
    let status = Status::failure(
        channel::REASON_SESSION_LOST,
        "the console ended before this client could join it",
    );
    let mut ws = p.ws;
    let work = async {
        ws.send(Message::Binary(Bytes::from(status.to_message())))
            .await?;
        ws.close(None).await
    };
    let _ = tokio::time::timeout(close, work).await;
}

impl Relay {
    async fn join(&mut self, p: Participant, announce: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = p.ws.split();
        let handle = (p.role == Role::Interactive).then(|| self.handle.clone());
        let typed = (handle.is_some()
            && self.live.kind == Kind::Console
            && self.state.config.audit_capture != Capture::Off)
            .then(|| TypedLines {
                state: self.state.clone(),
                capture: LineCapture::default(),
                user: p.user.clone(),
                addr: addr_string(p.addr),
            });
        let reader = tokio::spawn(read_client(
            rx,
            ClientReader {
                id,
                handle,
                live: self.live.clone(),
                v5: p.v5,
                events: self.from_readers.clone(),
                silence: self.timeouts.heartbeat_timeout,
                typed,
            },
        ));
        self.live
            .participants
            .lock()
            .expect("participants lock")
            .push(ParticipantInfo {
                id,
                user: p.user.clone(),
                mode: p.role,
                remote_addr: addr_string(p.addr),
                joined_at: crate::api::format_time(now_ms()),
            });
        let role = match p.role {
            Role::Interactive => "",
            Role::Observe => " (observe)",
        };
        if announce {
            self.record(
                NewAuditRecord::new("session.joined")
                    .detail(serde_json::json!({"kind": self.live.kind, "mode": p.role})),
                Some((&p.user, addr_string(p.addr))),
            )
            .await;
            self.notice_all(&format!("{} joined{role}", p.user)).await;
        }
        self.members.push(Member {
            id,
            user: p.user.clone(),
            tx,
            reader,
        });
        tracing::info!(session = %self.live.id, user = %p.user, role = ?p.role, "client joined the session");
        if announce {
            let holders = self.live.holders();
            let size = match *self.live.size.lock().expect("size lock") {
                Some((w, h)) => format!(", terminal {w}x{h}"),
                None => String::new(),
            };
            let text = match p.role {
                Role::Interactive => format!(
                    "joined the console of {} shared with {holders}{size}",
                    self.live.agent
                ),
                Role::Observe => format!(
                    "observing the console of {} ({holders}{size}); input is ignored",
                    self.live.agent
                ),
            };
            self.notice(id, &text).await;
        }
    }

    /// Records something that happened in this session (already done, so
    /// a storage failure is logged rather than undoing it).
    async fn record(&self, record: NewAuditRecord, who: Option<(&str, Option<String>)>) {
        let mut record = record.agent(&self.live.agent).session(&self.live.id);
        if let Some((user, addr)) = who {
            record.user = Some(user.to_string());
            record.remote_addr = addr;
        }
        self.state.audit_after(record).await;
    }

    async fn record_left(&self, user: &str, why: &str) {
        self.record(
            NewAuditRecord::new("session.left")
                .detail(serde_json::json!({"kind": self.live.kind, "why": why})),
            Some((user, None)),
        )
        .await;
    }

    async fn record_timeout(&self, which: &str, message: &str) {
        self.record(
            NewAuditRecord::new("session.timed_out").detail(
                serde_json::json!({"kind": self.live.kind, "timeout": which, "message": message}),
            ),
            None,
        )
        .await;
    }

    /// The captured output (with `full`) and the closing record, written
    /// before the clients get their status.
    async fn record_end(&mut self, status: &Status) {
        if let Some(o) = self.output.take()
            && !o.is_empty()
        {
            self.record(
                NewAuditRecord::new("session.output").detail(o.detail()),
                None,
            )
            .await;
        }
        let live = &self.live;
        let detail = serde_json::json!({
            "kind": live.kind,
            "command": live.command,
            "status": status.status,
            "reason": status.reason,
            "message": status.message,
            "exit_code": status.exit_code(),
            "duration_ms": now_ms() - live.started_at_ms,
            "bytes_in": live.bytes_in.load(Ordering::Relaxed),
            "bytes_out": live.bytes_out.load(Ordering::Relaxed),
        });
        let outcome = if status.status == "Success" || status.exit_code().is_some() {
            "ok"
        } else {
            "failed"
        };
        self.record(
            NewAuditRecord::new("session.closed")
                .outcome(outcome)
                .detail(detail),
            Some((&live.opened_by, live.opened_from.clone())),
        )
        .await;
    }

    /// Removes a member; returns its user when it was there.
    fn remove(&mut self, id: u64) -> Option<String> {
        let at = self.members.iter().position(|m| m.id == id)?;
        let m = self.members.swap_remove(at);
        m.reader.abort();
        self.live
            .participants
            .lock()
            .expect("participants lock")
            .retain(|p| p.id != id);
        Some(m.user)
    }

    /// Sends messages to every member; a member that fails or does not take
    /// them within the heartbeat timeout is dropped.
    async fn broadcast(&mut self, batch: Vec<Message>) {
        let deadline = self.timeouts.heartbeat_timeout;
        let failed: Vec<u64> = if self.members.len() == 1 {
            let m = &mut self.members[0];
            if send_batch(&mut m.tx, batch, deadline).await {
                vec![]
            } else {
                vec![m.id]
            }
        } else {
            // Every member gets the batch at once. Once the first has taken
            // it, the others get LAG_ALLOWANCE more, so one stalled observer
            // cannot hold everyone else back for the whole heartbeat timeout.
            let started = tokio::time::Instant::now();
            let mut sends: FuturesUnordered<_> = self
                .members
                .iter_mut()
                .map(|m| {
                    let batch = batch.clone();
                    async move { (m.id, send_batch(&mut m.tx, batch, deadline).await) }
                })
                .collect();
            let mut failed = Vec::new();
            let mut ids_done = Vec::new();
            let mut cutoff = started + deadline;
            loop {
                match tokio::time::timeout_at(cutoff, sends.next()).await {
                    Ok(Some((id, ok))) => {
                        ids_done.push(id);
                        if !ok {
                            failed.push(id);
                        } else {
                            cutoff = cutoff.min(tokio::time::Instant::now() + LAG_ALLOWANCE);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        drop(sends);
                        failed.extend(
                            self.members
                                .iter()
                                .map(|m| m.id)
                                .filter(|id| !ids_done.contains(id)),
                        );
                        break;
                    }
                }
            }
            failed
        };
        for id in failed {
            if let Some(user) = self.remove(id) {
                tracing::info!(session = %self.live.id, %user, "client dropped: it stopped taking output");
            }
        }
    }

    async fn notice(&mut self, id: u64, text: &str) {
        let deadline = self.timeouts.heartbeat_timeout;
        if let Some(m) = self.members.iter_mut().find(|m| m.id == id) {
            let _ = send_batch(&mut m.tx, vec![notice_message(text)], deadline).await;
        }
    }

    async fn notice_all(&mut self, text: &str) {
        self.broadcast(vec![notice_message(text)]).await;
    }

    /// Sends the final status and closes every client.
    async fn finish(&mut self, status: Status) {
        let status = Bytes::from(status.to_message());
        let close = self.timeouts.close;
        let finishes = self.members.iter_mut().map(|m| {
            m.reader.abort();
            let status = status.clone();
            async move {
                let work = async {
                    m.tx.send(Message::Binary(status)).await?;
                    m.tx.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    })))
                    .await?;
                    m.tx.close().await
                };
                let _ = tokio::time::timeout(close, work).await;
            }
        });
        futures_util::future::join_all(finishes).await;
    }
}

async fn send_batch(
    tx: &mut SplitSink<ServerWs, Message>,
    batch: Vec<Message>,
    deadline: Duration,
) -> bool {
    let work = async {
        for m in batch {
            tx.feed(m).await?;
        }
        tx.flush().await
    };
    matches!(tokio::time::timeout(deadline, work).await, Ok(Ok(())))
}

/// A line from gatekey itself, on the stderr channel.
fn notice_message(text: &str) -> Message {
    let mut b = Vec::with_capacity(text.len() + 12);
    b.push(channel::STDERR);
    b.extend_from_slice(b"gatekey: ");
    b.extend_from_slice(text.as_bytes());
    b.push(b'\n');
    Message::Binary(Bytes::from(b))
}

/// What a client's reader works with.
struct ClientReader {
    id: u64,
    /// None for observers.
    handle: Option<StreamHandle>,
    live: Arc<Live>,
    v5: bool,
    events: mpsc::UnboundedSender<FromReader>,
    /// Silence after which the client is considered gone.
    silence: Duration,
    typed: Option<TypedLines>,
}

/// Client → agent: stdin (waiting for credit, so a fast client is slowed by
/// TCP backpressure rather than buffered), resize, and stdin EOF (once).
/// Observers have no `handle`: their input is refused.
async fn read_client(mut rx: SplitStream<ServerWs>, reader: ClientReader) {
    let ClientReader {
        id,
        handle,
        live,
        v5,
        events,
        silence,
        mut typed,
    } = reader;
    let gone = |why| {
        let _ = events.send(FromReader::Gone { id, why });
    };
    let mut stdin_closed = false;
    let mut told_read_only = false;
    let mut ahead: Option<Message> = None;
    loop {
        let msg = match ahead.take() {
            Some(m) => m,
            None => match tokio::time::timeout(silence, rx.next()).await {
                Err(_) => return gone("the client stopped answering"),
                Ok(Some(Ok(m))) => m,
                Ok(_) => return gone("the client disconnected"),
            },
        };
        let data = match msg {
            Message::Binary(d) => d,
            Message::Close(_) => return gone("the client disconnected"),
            _ => continue,
        };
        let Some(&ch) = data.first() else { continue };
        let Some(handle) = &handle else {
            if ch == channel::STDIN && !told_read_only {
                told_read_only = true;
                let _ = events.send(FromReader::Notice {
                    id,
                    text: "this is a read-only view (observe): input is ignored".into(),
                });
            }
            continue;
        };
        let sent = match ch {
            channel::STDIN if !stdin_closed && data.len() > 1 => {
                live.bytes_in
                    .fetch_add(data.len() as u64 - 1, Ordering::Relaxed);
                live.touch();
                // A typed line is on record before the remote shell sees its Enter.
                if let Some(t) = &mut typed
                    && !t.record(&live, &data[1..]).await
                {
                    return gone("its input could not be written to the audit log");
                }
                // While waiting for credit, read one message ahead so that a
                // client that closes (Ctrl-C) is noticed even though the
                // remote process is not reading its stdin.
                let send = handle.send_data(CH_STDIN, data.slice(1..));
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => break r,
                        m = rx.next(), if ahead.is_none() => match m {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return gone("the client disconnected"),
                            Some(Ok(m)) => ahead = Some(m),
                        },
                    }
                }
            }
            channel::RESIZE => match serde_json::from_slice::<TerminalSize>(&data[1..]) {
                Ok(size) if size.width > 0 && size.height > 0 => {
                    *live.size.lock().expect("size lock") = Some((size.width, size.height));
                    handle
                        .send_resize(size.width as u32, size.height as u32)
                        .await
                }
                _ => Ok(()),
            },
            channel::CLOSE if v5 && data.get(1) == Some(&channel::STDIN) && !stdin_closed => {
                stdin_closed = true;
                handle.send_eof(CH_STDIN).await
            }
            _ => Ok::<(), LinkClosed>(()),
        };
        if sent.is_err() {
            // The stream ended on the agent's side; its final event is on the way.
            return;
        }
    }
}

/// Console input turned into `session.input` records.
struct TypedLines {
    state: AppState,
    capture: LineCapture,
    user: String,
    addr: Option<String>,
}

impl TypedLines {
    /// Records the lines this input completes; false when the log refused.
    async fn record(&mut self, live: &Live, input: &[u8]) -> bool {
        for line in self.capture.feed(input) {
            let record = NewAuditRecord {
                user: Some(self.user.clone()),
                remote_addr: self.addr.clone(),
                ..NewAuditRecord::new("session.input")
                    .agent(&live.agent)
                    .session(&live.id)
                    .detail(serde_json::json!({"line": line}))
            };
            if self.state.audit(record).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// The status to send for an event that ends the session, if it does.
fn final_event(event: Event) -> Option<Status> {
    match event {
        Event::Exit(x) => Some(exit_status(&x)),
        Event::Cancelled(r) => Some(Status::failure(
            channel::REASON_SESSION_LOST,
            format!("the agent ended the session: {r}"),
        )),
        Event::LinkClosed(r) => Some(Status::failure(
            channel::REASON_SESSION_LOST,
            format!("the agent's link closed: {r}"),
        )),
        Event::Rejected(r) => Some(Status::failure(channel::REASON_INTERNAL, r.message)),
        Event::Data(_) | Event::Eof(_) | Event::Accepted(_) | Event::Resize(_) => None,
    }
}

fn human(d: Duration) -> String {
    gatekey_proto::duration::format(d)
}
