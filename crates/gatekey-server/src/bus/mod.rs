//! The `Bus` seam: how control-plane replicas reach each other.
//!
//! A replica that holds agent X listens on X's subject, so a request to it
//! finds the holder with no presence table ("no responders" means "not
//! connected anywhere"). Sessions between replicas travel over per-session
//! subjects (see `cluster::tunnel`). Three transports behind one interface:
//! NATS (`nats://`), RabbitMQ (`amqp://`, per-session auto-deleted queues)
//! and an in-process one for unit tests.
//!
//! Delivery is at most once and ordered per publisher; everything above
//! this layer (tunnels, gathers) carries its own flow control, timeouts and
//! errors, and a lost broker connection ends whatever relied on it
//! ([`Bus::lost`]).

mod amqp;
mod memory;
mod nats;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

pub use memory::MemoryBroker;

/// Checks a bus URL's scheme (at configuration time, before anything starts).
pub fn check_url(url: &str) -> Result<(), BusError> {
    if url.starts_with("nats://") || url.starts_with("tls://") || url.starts_with("amqp://") {
        Ok(())
    } else if url.starts_with("amqps://") {
        Err(BusError::Url(
            "amqps:// is not supported: reach RabbitMQ over a private network, or through a local TLS tunnel, with amqp://".into(),
        ))
    } else {
        Err(BusError::Url(format!(
            "{}: use nats://HOST:4222, tls://HOST:4222 or amqp://USER:PASS@HOST:5672/%2f",
            redact(url)
        )))
    }
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// One message received on a subscription.
#[derive(Debug, Clone)]
pub struct Msg {
    pub subject: String,
    /// Where an answer goes, for requests.
    pub reply: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Nobody listens on the subject.
    #[error("no replica listens on {0}")]
    NoResponders(String),
    #[error("no answer on {subject} within {}ms", timeout.as_millis())]
    Timeout { subject: String, timeout: Duration },
    /// The broker connection is down.
    #[error("the message broker connection is down: {0}")]
    Down(String),
    #[error("message broker error: {0}")]
    Broker(String),
    #[error("invalid bus_url: {0}")]
    Url(String),
    /// Another running replica uses this replica's id.
    #[error(
        "replica_id {0:?} is already used by a running replica on this bus: give each replica its own replica_id (or leave it unset for a random one)"
    )]
    IdTaken(String),
}

/// A connection to the replicas' message bus.
///
/// Callers name subjects relative to the installation (`agent.ID`); the
/// bus puts every name under `gatekey.<installation>.`, so installations
/// sharing a broker never hear each other. Reply addresses (a request's
/// `reply`, an [`Bus::inbox`] address) are already whole.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
    root: Arc<str>,
}

enum Inner {
    Memory(memory::Client),
    Nats(nats::Nats),
    Amqp(amqp::Amqp),
}

/// Messages on one subject; dropping it unsubscribes (and, on RabbitMQ,
/// deletes its queue).
pub struct Subscription {
    source: Source,
    _guard: Option<Box<dyn Send + Sync>>,
}

enum Source {
    Channel(mpsc::Receiver<Msg>),
    /// Read directly: one task hop less on every message.
    Nats(async_nats::Subscriber),
}

impl Subscription {
    fn new(rx: mpsc::Receiver<Msg>, guard: impl Send + Sync + 'static) -> Subscription {
        Subscription {
            source: Source::Channel(rx),
            _guard: Some(Box::new(guard)),
        }
    }

    fn nats(sub: async_nats::Subscriber) -> Subscription {
        Subscription {
            source: Source::Nats(sub),
            _guard: None,
        }
    }

    /// The next message; `None` once the subscription (or the broker
    /// connection it lived on) ended.
    pub async fn next(&mut self) -> Option<Msg> {
        match &mut self.source {
            Source::Channel(rx) => rx.recv().await,
            Source::Nats(sub) => {
                use futures_util::StreamExt;
                let m = sub.next().await?;
                Some(Msg {
                    subject: m.subject.to_string(),
                    reply: m.reply.map(|r| r.to_string()),
                    payload: m.payload,
                })
            }
        }
    }

    /// A message already waiting, without waiting for one.
    pub fn try_next(&mut self) -> Option<Msg> {
        use futures_util::FutureExt;
        self.next().now_or_never().flatten()
    }
}

/// Messages a subscription may hold before its reader takes them. Tunnels
/// keep far fewer in flight (their credit window), so this is never the
/// limit that matters; it only bounds a misbehaving peer.
const SUBSCRIPTION_BUFFER: usize = 1024;

const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Bus {
    /// Connects to `nats://…` or `amqp://…`. `replica` names this replica's
    /// own queues; `installation` (the database's id, see
    /// `Store::installation_id`) the namespace of every subject.
    pub async fn connect(url: &str, replica: &str, installation: &str) -> Result<Bus, BusError> {
        check_url(url)?;
        let root: Arc<str> = format!("gatekey.{installation}.").into();
        let inner = if url.starts_with("nats://") || url.starts_with("tls://") {
            Inner::Nats(nats::Nats::connect(url, &root).await?)
        } else {
            Inner::Amqp(amqp::Amqp::connect(url, replica, &root).await?)
        };
        Ok(Bus {
            inner: Arc::new(inner),
            root,
        })
    }

    /// A client of an in-process broker (tests of the cluster logic).
    pub fn memory(broker: &MemoryBroker) -> Bus {
        Bus {
            inner: Arc::new(Inner::Memory(broker.client())),
            root: "gatekey.".into(),
        }
    }

    /// The broker's name for `subject`: under this installation's root.
    pub fn name(&self, subject: &str) -> String {
        format!("{}{subject}", self.root)
    }

    /// Which transport this is, for logs and the bench.
    pub fn kind(&self) -> &'static str {
        match &*self.inner {
            Inner::Memory(_) => "memory",
            Inner::Nats(_) => "nats",
            Inner::Amqp(_) => "amqp",
        }
    }

    /// The largest data message worth sending through this broker.
    /// nats-server reads at most 64 KiB at a time and copies a message that
    /// spans two reads into a fresh allocation: 16 KiB messages cost it a
    /// quarter less CPU than 256 KiB ones. RabbitMQ's cost is per message.
    pub fn message_size(&self) -> usize {
        match &*self.inner {
            Inner::Nats(_) => 16 * 1024,
            Inner::Memory(_) | Inner::Amqp(_) => 256 * 1024,
        }
    }

    /// Whether each subscription is a queue the broker must create and
    /// delete (RabbitMQ), which costs it milliseconds of work.
    pub fn queues_are_costly(&self) -> bool {
        matches!(&*self.inner, Inner::Amqp(_))
    }

    /// Subscribes to a subject only this replica uses (an agent's, a
    /// session's, its own). On RabbitMQ this is an exclusive, auto-deleted
    /// queue named after the subject.
    pub async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        self.subscribe_whole(&self.name(subject)).await
    }

    /// Subscribes to a subject named in full.
    async fn subscribe_whole(&self, subject: &str) -> Result<Subscription, BusError> {
        let work = async {
            match &*self.inner {
                Inner::Memory(m) => Ok(m.subscribe(subject)),
                Inner::Nats(n) => n.subscribe(subject).await,
                Inner::Amqp(a) => a.subscribe(subject).await,
            }
        };
        // A broker that is up but stuck must not hold a request or an
        // agent's registration for long.
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, work)
            .await
            .map_err(|_| BusError::Timeout {
                subject: subject.to_string(),
                timeout: SUBSCRIBE_TIMEOUT,
            })?
    }

    /// Where another replica can send this one the messages of session
    /// `id`, and those messages. On NATS a subject of its own; on RabbitMQ
    /// this replica's reply queue, the messages tagged with the id, so that
    /// a request answered at once makes the broker create no queue (each
    /// costs it milliseconds of work). Send with [`Bus::send_to`].
    pub async fn inbox(&self, id: &str) -> Result<(String, Subscription), BusError> {
        match &*self.inner {
            Inner::Amqp(a) => a.inbox(id),
            _ => {
                let address = self.name(&format!("inbox.{id}"));
                let sub = self.subscribe_whole(&address).await?;
                Ok((address, sub))
            }
        }
    }

    /// Sends to an address from [`Bus::inbox`].
    pub async fn send_to(&self, address: &str, payload: Bytes) -> Result<(), BusError> {
        self.publish_whole(address, payload).await
    }

    /// Subscribes to a subject every replica hears (a broadcast).
    pub async fn subscribe_broadcast(&self, subject: &str) -> Result<Subscription, BusError> {
        let subject = &self.name(subject);
        match &*self.inner {
            Inner::Memory(m) => Ok(m.subscribe(subject)),
            Inner::Nats(n) => n.subscribe(subject).await,
            Inner::Amqp(a) => a.subscribe_broadcast(subject).await,
        }
    }

    /// Sends without waiting for anyone; ordered with this replica's other
    /// publishes to the same subject.
    pub async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        match &*self.inner {
            Inner::Memory(m) => {
                m.publish(&self.name(subject), None, payload);
                Ok(())
            }
            Inner::Nats(n) => n.publish(&self.name(subject), payload).await,
            Inner::Amqp(a) => a.publish(&self.name(subject), payload).await,
        }
    }

    /// Sends to an address named in full: a reply address, or an inbox.
    async fn publish_whole(&self, address: &str, payload: Bytes) -> Result<(), BusError> {
        match &*self.inner {
            Inner::Memory(m) => {
                m.publish(address, None, payload);
                Ok(())
            }
            Inner::Nats(n) => n.publish(address, payload).await,
            Inner::Amqp(a) => a.respond(address, payload).await,
        }
    }

    /// Sends to every replica listening on a broadcast subject.
    pub async fn broadcast(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        let subject = &self.name(subject);
        match &*self.inner {
            Inner::Memory(m) => {
                m.publish(subject, None, payload);
                Ok(())
            }
            Inner::Nats(n) => n.publish(subject, payload).await,
            Inner::Amqp(a) => a.broadcast(subject, payload).await,
        }
    }

    /// Asks the one listener on `subject` and waits for its answer.
    pub async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        let subject = &self.name(subject);
        let work = async {
            match &*self.inner {
                Inner::Memory(m) => m.request(subject, payload).await,
                Inner::Nats(n) => n.request(subject, payload).await,
                Inner::Amqp(a) => a.request(subject, payload).await,
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| BusError::Timeout {
                subject: subject.to_string(),
                timeout,
            })?
    }

    /// Answers a request.
    pub async fn respond(&self, to: &Msg, payload: Bytes) -> Result<(), BusError> {
        match &to.reply {
            Some(reply) => self.publish_whole(reply, payload).await,
            None => Ok(()),
        }
    }

    /// Counts broker connection losses: whatever was in flight when it
    /// changes (tunnels) must end, since messages may have been lost.
    pub fn lost(&self) -> watch::Receiver<u64> {
        match &*self.inner {
            Inner::Memory(m) => m.lost(),
            Inner::Nats(n) => n.lost(),
            Inner::Amqp(a) => a.lost(),
        }
    }

    /// Whether the broker connection is up now.
    pub fn is_up(&self) -> bool {
        match &*self.inner {
            Inner::Memory(_) => true,
            Inner::Nats(n) => n.is_up(),
            Inner::Amqp(a) => a.is_up(),
        }
    }
}
