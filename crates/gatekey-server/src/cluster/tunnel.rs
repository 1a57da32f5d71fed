//! A byte stream between two replicas over the bus, with the same credit
//! flow control as agent-link streams: a side never has more than `window`
//! unacknowledged bytes in flight, and grants credit back only once its own
//! reader has taken the bytes, so a slow client slows the producer on the
//! other replica and no broker queue grows past the window.
//!
//! Each tunnel carries one session (or one request) and uses two subjects
//! named after it: `gatekey.session.ID.up` (towards the agent's replica)
//! and `…down` (towards the client's). On RabbitMQ they are auto-deleted
//! queues that vanish with the session. Either side pings when idle; a side
//! that hears nothing for `silence` ends the tunnel, as does a lost broker
//! connection, with the reason in [`Tunnel::ended`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{Notify, watch};

use crate::bus::{Bus, BusError, Msg, Subscription};

const DATA: u8 = 0;
const CREDIT: u8 = 1;
const EOF: u8 = 2;
const RESET: u8 = 3;
const PING: u8 = 4;

/// Largest data message.
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
    pub window: u32,
}

/// One end of a tunnel: read and write `io`; `ended` says why it broke.
pub struct Tunnel {
    pub io: DuplexStream,
    pub ended: watch::Receiver<Option<String>>,
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
    format!("gatekey.session.{id}.up")
}

fn down(id: &str) -> String {
    format!("gatekey.session.{id}.down")
}

/// Opens a tunnel to whoever listens on `subject`.
pub async fn open(
    bus: &Bus,
    subject: &str,
    mut request: OpenRequest,
    config: TunnelConfig,
) -> Result<Tunnel, OpenError> {
    request.window = config.window;
    // Listen before asking, so nothing the far side sends is missed.
    let inbox = bus.subscribe(&down(&request.id)).await?;
    let mut payload = vec![b'T'];
    payload.extend(serde_json::to_vec(&request).expect("serializable"));
    let answer = bus
        .request(subject, Bytes::from(payload), config.open_timeout)
        .await?;
    if answer.as_ref() != b"ok" {
        return Err(OpenError::Refused(
            String::from_utf8_lossy(&answer).into_owned(),
        ));
    }
    Ok(start(bus.clone(), inbox, up(&request.id), config))
}

/// Parses an open request (the message's payload starts with `T`).
pub fn parse_open(msg: &Msg) -> Option<OpenRequest> {
    let body = msg.payload.strip_prefix(b"T")?;
    let r: OpenRequest = serde_json::from_slice(body).ok()?;
    crate::cluster::valid_id(&r.id).then_some(r)
}

/// Accepts an open request received on a listener's subscription.
pub async fn accept(
    bus: &Bus,
    msg: &Msg,
    request: &OpenRequest,
    mut config: TunnelConfig,
) -> Result<Tunnel, BusError> {
    config.window = request.window.clamp(CHUNK as u32, 64 << 20);
    let inbox = bus.subscribe(&up(&request.id)).await?;
    bus.respond(msg, Bytes::from_static(b"ok")).await?;
    Ok(start(bus.clone(), inbox, down(&request.id), config))
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

fn start(bus: Bus, inbox: Subscription, peer: String, config: TunnelConfig) -> Tunnel {
    let (user, inner) = tokio::io::duplex(CHUNK);
    let (ended_tx, ended) = watch::channel(None);
    let (rd, mut wr) = tokio::io::split(inner);
    let credit = Arc::new(Credit {
        bytes: AtomicI64::new(config.window as i64),
        msgs: AtomicI64::new(MAX_MSGS as i64),
        more: Notify::new(),
    });
    let (sent_tx, sent_rx) = watch::channel(false);
    let outbound = tokio::spawn(send_pump(
        bus.clone(),
        rd,
        peer.clone(),
        credit.clone(),
        sent_tx,
    ));
    // Pings on their own clock, so a receiver busy writing to a slow local
    // reader still tells the far side it is alive.
    let pinger = {
        let bus = bus.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.silence / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = bus.publish(&peer, frame(PING, &[])).await;
            }
        })
    };
    tokio::spawn(async move {
        let why = receive_pump(&bus, inbox, &mut wr, &peer, &credit, config, sent_rx).await;
        pinger.abort();
        // The reason is out before our user can see the stream end: both
        // halves of our side are still held here.
        if let Some(why) = &why {
            ended_tx.send_replace(Some(why.clone()));
        }
        outbound.abort();
        drop(wr);
        if let Some(why) = why {
            let _ = bus.publish(&peer, frame(RESET, why.as_bytes())).await;
        }
    });
    Tunnel { io: user, ended }
}

/// Ours → theirs, never more than the credit they granted. `sent` turns
/// true once our EOF is out (or sending failed).
async fn send_pump(
    bus: Bus,
    mut rd: tokio::io::ReadHalf<DuplexStream>,
    peer: String,
    credit: Arc<Credit>,
    sent: watch::Sender<bool>,
) {
    let mut buf = BytesMut::new();
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
        let max = (available as usize).min(CHUNK);
        // Each message is its own allocation, handed to the broker client
        // without another copy.
        buf.reserve(max + 1);
        buf.put_u8(DATA);
        let n = match (&mut rd).take(max as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = bus.publish(&peer, frame(EOF, &[])).await;
                sent.send_replace(true);
                return;
            }
            Ok(n) => n,
        };
        credit.bytes.fetch_sub(n as i64, Ordering::AcqRel);
        credit.msgs.fetch_sub(1, Ordering::AcqRel);
        if bus.publish(&peer, buf.split().freeze()).await.is_err() {
            // The broker connection is down; the receiver reports it.
            sent.send_replace(true);
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

/// Theirs → ours. Returns why the tunnel broke, or None when both sides
/// finished sending.
async fn receive_pump(
    bus: &Bus,
    mut inbox: Subscription,
    wr: &mut tokio::io::WriteHalf<DuplexStream>,
    peer: &str,
    credit: &Credit,
    config: TunnelConfig,
    mut sent: watch::Receiver<bool>,
) -> Option<String> {
    let mut lost = bus.lost();
    lost.borrow_and_update();
    let mut check = tokio::time::interval(config.silence / 3);
    check.tick().await;
    let mut heard = tokio::time::Instant::now();
    let (mut owed, mut owed_msgs) = (0u32, 0u32);
    let mut reader_gone = false;
    let mut their_eof = false;
    // A message read ahead while deciding whether to grant credit now.
    let mut ahead: Option<Msg> = None;
    // A local reader that takes nothing for this long is gone.
    let stalled = config.silence * 2;
    loop {
        if their_eof && *sent.borrow() {
            return None;
        }
        let msg = if let Some(m) = ahead.take() {
            m
        } else {
            tokio::select! {
                r = sent.changed(), if their_eof => {
                    if r.is_err() {
                        return None;
                    }
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
            DATA => {
                if !reader_gone {
                    match tokio::time::timeout(stalled, wr.write_all(body)).await {
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
                // coming, and at once when nothing else is waiting, so a
                // small exchange never waits for a quarter window to fill.
                let quarter = owed >= config.window / 4 || owed_msgs >= MAX_MSGS / 4;
                if !quarter {
                    ahead = inbox.try_next();
                }
                if quarter || ahead.is_none() {
                    let _ = bus.publish(peer, credit_frame(owed, owed_msgs)).await;
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
                let _ = wr.shutdown().await;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

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
            window: 0,
        }
    }

    async fn pair(broker: &MemoryBroker, window: u32) -> (Tunnel, Tunnel) {
        let a = Bus::memory(broker);
        let b = Bus::memory(broker);
        let mut listener = b.subscribe("svc").await.unwrap();
        let server = tokio::spawn(async move {
            let m = listener.next().await.unwrap();
            let r = parse_open(&m).unwrap();
            accept(&b, &m, &r, config(window)).await.unwrap()
        });
        let client = open(&a, "svc", request("s_test"), config(window))
            .await
            .unwrap();
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn carries_bytes_both_ways_and_ends_cleanly() {
        let broker = MemoryBroker::new();
        let (mut a, mut b) = pair(&broker, 64 * 1024).await;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.io.write_all(&sent).await.unwrap();
            a.io.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.io.read_to_end(&mut back).await.unwrap();
            (back, a.ended)
        });
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
        let (mut a, mut b) = pair(&broker, window).await;
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
        // Our duplex buffer, the window, the far duplex buffer, one message.
        let bound = window as usize + 3 * CHUNK + 8192;
        let stalled = written.load(Ordering::Relaxed);
        assert!(
            stalled <= bound,
            "{stalled} bytes accepted with nobody reading (bound {bound})"
        );
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
        match open(&a, "nobody", request("s_x"), config(65536)).await {
            Err(OpenError::Bus(BusError::NoResponders(_))) => {}
            other => panic!("expected no responders, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn a_broker_restart_ends_both_sides_with_the_reason() {
        let broker = MemoryBroker::new();
        let (mut a, mut b) = pair(&broker, 65536).await;
        a.io.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        b.io.read_exact(&mut buf).await.unwrap();
        broker.restart();
        let mut rest = Vec::new();
        let _ = a.io.read_to_end(&mut rest).await;
        let why = a.ended.wait_for(|e| e.is_some()).await.unwrap().clone();
        assert!(why.unwrap().contains("message broker"));
        let why = b.ended.wait_for(|e| e.is_some()).await.unwrap().clone();
        assert!(why.unwrap().contains("message broker"));
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
            let r = parse_open(&m).unwrap();
            let _keep = b.subscribe(&up(&r.id)).await.unwrap();
            b.respond(&m, Bytes::from_static(b"ok")).await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut t = open(&a, "svc", request("s_silent"), config(65536))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = t.io.read_to_end(&mut rest).await;
        let why = t.ended.wait_for(|e| e.is_some()).await.unwrap().clone();
        assert!(
            why.unwrap().contains("stopped answering"),
            "{:?}",
            t.ended.borrow()
        );
    }
}
