//! A byte stream between two replicas over the bus, with the same credit
//! flow control as agent-link streams: a side never has more than `window`
//! unacknowledged bytes in flight, and grants credit back only once its own
//! reader has taken the bytes, so a slow client slows the producer on the
//! other replica and no broker queue grows past the window.
//!
//! Each tunnel carries one session (or one request) and uses two subjects
//! named after it: `session.ID.up` (towards the agent's replica)
//! and `…down` (towards the client's). On RabbitMQ they are auto-deleted
//! queues that vanish with the session. Either side pings when idle; a side
//! that hears nothing for `silence` ends the tunnel, as does a lost broker
//! connection, with the reason in [`Tunnel::ended`].
//!
//! Opening costs no round trip of its own: the open request carries the
//! first bytes written (a whole HTTP request, usually), the far side starts
//! serving them while it subscribes to `up`, and answers from it travel on
//! `down`, which the opening side listened on before asking (from a few
//! [`Inboxes`] made ahead). Nothing more goes `up` until the far side said
//! it listens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};

use super::tunnel_io::{self, Incoming, Outgoing, TunnelIo};
use crate::bus::{Bus, BusError, Msg, Subscription};

const DATA: u8 = 0;
const CREDIT: u8 = 1;
const EOF: u8 = 2;
const RESET: u8 = 3;
const PING: u8 = 4;
/// Data, then EOF: the last bytes and the end in one message.
const DATA_END: u8 = 5;

/// Largest data message (the bus may want them smaller) and the most each
/// side holds for its user, each way.
const CHUNK: usize = 256 * 1024;

/// Tunnel settings.
#[derive(Clone, Copy, Debug)]
pub struct TunnelConfig {
    /// Bytes in flight per direction.
    pub window: u32,
    /// A peer silent for this long is gone; pings go out at a third of it.
    pub silence: Duration,
    /// Time for the far replica to accept.
    pub open_timeout: Duration,
}

/// What the opening side tells the accepting side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenRequest {
    /// Also the id of the session the tunnel carries.
    pub id: String,
    /// The client's own address, for the audit log.
    pub client_addr: Option<SocketAddr>,
    /// The replica the client is connected to.
    pub from_replica: String,
    /// The opening replica's [`super::PROTOCOL`] (0 from versions before
    /// it was sent).
    #[serde(default)]
    pub protocol: u32,
    pub window: u32,
    /// Set when the open request carries the whole request and the opening
    /// side will send nothing more (see [`open_whole`]): where the answer
    /// goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// One end of a tunnel: read and write `io`; `ended` says why it broke.
pub struct Tunnel {
    pub io: TunnelIo,
    pub ended: watch::Receiver<Option<String>>,
    /// The opening side: whether the far side accepted, known once the
    /// first bytes written went out with the open request.
    pub opened: Option<oneshot::Receiver<Result<(), OpenError>>>,
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Refused(String),
}

fn up(id: &str) -> String {
    format!("session.{id}.up")
}

fn down(id: &str) -> String {
    format!("session.{id}.down")
}

/// Inboxes (`down` subscriptions, each under a fresh session id) made
/// ahead of need, so that opening a tunnel waits for nothing: on RabbitMQ
/// each is a queue, which costs two round trips to the broker.
pub struct Inboxes {
    bus: Bus,
    /// With the broker connection's loss count when made: one made before
    /// a loss may be dead.
    ready: Mutex<Vec<(String, Subscription, u64)>>,
    filling: AtomicBool,
}

/// Inboxes kept ready.
const READY_INBOXES: usize = 4;

impl Inboxes {
    pub fn new(bus: Bus) -> Arc<Inboxes> {
        Arc::new(Inboxes {
            bus,
            ready: Mutex::new(Vec::new()),
            filling: AtomicBool::new(false),
        })
    }

    /// A session id and a subscription to its `down` subject.
    pub async fn take(self: &Arc<Self>) -> Result<(String, Subscription), BusError> {
        let generation = *self.bus.lost().borrow();
        let ready = {
            let mut ready = self.ready.lock().expect("inboxes");
            ready.retain(|(_, _, g)| *g == generation);
            ready.pop()
        };
        self.fill();
        match ready {
            Some((id, inbox, _)) => Ok((id, inbox)),
            None => {
                let id = crate::live::new_session_id();
                let inbox = self.bus.subscribe(&down(&id)).await?;
                Ok((id, inbox))
            }
        }
    }

    /// Tops the ready inboxes up, in the background.
    pub fn fill(self: &Arc<Self>) {
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let generation = *this.bus.lost().borrow();
                if this.ready.lock().expect("inboxes").len() >= READY_INBOXES {
                    break;
                }
                let id = crate::live::new_session_id();
                match this.bus.subscribe(&down(&id)).await {
                    Ok(inbox) => this
                        .ready
                        .lock()
                        .expect("inboxes")
                        .push((id, inbox, generation)),
                    // The next take subscribes by itself and tries again.
                    Err(_) => break,
                }
            }
            this.filling.store(false, Ordering::Release);
        });
    }
}

/// Opens a tunnel to whoever listens on `subject`, with `inbox` listening
/// on `down` of `request.id` (from [`Inboxes::take`]). Returns at once: the
/// open request goes out with the first bytes written to the tunnel, and
/// [`Tunnel::opened`] tells how it was answered.
pub fn open(
    bus: &Bus,
    subject: &str,
    request: OpenRequest,
    config: TunnelConfig,
    inbox: Subscription,
) -> Tunnel {
    let peer = bus.name(&up(&request.id));
    opening(bus, subject, request, config, inbox, false, peer)
}

/// Opens a tunnel for a request answered at once (an HTTP request whose
/// body is already here): the first bytes written must be the whole
/// request, and they go with the open request; the answer comes back to an
/// [`Bus::inbox`], with no flow control (an answer is bounded by the API's
/// own limits) and no per-session queue, so the broker does no more than
/// carry two messages. Dropping the tunnel before the answer ended tells
/// the far side to stop.
pub async fn open_whole(
    bus: &Bus,
    subject: &str,
    mut request: OpenRequest,
    config: TunnelConfig,
) -> Result<Tunnel, BusError> {
    let (address, inbox) = bus.inbox(&request.id).await?;
    request.reply_to = Some(address);
    Ok(opening(
        bus,
        subject,
        request,
        config,
        inbox,
        true,
        String::new(),
    ))
}

/// The opening side of either kind of tunnel.
fn opening(
    bus: &Bus,
    subject: &str,
    mut request: OpenRequest,
    config: TunnelConfig,
    inbox: Subscription,
    whole: bool,
    peer: String,
) -> Tunnel {
    request.window = config.window;
    let mut head = vec![b'T'];
    head.extend(serde_json::to_vec(&request).expect("serializable"));
    head.push(b'\n');
    let (answer, opened) = oneshot::channel();
    let opening = Opening {
        subject: subject.to_string(),
        head,
        timeout: config.open_timeout,
        answer,
        whole: whole.then_some(request.id),
    };
    let mut t = start(
        bus.clone(),
        Inbox::Ready(inbox),
        peer,
        config,
        Some(opening),
        Bytes::new(),
    );
    t.opened = Some(opened);
    t
}

/// Tells the replica serving a request answered at once (see
/// [`open_whole`]) that nobody waits for the answer any more.
pub fn cancel_message(id: &str) -> Bytes {
    frame(b'X', id.as_bytes())
}

/// The session id in a [`cancel_message`].
pub fn parse_cancel(msg: &Msg) -> Option<&str> {
    let id = std::str::from_utf8(msg.payload.strip_prefix(b"X")?).ok()?;
    crate::cluster::valid_id(id).then_some(id)
}

/// Parses an open request (the message's payload starts with `T`): the
/// request, and the first bytes of the stream that came with it.
pub fn parse_open(msg: &Msg) -> Option<(OpenRequest, Bytes)> {
    let body = msg.payload.strip_prefix(b"T")?;
    let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
    let r: OpenRequest = serde_json::from_slice(&body[..end]).ok()?;
    let first = msg.payload.slice((1 + end + 1).min(msg.payload.len())..);
    crate::cluster::valid_id(&r.id).then_some((r, first))
}

/// Accepts an open request received on a listener's subscription: `first`
/// can be read from the tunnel at once, while it subscribes to `up` and
/// then answers.
pub fn accept(
    bus: &Bus,
    msg: &Msg,
    request: &OpenRequest,
    first: Bytes,
    mut config: TunnelConfig,
) -> Tunnel {
    config.window = request.window.clamp(CHUNK as u32, 64 << 20);
    if let Some(address) = &request.reply_to {
        let inbox = Inbox::Whole {
            request: msg.clone(),
        };
        return start(bus.clone(), inbox, address.clone(), config, None, first);
    }
    let inbox = Inbox::Accepting {
        subject: up(&request.id),
        request: msg.clone(),
    };
    let peer = bus.name(&down(&request.id));
    start(bus.clone(), inbox, peer, config, None, first)
}

/// Refuses an open request with a message for the client's replica.
pub async fn refuse(bus: &Bus, msg: &Msg, why: &str) {
    let _ = bus.respond(msg, Bytes::from(why.to_string())).await;
}

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + body.len());
    b.put_u8(tag);
    b.put_slice(body);
    b.freeze()
}

/// Credit the far side has granted us, shared by the two pumps: bytes, and
/// messages (so that many small messages can never overflow a subscription's
/// buffer, which a broker would answer by dropping some).
struct Credit {
    bytes: AtomicI64,
    msgs: AtomicI64,
    more: Notify,
}

/// Messages in flight per direction.
const MAX_MSGS: u32 = 256;

/// How far the sending side has got.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    /// The open request (with the first bytes) is out and unanswered:
    /// nothing else goes to the far side, which may not listen yet.
    Opening,
    Open,
    /// Our EOF is out (or sending failed: the broker connection is down,
    /// which the receiver reports).
    Done,
    /// The far side did not accept, for this reason.
    Refused(String),
}

/// The opening side's open request, sent with the first bytes.
struct Opening {
    subject: String,
    /// `T`, the request as JSON, a newline.
    head: Vec<u8>,
    timeout: Duration,
    answer: oneshot::Sender<Result<(), OpenError>>,
    /// A request answered at once, with its session id: the open request
    /// carries all of it, and nothing else is ever sent.
    whole: Option<String>,
}

/// Where the far side's messages arrive.
enum Inbox {
    Ready(Subscription),
    /// The accepting side: subscribe to `subject`, then answer `request`.
    Accepting {
        subject: String,
        request: Msg,
    },
    /// The accepting side of a request answered at once: the opening side
    /// sends nothing more, so there is nothing to listen to.
    Whole {
        request: Msg,
    },
}

/// `peer` is the far side's address named in full (for [`Bus::send_to`]).
fn start(
    bus: Bus,
    inbox: Inbox,
    peer: String,
    config: TunnelConfig,
    mut opening: Option<Opening>,
    first: Bytes,
) -> Tunnel {
    // The open request's head goes in front of the first bytes written.
    let head = opening
        .as_mut()
        .map(|o| std::mem::take(&mut o.head))
        .unwrap_or_default();
    let (user, outgoing, incoming) = tunnel_io::pipe(CHUNK, bus.message_size().min(CHUNK), head);
    let (ended_tx, ended) = watch::channel(None);
    // An answer to a request answered at once needs no credit: the API
    // bounds it, and the other side has no way to grant any.
    let unbounded = matches!(inbox, Inbox::Whole { .. });
    let (bytes, msgs) = if unbounded {
        (i64::MAX / 4, i64::MAX / 4)
    } else {
        (config.window as i64, MAX_MSGS as i64)
    };
    let credit = Arc::new(Credit {
        bytes: AtomicI64::new(bytes),
        msgs: AtomicI64::new(msgs),
        more: Notify::new(),
    });
    // The opening side of such a request says nothing after it.
    let silent = opening.as_ref().is_some_and(|o| o.whole.is_some());
    let answered = Arc::new(AtomicBool::new(false));
    let initial = if opening.is_some() {
        Phase::Opening
    } else {
        Phase::Open
    };
    let (phase_tx, mut phase) = watch::channel(initial);
    let outbound = tokio::spawn(send_pump(
        bus.clone(),
        outgoing,
        peer.clone(),
        credit.clone(),
        phase_tx,
        opening,
        answered.clone(),
    ));
    // Pings on their own clock, so a receiver busy writing to a slow local
    // reader still tells the far side it is alive.
    let pinger = {
        let bus = bus.clone();
        let peer = peer.clone();
        let mut phase = phase.clone();
        tokio::spawn(async move {
            if silent || phase.wait_for(|p| *p != Phase::Opening).await.is_err() {
                return;
            }
            let mut tick = tokio::time::interval(config.silence / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = bus.send_to(&peer, frame(PING, &[])).await;
            }
        })
    };
    tokio::spawn(async move {
        let why = async {
            let mut owed = (0, 0);
            if !first.is_empty() {
                owed = (first.len() as u32, 1);
                // It fits: nothing else is queued yet.
                let _ = incoming.push(first).await;
            }
            let inbox = match inbox {
                Inbox::Ready(inbox) => inbox,
                Inbox::Accepting { subject, request } => match bus.subscribe(&subject).await {
                    Ok(inbox) => {
                        if let Err(e) = bus.respond(&request, Bytes::from_static(b"ok")).await {
                            return Some(e.to_string());
                        }
                        inbox
                    }
                    Err(e) => {
                        let why =
                            format!("the replica holding it cannot listen for the session: {e}");
                        refuse(&bus, &request, &why).await;
                        return Some(why);
                    }
                },
                Inbox::Whole { request } => {
                    if let Err(e) = bus.respond(&request, Bytes::from_static(b"ok")).await {
                        return Some(e.to_string());
                    }
                    // Done when our answer is out, or cannot be sent.
                    let mut lost = bus.lost();
                    lost.borrow_and_update();
                    return tokio::select! {
                        _ = phase.wait_for(|p| *p == Phase::Done) => None,
                        _ = lost.changed() => {
                            Some("the connection to the message broker was lost".into())
                        }
                    };
                }
            };
            let pump = Pump {
                bus: &bus,
                peer: (!silent).then_some(peer.as_str()),
                answered: &answered,
                credit: &credit,
                config,
            };
            pump.receive(inbox, &incoming, phase, owed).await
        }
        .await;
        pinger.abort();
        // The reason is out before our user can see the stream end: both
        // halves of our side are still held here.
        if let Some(why) = &why {
            ended_tx.send_replace(Some(why.clone()));
        }
        outbound.abort();
        drop(incoming);
        if let Some(why) = why
            && !silent
        {
            let _ = bus.send_to(&peer, frame(RESET, why.as_bytes())).await;
        }
    });
    Tunnel {
        io: user,
        ended,
        opened: None,
    }
}

/// Ours → theirs, never more than the credit they granted. The opening
/// side's first bytes go with its open request, and nothing more until the
/// far side accepted.
async fn send_pump(
    bus: Bus,
    out: Outgoing,
    peer: String,
    credit: Arc<Credit>,
    phase: watch::Sender<Phase>,
    mut opening: Option<Opening>,
    answered: Arc<AtomicBool>,
) {
    let has_credit =
        |c: &Credit| c.bytes.load(Ordering::Acquire) > 0 && c.msgs.load(Ordering::Acquire) > 0;
    loop {
        while !has_credit(&credit) {
            let wait = credit.more.notified();
            if has_credit(&credit) {
                break;
            }
            wait.await;
        }
        let available = credit.bytes.load(Ordering::Acquire);
        let max = (available as usize).min(bus.message_size().min(CHUNK));
        // Everything already written goes in one message (a whole request
        // must), and an end that follows at once goes with it (so a short
        // answer is one message, and ends before its reader can let go).
        let Some(mut taken) = out.take(max).await else {
            if let Some(o) = opening.take() {
                // Nothing was sent: there is no far side to tell.
                let why = "closed before anything was sent".to_string();
                let _ = o.answer.send(Err(OpenError::Refused(why.clone())));
                phase.send_replace(Phase::Refused(why));
                return;
            }
            let _ = bus.send_to(&peer, frame(EOF, &[])).await;
            phase.send_replace(Phase::Done);
            return;
        };
        let n = taken.data_len();
        // The open request's head is already in front of its bytes.
        let end = taken.end && opening.is_none();
        if opening.is_none() {
            taken.payload[0] = if end { DATA_END } else { DATA };
        }
        credit.bytes.fetch_sub(n as i64, Ordering::AcqRel);
        credit.msgs.fetch_sub(1, Ordering::AcqRel);
        let payload = taken.payload.freeze();
        if let Some(o) = opening.take() {
            let refused = match bus.request(&o.subject, payload, o.timeout).await {
                Ok(a) if a.as_ref() == b"ok" => None,
                Ok(a) => Some(OpenError::Refused(String::from_utf8_lossy(&a).into_owned())),
                Err(e) => Some(OpenError::Bus(e)),
            };
            // The answer first: whoever opened learns why before the
            // tunnel ends.
            if let Some(e) = refused {
                let why = e.to_string();
                let _ = o.answer.send(Err(e));
                phase.send_replace(Phase::Refused(why));
                return;
            }
            if let Some(id) = &o.whole {
                phase.send_replace(Phase::Done);
                let _ = o.answer.send(Ok(()));
                // Nothing more goes out. If our user lets go before the
                // answer ended, nobody waits for it: the far side stops.
                while out.take(usize::MAX).await.is_some() {}
                if !answered.load(Ordering::Acquire) {
                    let _ = bus.publish(&o.subject, cancel_message(id)).await;
                }
                return;
            }
            phase.send_replace(Phase::Open);
            let _ = o.answer.send(Ok(()));
            continue;
        }
        if bus.send_to(&peer, payload).await.is_err() || end {
            phase.send_replace(Phase::Done);
            return;
        }
    }
}

fn credit_frame(bytes: u32, msgs: u32) -> Bytes {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&bytes.to_be_bytes());
    b[4..].copy_from_slice(&msgs.to_be_bytes());
    frame(CREDIT, &b)
}

/// What the receiving side works with.
struct Pump<'a> {
    bus: &'a Bus,
    /// None when nothing may be sent back (a request answered at once).
    peer: Option<&'a str>,
    /// Set once their end arrived.
    answered: &'a AtomicBool,
    credit: &'a Credit,
    config: TunnelConfig,
}

impl Pump<'_> {
    /// Theirs → ours. Returns why the tunnel broke, or None when both sides
    /// finished sending. `owed` is credit for bytes already taken.
    async fn receive(
        &self,
        mut inbox: Subscription,
        incoming: &Incoming,
        mut phase: watch::Receiver<Phase>,
        (mut owed, mut owed_msgs): (u32, u32),
    ) -> Option<String> {
        let (bus, peer, credit, config) = (self.bus, self.peer, self.credit, self.config);
        let mut lost = bus.lost();
        lost.borrow_and_update();
        let mut check = tokio::time::interval(config.silence / 3);
        check.tick().await;
        let mut heard = tokio::time::Instant::now();
        let mut reader_gone = false;
        let mut their_eof = false;
        let mut phase_known = false;
        // A message read ahead while deciding whether to grant credit now.
        let mut ahead: Option<Msg> = None;
        // A local reader that takes nothing for this long is gone.
        let stalled = config.silence * 2;
        loop {
            let open = match &*phase.borrow() {
                Phase::Refused(why) => return Some(why.clone()),
                Phase::Done if their_eof => return None,
                Phase::Opening => false,
                Phase::Open | Phase::Done => true,
            };
            if open
                && (owed > 0 || owed_msgs > 0)
                && ahead.is_none()
                && let Some(peer) = peer
            {
                let _ = bus.send_to(peer, credit_frame(owed, owed_msgs)).await;
                (owed, owed_msgs) = (0, 0);
            }
            let msg = if let Some(m) = ahead.take() {
                m
            } else {
                tokio::select! {
                    r = phase.changed(), if !phase_known => {
                        // Gone once the send pump finished; its last word stays.
                        phase_known = r.is_err();
                        continue;
                    }
                    m = inbox.next() => match m {
                        Some(m) => m,
                        None => return Some("the message broker ended the session's queue".into()),
                    },
                    _ = lost.changed() => return Some("the connection to the message broker was lost".into()),
                    _ = check.tick() => {
                        if heard.elapsed() >= config.silence {
                            return Some(format!(
                                "the replica at the other end stopped answering for {}s",
                                config.silence.as_secs()
                            ));
                        }
                        continue;
                    }
                }
            };
            heard = tokio::time::Instant::now();
            let Some((&tag, body)) = msg.payload.split_first() else {
                continue;
            };
            match tag {
                DATA | DATA_END => {
                    if tag == DATA_END {
                        // Before the bytes: their reader may let go once it
                        // has them, and must not call the far side off.
                        self.answered.store(true, Ordering::Release);
                    }
                    if !reader_gone {
                        let bytes = msg.payload.slice(1..);
                        match tokio::time::timeout(stalled, incoming.push(bytes)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => {
                                // Our reader left, so our own end follows from the
                                // send pump, after whatever it still has to send (a
                                // reset from here could overtake that). Until then
                                // their data is taken and dropped.
                                reader_gone = true;
                            }
                            Err(_) => {
                                return Some(format!(
                                    "the client took nothing for {}s",
                                    stalled.as_secs()
                                ));
                            }
                        }
                    }
                    owed += body.len() as u32;
                    owed_msgs += 1;
                    // Credit goes back in quarter windows while data keeps
                    // coming, and at once when nothing else is waiting (at
                    // the top of the loop), so a small exchange never waits
                    // for a quarter window to fill.
                    if tag == DATA_END {
                        // Nothing more comes, so no credit is owed.
                        (owed, owed_msgs) = (0, 0);
                        incoming.finish();
                        their_eof = true;
                        continue;
                    }
                    let quarter = owed >= config.window / 4 || owed_msgs >= MAX_MSGS / 4;
                    if !quarter {
                        ahead = inbox.try_next();
                    } else if *phase.borrow() != Phase::Opening
                        && let Some(peer) = peer
                    {
                        let _ = bus.send_to(peer, credit_frame(owed, owed_msgs)).await;
                        (owed, owed_msgs) = (0, 0);
                    }
                }
                CREDIT => {
                    if let Ok(b) = <[u8; 8]>::try_from(body) {
                        let bytes = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        let msgs = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                        credit.bytes.fetch_add(bytes as i64, Ordering::AcqRel);
                        credit.msgs.fetch_add(msgs as i64, Ordering::AcqRel);
                        credit.more.notify_one();
                    }
                }
                EOF => {
                    self.answered.store(true, Ordering::Release);
                    incoming.finish();
                    their_eof = true;
                }
                // After their end, a reset only says they stopped listening.
                RESET if their_eof => return None,
                RESET => {
                    let why = String::from_utf8_lossy(body).into_owned();
                    return Some(if why.is_empty() {
                        "the other replica ended the session".into()
                    } else {
                        why
                    });
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::bus::MemoryBroker;

    fn config(window: u32) -> TunnelConfig {
        TunnelConfig {
            window,
            silence: Duration::from_secs(3),
            open_timeout: Duration::from_secs(2),
        }
    }

    fn request(id: &str) -> OpenRequest {
        OpenRequest {
            id: id.into(),
            client_addr: None,
            from_replica: "a".into(),
            protocol: crate::cluster::PROTOCOL,
            window: 0,
            reply_to: None,
        }
    }

    /// A tunnel opened on "svc", and its far end, accepted once the first
    /// bytes written to it arrive.
    async fn pair(broker: &MemoryBroker, window: u32) -> (Tunnel, tokio::task::JoinHandle<Tunnel>) {
        let a = Bus::memory(broker);
        let b = Bus::memory(broker);
        let mut listener = b.subscribe("svc").await.unwrap();
        let server = tokio::spawn(async move {
            let m = listener.next().await.unwrap();
            let (r, first) = parse_open(&m).unwrap();
            accept(&b, &m, &r, first, config(window))
        });
        (open_on(&a, "svc", "s_test", window).await, server)
    }

    /// Reads a tunnel to its end and returns why it broke.
    async fn end_reason(t: &mut Tunnel) -> String {
        let mut rest = Vec::new();
        let _ = t.io.read_to_end(&mut rest).await;
        let why = t.ended.wait_for(|e| e.is_some()).await.unwrap().clone();
        why.unwrap()
    }

    async fn open_on(bus: &Bus, subject: &str, id: &str, window: u32) -> Tunnel {
        let inbox = bus.subscribe(&down(id)).await.unwrap();
        open(bus, subject, request(id), config(window), inbox)
    }

    #[tokio::test]
    async fn carries_bytes_both_ways_and_ends_cleanly() {
        let broker = MemoryBroker::new();
        let (mut a, b) = pair(&broker, 64 * 1024).await;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.io.write_all(&sent).await.unwrap();
            a.io.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.io.read_to_end(&mut back).await.unwrap();
            (back, a.ended)
        });
        let mut b = b.await.unwrap();
        let mut got = Vec::new();
        b.io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        b.io.write_all(b"thanks").await.unwrap();
        b.io.shutdown().await.unwrap();
        let (back, mut ended) = writer.await.unwrap();
        assert_eq!(back, b"thanks");
        // A clean end leaves no reason.
        let _ = ended.changed().await;
        assert_eq!(*ended.borrow(), None);
    }

    #[tokio::test]
    async fn a_reader_that_stops_stops_the_writer_within_the_window() {
        let broker = MemoryBroker::new();
        let window = 128 * 1024;
        let (mut a, b) = pair(&broker, window).await;
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        let total = 4 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 8192];
            for _ in 0..total / chunk.len() {
                a.io.write_all(&chunk).await.unwrap();
                w.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            a.io.shutdown().await.unwrap();
            a
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        // What our side holds, the window, what the far side holds, one
        // message.
        let bound = window as usize + 3 * CHUNK + 8192;
        let stalled = written.load(Ordering::Relaxed);
        assert!(
            stalled <= bound,
            "{stalled} bytes accepted with nobody reading (bound {bound})"
        );
        let mut b = b.await.unwrap();
        let mut got = Vec::new();
        b.io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), total);
        assert!(got.iter().all(|&x| x == 7));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn nobody_listening_is_no_responders() {
        let broker = MemoryBroker::new();
        let a = Bus::memory(&broker);
        let mut t = open_on(&a, "nobody", "s_x", 65536).await;
        t.io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        match t.opened.take().unwrap().await.unwrap() {
            Err(OpenError::Bus(BusError::NoResponders(_))) => {}
            other => panic!("expected no responders, got {other:?}"),
        }
        // And the tunnel ends with that reason.
        assert!(end_reason(&mut t).await.contains("no replica listens"));
    }

    #[tokio::test]
    async fn the_first_bytes_travel_with_the_open_request() {
        let broker = MemoryBroker::new();
        let a = Bus::memory(&broker);
        let b = Bus::memory(&broker);
        let mut listener = b.subscribe("svc").await.unwrap();
        let mut t = open_on(&a, "svc", "s_first", 65536).await;
        t.io.write_all(b"hello").await.unwrap();
        let m = listener.next().await.unwrap();
        let (r, first) = parse_open(&m).unwrap();
        assert_eq!((r.id.as_str(), first.as_ref()), ("s_first", &b"hello"[..]));
        // Nothing else goes up before the far side accepted.
        t.io.write_all(b" world").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut far = accept(&b, &m, &r, first, config(65536));
        assert_eq!(t.opened.take().unwrap().await.unwrap().ok(), Some(()));
        let mut got = [0u8; 11];
        far.io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_broker_restart_ends_both_sides_with_the_reason() {
        let broker = MemoryBroker::new();
        let (mut a, b) = pair(&broker, 65536).await;
        a.io.write_all(b"before").await.unwrap();
        let mut b = b.await.unwrap();
        let mut buf = [0u8; 6];
        b.io.read_exact(&mut buf).await.unwrap();
        broker.restart();
        assert!(end_reason(&mut a).await.contains("message broker"));
        assert!(end_reason(&mut b).await.contains("message broker"));
    }

    #[tokio::test]
    async fn a_silent_far_side_is_found() {
        let broker = MemoryBroker::new();
        let a = Bus::memory(&broker);
        let b = Bus::memory(&broker);
        let mut listener = b.subscribe("svc").await.unwrap();
        // Accepts, then never says anything again (a replica that froze).
        tokio::spawn(async move {
            let m = listener.next().await.unwrap();
            let (r, _) = parse_open(&m).unwrap();
            let _keep = b.subscribe(&up(&r.id)).await.unwrap();
            b.respond(&m, Bytes::from_static(b"ok")).await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut t = open_on(&a, "svc", "s_silent", 65536).await;
        t.io.write_all(b"anyone?").await.unwrap();
        let why = end_reason(&mut t).await;
        assert!(why.contains("stopped answering"), "{why}");
    }

    #[tokio::test]
    async fn a_request_answered_at_once_is_one_message_each_way_and_can_be_called_off() {
        let broker = MemoryBroker::new();
        let a = Bus::memory(&broker);
        let b = Bus::memory(&broker);
        let mut listener = b.subscribe("svc").await.unwrap();
        let server = {
            let b = b.clone();
            tokio::spawn(async move {
                let m = listener.next().await.unwrap();
                let (r, first) = parse_open(&m).unwrap();
                assert!(r.reply_to.is_some());
                let far = accept(&b, &m, &r, first, config(65536));
                (far, listener)
            })
        };
        let mut t = open_whole(&a, "svc", request("s_whole"), config(65536))
            .await
            .unwrap();
        t.io.write_all(b"the whole request").await.unwrap();
        let (mut far, mut listener) = server.await.unwrap();
        let mut got = [0u8; 17];
        far.io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"the whole request");
        assert_eq!(t.opened.take().unwrap().await.unwrap().ok(), Some(()));
        // An answer larger than the window: it needs no credit.
        let answer: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        far.io.write_all(&answer).await.unwrap();
        far.io.shutdown().await.unwrap();
        let mut back = Vec::new();
        t.io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, answer);
        let _ = t.ended.changed().await;
        assert_eq!(*t.ended.borrow(), None);
        drop(t);

        // A second one, let go of before its answer: the far side is told.
        let mut t = open_whole(&a, "svc", request("s_gone"), config(65536))
            .await
            .unwrap();
        t.io.write_all(b"another").await.unwrap();
        let m = listener.next().await.unwrap();
        let (r, first) = parse_open(&m).unwrap();
        let _far = accept(&b, &m, &r, first, config(65536));
        assert_eq!(t.opened.take().unwrap().await.unwrap().ok(), Some(()));
        drop(t);
        let cancel = tokio::time::timeout(Duration::from_secs(2), listener.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(parse_cancel(&cancel), Some("s_gone"));
    }
}
