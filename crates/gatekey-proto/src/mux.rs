//! Streams multiplexed on one agent-link WebSocket, with per-stream flow control.
//!
//! The control plane (the *opener*) opens streams; the agent (the *acceptor*)
//! accepts or rejects them. Each direction of a stream has a credit window, as
//! SSH channels and HTTP/2 streams do: a sender never has more than the
//! receiver's window of unacknowledged data bytes in flight, and the receiver
//! grants credit (`WindowUpdate`) only once it has passed bytes on. A slow
//! reader therefore slows its own producer and nobody else, and the bytes
//! queued for a stream never exceed its window.
//!
//! One reader task demultiplexes incoming messages; it never waits on a
//! stream, so a stalled stream cannot stall the link. One writer task owns the
//! WebSocket sink, coalesces queued messages into one flush, and sends
//! heartbeat pings. A link that hears nothing for `heartbeat_timeout` is
//! declared dead and every stream on it ends with [`Event::LinkClosed`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::limits;
use crate::link::{
    self, Accept, Cancel, DataFrame, Eof, Exit, Frame, Open, Reject, Resize, WindowUpdate,
    control::Msg,
};

/// Settings of one link.
#[derive(Clone, Debug)]
pub struct MuxConfig {
    /// Bytes of data this side buffers per stream before the peer must wait.
    pub recv_window: u32,
    /// Largest data payload this side sends in one message.
    pub max_frame: u32,
    /// How often to ping the peer.
    pub heartbeat_interval: Duration,
    /// Declare the peer dead after hearing nothing for this long.
    pub heartbeat_timeout: Duration,
    /// Messages queued for the writer before senders wait.
    pub out_queue: usize,
    /// Streams an acceptor queues before it has handled their `Open`.
    pub accept_queue: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            recv_window: limits::DEFAULT_WINDOW,
            max_frame: limits::MAX_FRAME,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            out_queue: 64,
            accept_queue: 64,
        }
    }
}

/// Which end of the link this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opens streams (the control plane).
    Opener,
    /// Accepts streams (the agent).
    Acceptor,
}

/// What a stream's owner hears from the peer.
#[derive(Debug)]
pub enum Event {
    /// The agent accepted the stream (opener side; already credited).
    Accepted(Accept),
    /// The agent refused the stream. Final.
    Rejected(Reject),
    /// Data on a channel. Pass it on, then call [`Stream::consumed`].
    Data(DataFrame),
    /// The peer will send nothing more on this channel.
    Eof(u8),
    /// The process ended. Final.
    Exit(Exit),
    /// The terminal size changed (acceptor side).
    Resize(Resize),
    /// The peer abandoned the stream. Final.
    Cancelled(String),
    /// The link went away. Final.
    LinkClosed(String),
}

/// Why opening a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{message}")]
    Rejected {
        code: link::RejectCode,
        message: String,
    },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("agent link closed: {0}")]
    LinkClosed(String),
    #[error("the agent cancelled the stream: {0}")]
    Cancelled(String),
}

/// The link is gone; nothing more can be sent.
#[derive(Debug, thiserror::Error)]
#[error("agent link closed")]
pub struct LinkClosed;

/// A stream the peer opened, waiting to be accepted or rejected (acceptor side).
pub struct Incoming {
    pub open: Open,
    pub stream: Stream,
}

/// Handle to a running link. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

struct Inner {
    side: Side,
    cfg: MuxConfig,
    out: mpsc::Sender<Message>,
    streams: Mutex<HashMap<u32, Slot>>,
    /// Opener: next id to allocate. Acceptor: one past the highest id seen.
    next_id: AtomicU32,
    closed: watch::Sender<Option<String>>,
    pongs: watch::Sender<u64>,
    ping_seq: AtomicU64,
}

struct Slot {
    events: mpsc::UnboundedSender<Event>,
    /// Events queued and not yet taken by the stream's owner. Flow control
    /// bounds queued *bytes*; this bounds queued *messages* (tiny frames, EOFs,
    /// resizes), so a hostile peer cannot grow the queue without limit.
    queued: Arc<AtomicUsize>,
    credit: Arc<Semaphore>,
    /// Bytes received and not yet granted back; never above `recv_window`.
    outstanding: u64,
    done: Arc<AtomicBool>,
}

/// Most events queued on one stream before it is cancelled as abusive.
const MAX_QUEUED_EVENTS: usize = 65_536;

impl Slot {
    /// Queues an event; false when the stream already has too many queued.
    fn push(&self, event: Event) -> bool {
        let n = self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(event);
        n < MAX_QUEUED_EVENTS
    }
}

/// Largest credit a peer may grant in total; beyond it is a protocol violation.
const MAX_CREDIT: usize = 2 * limits::MAX_WINDOW as usize;

impl Mux {
    /// Starts the reader and writer tasks on an established WebSocket.
    /// The acceptor side also gets the queue of streams the peer opens.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        cfg: MuxConfig,
        side: Side,
    ) -> (Mux, Option<mpsc::Receiver<Incoming>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(cfg.out_queue.max(1));
        let (accept_tx, accept_rx) = match side {
            Side::Acceptor => {
                let (tx, rx) = mpsc::channel(cfg.accept_queue.max(1));
                (Some(tx), Some(rx))
            }
            Side::Opener => (None, None),
        };
        let inner = Arc::new(Inner {
            side,
            cfg,
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed: watch::channel(None).0,
            pongs: watch::channel(0).0,
            ping_seq: AtomicU64::new(0),
        });
        tokio::spawn(write_loop(inner.clone(), sink, out_rx));
        tokio::spawn(read_loop(inner.clone(), stream, accept_tx));
        (Mux { inner }, accept_rx)
    }

    /// Opens a stream (opener side) and waits up to `timeout` for the agent's answer.
    /// Fills in the stream id, window and frame size of `open`.
    pub async fn open(
        &self,
        mut open: Open,
        timeout: Duration,
    ) -> Result<(Stream, Accept), OpenError> {
        debug_assert_eq!(self.inner.side, Side::Opener);
        let Ok(id) = self
            .inner
            .next_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| id.checked_add(1))
        else {
            self.close(1008, "stream ids exhausted; reconnect");
            return Err(OpenError::LinkClosed("stream ids exhausted".into()));
        };
        open.stream_id = id;
        open.initial_window = self.inner.cfg.recv_window;
        open.max_frame = self.inner.cfg.max_frame;
        let mut stream = self
            .register(id, 0)
            .ok_or_else(|| OpenError::LinkClosed(self.close_reason()))?;
        if stream.handle.send_control(Msg::Open(open)).await.is_err() {
            return Err(OpenError::LinkClosed(self.close_reason()));
        }
        match tokio::time::timeout(timeout, stream.next()).await {
            Err(_) => Err(OpenError::Timeout(timeout)),
            Ok(Some(Event::Accepted(a))) => Ok((stream, a)),
            Ok(Some(Event::Rejected(r))) => {
                stream.handle.done.store(true, Ordering::Relaxed);
                Err(OpenError::Rejected {
                    code: link::RejectCode::try_from(r.code)
                        .unwrap_or(link::RejectCode::Unspecified),
                    message: r.message,
                })
            }
            Ok(Some(Event::Cancelled(reason))) => Err(OpenError::Cancelled(reason)),
            Ok(Some(Event::LinkClosed(reason))) => Err(OpenError::LinkClosed(reason)),
            Ok(Some(other)) => Err(OpenError::Cancelled(format!(
                "unexpected answer to open: {other:?}"
            ))),
            Ok(None) => Err(OpenError::LinkClosed(self.close_reason())),
        }
    }

    /// Sends a ping and waits up to `timeout` for any pong: proof the peer is alive.
    pub async fn probe(&self, timeout: Duration) -> bool {
        let mut pongs = self.inner.pongs.subscribe();
        pongs.borrow_and_update();
        let seq = self.inner.ping_seq.fetch_add(1, Ordering::Relaxed);
        // A full writer queue means the peer is not draining: not alive.
        if self
            .inner
            .out
            .try_send(Message::Ping(Bytes::copy_from_slice(&seq.to_be_bytes())))
            .is_err()
        {
            return false;
        }
        matches!(
            tokio::time::timeout(timeout, pongs.changed()).await,
            Ok(Ok(()))
        )
    }

    /// Closes the link with a WebSocket close code and reason.
    pub fn close(&self, code: u16, reason: &str) {
        let reason = close_reason_text(reason);
        self.send_close(code, &reason);
        self.inner.shutdown(&format!("closed locally: {reason}"));
    }

    /// Closes the link only if no stream is open on it, and says whether it
    /// did. A stream opening at the same moment either registers first
    /// (and the link stays) or finds the link closed.
    pub fn close_if_idle(&self, code: u16, reason: &str) -> bool {
        let reason = close_reason_text(reason);
        if !self
            .inner
            .end(&format!("closed locally: {reason}"), Ending::IfIdle)
        {
            return false;
        }
        self.send_close(code, &reason);
        true
    }

    fn send_close(&self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        let _ = self.inner.out.try_send(Message::Close(Some(frame)));
    }

    /// Resolves when the link is closed, with the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.closed.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return "link dropped".into();
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.borrow().is_some()
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.inner.streams.lock().expect("streams lock").len()
    }

    fn close_reason(&self) -> String {
        self.inner
            .closed
            .borrow()
            .clone()
            .unwrap_or_else(|| "link closed".into())
    }

    fn register(&self, id: u32, initial_credit: u32) -> Option<Stream> {
        self.inner.register(id, initial_credit)
    }
}

impl Inner {
    fn register(self: &Arc<Self>, id: u32, initial_credit: u32) -> Option<Stream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(initial_credit as usize));
        let done = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        let slot = Slot {
            events: tx,
            queued: queued.clone(),
            credit: credit.clone(),
            outstanding: 0,
            done: done.clone(),
        };
        // Checked under the lock `shutdown` drains with, so no stream can be
        // added after the link's streams were ended.
        let mut streams = self.streams.lock().expect("streams lock");
        if self.closed.borrow().is_some() || streams.contains_key(&id) {
            return None;
        }
        streams.insert(id, slot);
        drop(streams);
        Some(Stream {
            handle: StreamHandle {
                id,
                inner: self.clone(),
                credit,
                done,
            },
            events: rx,
            queued,
            pending_grant: 0,
        })
    }

    fn remove(&self, id: u32) -> Option<Slot> {
        let slot = self.streams.lock().expect("streams lock").remove(&id);
        if let Some(s) = &slot {
            s.credit.close();
            s.done.store(true, Ordering::Relaxed);
        }
        slot
    }

    /// Marks the link closed and ends every stream on it.
    fn shutdown(&self, reason: &str) {
        self.end(reason, Ending::Always);
    }

    /// Marks the link closed and ends its streams; whether this call did.
    /// With [`Ending::IfIdle`] only while no stream is open: marked under
    /// the streams lock, so none registers after the check.
    fn end(&self, reason: &str, ending: Ending) -> bool {
        let mut streams = self.streams.lock().expect("streams lock");
        if ending == Ending::IfIdle && !streams.is_empty() {
            return false;
        }
        let first = self.closed.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.to_string());
                true
            } else {
                false
            }
        });
        if !first {
            return false;
        }
        let slots: Vec<Slot> = streams.drain().map(|(_, s)| s).collect();
        drop(streams);
        for s in slots {
            s.credit.close();
            s.done.store(true, Ordering::Relaxed);
            let _ = s.push(Event::LinkClosed(reason.to_string()));
        }
        true
    }

    fn try_send_control(&self, msg: Msg) {
        if self
            .out
            .try_send(Message::Binary(link::encode_control(msg.clone())))
            .is_err()
            && self.closed.borrow().is_none()
        {
            // Queue full: send from a task rather than drop a control message.
            let out = self.out.clone();
            tokio::spawn(async move {
                let _ = out.send(Message::Binary(link::encode_control(msg))).await;
            });
        }
    }

    /// Whether `id` names a stream that was ever opened on this link.
    fn ever_opened(&self, id: u32) -> bool {
        id != 0 && id < self.next_id.load(Ordering::Relaxed)
    }
}

/// One stream: its events and the means to answer on it.
pub struct Stream {
    handle: StreamHandle,
    events: mpsc::UnboundedReceiver<Event>,
    queued: Arc<AtomicUsize>,
    pending_grant: u32,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.handle.id
    }

    /// The sending half; clone it into the tasks that produce data.
    pub fn handle(&self) -> StreamHandle {
        self.handle.clone()
    }

    /// Next event; `None` after a final event has been delivered.
    pub async fn next(&mut self) -> Option<Event> {
        let e = self.events.recv().await;
        self.taken(e.is_some());
        e
    }

    fn taken(&self, some: bool) {
        if some {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The next event if one is already queued.
    pub fn try_next(&mut self) -> Option<Event> {
        let e = self.events.try_recv().ok();
        self.taken(e.is_some());
        e
    }

    /// Reports that `n` bytes of received data were passed on, so the peer
    /// may send more. Grants are batched to a quarter of the window.
    pub fn consumed(&mut self, n: usize) {
        self.pending_grant = self.pending_grant.saturating_add(n as u32);
        if self.pending_grant >= self.handle.inner.cfg.recv_window / 4 {
            self.flush_grant();
        }
    }

    fn flush_grant(&mut self) {
        let n = std::mem::take(&mut self.pending_grant);
        if n == 0 || self.handle.done.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut streams = self.handle.inner.streams.lock().expect("streams lock");
            match streams.get_mut(&self.handle.id) {
                Some(slot) => slot.outstanding = slot.outstanding.saturating_sub(n as u64),
                None => return,
            }
        }
        self.handle
            .inner
            .try_send_control(Msg::WindowUpdate(WindowUpdate {
                stream_id: self.handle.id,
                increment: n,
            }));
    }

    /// Accepts a stream the peer opened (acceptor side), granting it `window` bytes.
    pub async fn accept(&self, pid: u32) -> Result<(), LinkClosed> {
        let window = self.handle.inner.cfg.recv_window;
        self.handle
            .send_control(Msg::Accept(Accept {
                stream_id: self.handle.id,
                initial_window: window,
                pid,
            }))
            .await
    }

    /// Refuses a stream the peer opened (acceptor side).
    pub async fn reject(self, code: link::RejectCode, message: &str) {
        self.handle.done.store(true, Ordering::Relaxed);
        let _ = self
            .handle
            .send_control(Msg::Reject(Reject {
                stream_id: self.handle.id,
                code: code as i32,
                message: message.to_string(),
            }))
            .await;
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let inner = &self.handle.inner;
        let was_done = self.handle.done.load(Ordering::Relaxed);
        if inner.remove(self.handle.id).is_some() && !was_done {
            inner.try_send_control(Msg::Cancel(Cancel {
                stream_id: self.handle.id,
                reason: "stream closed".into(),
            }));
        }
    }
}

/// The sending half of a stream. Cheap to clone.
#[derive(Clone)]
pub struct StreamHandle {
    id: u32,
    inner: Arc<Inner>,
    credit: Arc<Semaphore>,
    /// A final event was received or sent: no more grants or cancels.
    done: Arc<AtomicBool>,
}

impl StreamHandle {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends data on `channel`, waiting for credit; splits into frames.
    pub async fn send_data(&self, channel: u8, mut data: Bytes) -> Result<(), LinkClosed> {
        while !data.is_empty() {
            let n = self.acquire_up_to(data.len().min(self.max_frame())).await?;
            let chunk = data.split_to(n);
            self.push(Message::Binary(link::encode_data(self.id, channel, &chunk)))
                .await?;
        }
        Ok(())
    }

    /// Sends a data message built with [`link::put_data_header`] for this
    /// stream, without copying when the credit covers it whole (the usual
    /// case); otherwise it is split into what the credit allows.
    pub async fn send_frame(&self, frame: BytesMut) -> Result<(), LinkClosed> {
        let n = frame.len().saturating_sub(link::DATA_HEADER_LEN);
        if n == 0 {
            return Ok(());
        }
        let got = self.acquire_up_to(n.min(self.max_frame())).await?;
        if got == n {
            return self.push(Message::Binary(frame.freeze())).await;
        }
        let channel = frame[link::DATA_HEADER_LEN - 1];
        let payload = frame.freeze().slice(link::DATA_HEADER_LEN..);
        self.push(Message::Binary(link::encode_data(
            self.id,
            channel,
            &payload[..got],
        )))
        .await?;
        self.send_data(channel, payload.slice(got..)).await
    }

    /// Largest payload to put in one [`send_frame`](Self::send_frame).
    pub fn max_frame(&self) -> usize {
        self.inner.cfg.max_frame as usize
    }

    pub async fn send_eof(&self, channel: u8) -> Result<(), LinkClosed> {
        self.send_control(Msg::Eof(Eof {
            stream_id: self.id,
            channel: channel as u32,
        }))
        .await
    }

    pub async fn send_resize(&self, cols: u32, rows: u32) -> Result<(), LinkClosed> {
        self.send_control(Msg::Resize(Resize {
            stream_id: self.id,
            cols,
            rows,
        }))
        .await
    }

    /// Reports the process's end (acceptor side). The stream is finished.
    pub async fn send_exit(&self, mut exit: Exit) -> Result<(), LinkClosed> {
        exit.stream_id = self.id;
        let r = self.send_control(Msg::Exit(exit)).await;
        self.done.store(true, Ordering::Relaxed);
        self.inner.remove(self.id);
        r
    }

    /// Abandons the stream, telling the peer why.
    pub async fn cancel(&self, reason: &str) {
        if !self.done.swap(true, Ordering::Relaxed) {
            let _ = self
                .send_control(Msg::Cancel(Cancel {
                    stream_id: self.id,
                    reason: reason.to_string(),
                }))
                .await;
        }
        if let Some(slot) = self.inner.remove(self.id) {
            let _ = slot.push(Event::Cancelled(reason.to_string()));
        }
    }

    /// Waits for credit and takes as much of `n` (at least 1) as there is.
    /// Never waiting for a whole frame means a frame larger than what the
    /// receiver holds back can never deadlock the stream.
    async fn acquire_up_to(&self, n: usize) -> Result<usize, LinkClosed> {
        debug_assert!(n > 0);
        self.credit
            .acquire()
            .await
            .map_err(|_| LinkClosed)?
            .forget();
        let more = self.credit.available_permits().min(n - 1);
        if more > 0 {
            match self.credit.try_acquire_many(more as u32) {
                Ok(p) => p.forget(),
                Err(_) => return Ok(1),
            }
        }
        Ok(1 + more)
    }

    async fn send_control(&self, msg: Msg) -> Result<(), LinkClosed> {
        self.push(Message::Binary(link::encode_control(msg))).await
    }

    async fn push(&self, msg: Message) -> Result<(), LinkClosed> {
        if self.inner.closed.borrow().is_some() {
            return Err(LinkClosed);
        }
        self.inner.out.send(msg).await.map_err(|_| LinkClosed)
    }
}

async fn write_loop<S>(
    inner: Arc<Inner>,
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut out: mpsc::Receiver<Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut closed = inner.closed.subscribe();
    let mut ping = tokio::time::interval(inner.cfg.heartbeat_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    // A peer that stops reading (zero TCP window) must not pin the writer,
    // and the messages queued for it, forever: each write gets the
    // heartbeat timeout.
    let stall = inner.cfg.heartbeat_timeout;
    let reason = loop {
        tokio::select! {
            biased;
            msg = out.recv() => {
                let Some(msg) = msg else { break "writer queue closed".to_string() };
                let write = async {
                    let mut closing = matches!(msg, Message::Close(_));
                    sink.feed(msg).await?;
                    // Coalesce whatever else is queued into one flush.
                    while !closing {
                        let Ok(more) = out.try_recv() else { break };
                        closing = matches!(more, Message::Close(_));
                        sink.feed(more).await?;
                    }
                    sink.flush().await?;
                    Ok::<bool, tokio_tungstenite::tungstenite::Error>(closing)
                };
                match tokio::time::timeout(stall, write).await {
                    Ok(Ok(true)) => break "closed".to_string(),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => break format!("write failed: {e}"),
                    Err(_) => break format!("write stalled for {}s", stall.as_secs()),
                }
            }
            _ = ping.tick() => {
                let seq = inner.ping_seq.fetch_add(1, Ordering::Relaxed);
                let ping = sink.send(Message::Ping(Bytes::copy_from_slice(&seq.to_be_bytes())));
                match tokio::time::timeout(stall, ping).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break format!("write failed: {e}"),
                    Err(_) => break format!("write stalled for {}s", stall.as_secs()),
                }
            }
            _ = closed.changed() => {
                // Flush a queued close frame, if any, then stop.
                while let Ok(m) = out.try_recv() {
                    if matches!(m, Message::Close(_)) {
                        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(m)).await;
                        break;
                    }
                }
                break "closed".to_string();
            }
        }
    };
    inner.shutdown(&reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

async fn read_loop<S>(
    inner: Arc<Inner>,
    mut stream: SplitStream<WebSocketStream<S>>,
    accept: Option<mpsc::Sender<Incoming>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut closed = inner.closed.subscribe();
    let timeout = inner.cfg.heartbeat_timeout;
    let reason = loop {
        let next = tokio::select! {
            n = tokio::time::timeout(timeout, stream.next()) => n,
            _ = closed.changed() => return,
        };
        let msg = match next {
            Err(_) => break format!("no heartbeat from the peer within {}s", timeout.as_secs()),
            Ok(None) => break "connection closed".to_string(),
            Ok(Some(Err(e))) => break format!("read failed: {e}"),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(raw) => match link::decode(raw) {
                Ok(frame) => {
                    if let Err(violation) = handle_frame(&inner, frame, accept.as_ref()) {
                        protocol_error(&inner, &violation);
                        break format!("protocol error: {violation}");
                    }
                }
                Err(e) => {
                    protocol_error(&inner, &e.to_string());
                    break format!("protocol error: {e}");
                }
            },
            Message::Pong(_) => {
                inner.pongs.send_modify(|n| *n += 1);
            }
            Message::Ping(_) | Message::Frame(_) => {}
            Message::Text(_) => {
                protocol_error(&inner, "text message on the agent link");
                break "protocol error: text message on the agent link".to_string();
            }
            Message::Close(frame) => {
                break match frame {
                    Some(f) if !f.reason.is_empty() => format!("closed by peer: {}", f.reason),
                    _ => "closed by peer".to_string(),
                };
            }
        }
    };
    inner.shutdown(&reason);
}

fn protocol_error(inner: &Inner, what: &str) {
    let mut reason = format!("protocol error: {what}");
    reason.truncate(120);
    let _ = inner.out.try_send(Message::Close(Some(CloseFrame {
        code: CloseCode::Protocol,
        reason: reason.into(),
    })));
}

/// Routes one message. An `Err` is a link-level protocol violation.
fn handle_frame(
    inner: &Arc<Inner>,
    frame: Frame,
    accept: Option<&mpsc::Sender<Incoming>>,
) -> Result<(), String> {
    match frame {
        Frame::Data(data) => {
            let id = data.stream_id();
            let len = data.len() as u64;
            if len == 0 {
                return Err("empty data message".into());
            }
            let mut streams = inner.streams.lock().expect("streams lock");
            let Some(slot) = streams.get_mut(&id) else {
                drop(streams);
                return unknown_stream(inner, id);
            };
            // Only the opener sends stdin; only the acceptor sends output.
            let expected = match inner.side {
                Side::Opener => matches!(data.channel(), link::CH_STDOUT | link::CH_STDERR),
                Side::Acceptor => data.channel() == link::CH_STDIN,
            };
            slot.outstanding += len;
            let violation = if !expected {
                Some("data on an unexpected channel")
            } else if slot.outstanding > inner.cfg.recv_window as u64 {
                Some("data beyond the flow-control window")
            } else if !slot.push(Event::Data(data)) {
                Some("too many queued messages")
            } else {
                None
            };
            drop(streams);
            if let Some(what) = violation {
                stream_violation(inner, id, what);
            }
            Ok(())
        }
        Frame::Control(msg) => handle_control(inner, msg, accept),
    }
}

fn handle_control(
    inner: &Arc<Inner>,
    msg: Msg,
    accept: Option<&mpsc::Sender<Incoming>>,
) -> Result<(), String> {
    let id = match &msg {
        Msg::Hello(_) | Msg::Welcome(_) => {
            return Err("handshake message after the handshake".into());
        }
        Msg::Open(open) => {
            let Some(accept) = accept else {
                return Err("agents cannot open streams".into());
            };
            return handle_open(inner, open.clone(), accept);
        }
        other => link::stream_of(other).unwrap_or(0),
    };
    let mut streams = inner.streams.lock().expect("streams lock");
    let Some(slot) = streams.get_mut(&id) else {
        drop(streams);
        return unknown_stream(inner, id);
    };
    let credit = |slot: &Slot, n: u32| -> bool {
        if slot.credit.available_permits().saturating_add(n as usize) > MAX_CREDIT {
            return false;
        }
        slot.credit.add_permits(n as usize);
        true
    };
    match msg {
        Msg::Accept(a) => {
            if inner.side != Side::Opener
                || !(limits::MIN_WINDOW..=limits::MAX_WINDOW).contains(&a.initial_window)
            {
                drop(streams);
                stream_violation(inner, id, "invalid accept");
                return Ok(());
            }
            credit(slot, a.initial_window);
            slot.push(Event::Accepted(a));
        }
        Msg::WindowUpdate(w) => {
            if !credit(slot, w.increment) {
                drop(streams);
                stream_violation(inner, id, "window grown beyond the limit");
            }
        }
        Msg::Eof(_) | Msg::Resize(_) => {
            let event = match msg {
                Msg::Eof(e) => Event::Eof(e.channel.min(255) as u8),
                Msg::Resize(r) => Event::Resize(r),
                _ => unreachable!("matched above"),
            };
            if !slot.push(event) {
                drop(streams);
                stream_violation(inner, id, "too many queued messages");
            }
        }
        Msg::Reject(r) => {
            slot.push(Event::Rejected(r));
            drop(streams);
            inner.remove(id);
        }
        Msg::Exit(x) => {
            slot.push(Event::Exit(x));
            drop(streams);
            inner.remove(id);
        }
        Msg::Cancel(c) => {
            slot.push(Event::Cancelled(c.reason));
            drop(streams);
            inner.remove(id);
        }
        Msg::Hello(_) | Msg::Welcome(_) | Msg::Open(_) => unreachable!("handled above"),
    }
    Ok(())
}

fn handle_open(
    inner: &Arc<Inner>,
    open: Open,
    accept: &mpsc::Sender<Incoming>,
) -> Result<(), String> {
    let id = open.stream_id;
    if id == 0 || inner.ever_opened(id) {
        return Err(format!("open of stream {id}, which was already used"));
    }
    inner.next_id.store(id.saturating_add(1), Ordering::Relaxed);
    if !(limits::MIN_WINDOW..=limits::MAX_WINDOW).contains(&open.initial_window)
        || open.max_frame > limits::MAX_FRAME
    {
        inner.try_send_control(Msg::Reject(Reject {
            stream_id: id,
            code: link::RejectCode::Invalid as i32,
            message: "window or frame size out of range".into(),
        }));
        return Ok(());
    }
    let Some(stream) = inner.register(id, open.initial_window) else {
        return Ok(());
    };
    if let Err(e) = accept.try_send(Incoming { open, stream }) {
        let incoming = e.into_inner();
        incoming.stream.handle.done.store(true, Ordering::Relaxed);
        inner.remove(id);
        inner.try_send_control(Msg::Reject(Reject {
            stream_id: id,
            code: link::RejectCode::TooManySessions as i32,
            message: "the agent is busy accepting other sessions".into(),
        }));
    }
    Ok(())
}

/// A message for a stream that is not open. One that ended recently (its
/// peer had not yet heard) is ignored; one that was never opened breaks the
/// protocol and closes the link.
fn unknown_stream(inner: &Inner, id: u32) -> Result<(), String> {
    if inner.ever_opened(id) {
        Ok(())
    } else {
        Err(format!("message for stream {id}, which was never opened"))
    }
}

/// A stream broke the protocol: end that stream only.
fn stream_violation(inner: &Inner, id: u32, what: &str) {
    if let Some(slot) = inner.remove(id) {
        let _ = slot
            .events
            .send(Event::Cancelled(format!("protocol violation: {what}")));
    }
    inner.try_send_control(Msg::Cancel(Cancel {
        stream_id: id,
        reason: format!("protocol violation: {what}"),
    }));
}

/// Whether [`Inner::end`] ends a link with streams open.
#[derive(Clone, Copy, PartialEq)]
enum Ending {
    Always,
    IfIdle,
}

/// A close frame's reason must fit in 123 bytes.
fn close_reason_text(reason: &str) -> String {
    let mut reason = reason.to_string();
    while reason.len() > 123 {
        reason.pop();
    }
    reason
}
