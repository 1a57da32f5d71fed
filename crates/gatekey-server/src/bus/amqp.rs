//! RabbitMQ, the design the seed asks for: every subscription is an
//! exclusive, auto-deleted queue named after its subject (per agent, per
//! session, per replica), reached through the default exchange, so a
//! session's queues disappear with it. Broadcasts go through a fanout
//! exchange. "No responders" is a mandatory publish the broker returns.
//!
//! A lost connection is re-made with backoff; subscriptions made on the old
//! one end (their owners subscribe again) and the `lost` counter moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::nats::AbortOnDrop;
use super::{BusError, Msg, SUBSCRIPTION_BUFFER, Subscription, redact};

pub(super) struct Amqp {
    shared: Arc<Shared>,
}

struct Shared {
    url: String,
    replica: String,
    /// Where answers to this replica's requests arrive.
    reply_queue: String,
    conn: Mutex<Option<Live>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Bytes>>>,
    /// Inboxes on the reply queue, by the id their messages carry.
    inboxes: Mutex<HashMap<String, mpsc::Sender<Msg>>>,
    next: AtomicU64,
    lost: watch::Sender<u64>,
    up: AtomicBool,
    /// Open channels kept for the next subscriptions: a session's queue then
    /// costs two round trips to the broker (declare, consume), not three.
    idle: Mutex<Vec<Channel>>,
}

/// A queue of this connection's only, deleted when its consumer goes.
const PRIVATE_QUEUE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: false,
    exclusive: true,
    auto_delete: true,
    nowait: false,
};

/// This replica's only consumer of a queue; at most once, so no acks.
const SOLE_CONSUMER: BasicConsumeOptions = BasicConsumeOptions {
    no_local: false,
    no_ack: true,
    exclusive: true,
    nowait: false,
};

/// Most idle channels kept.
const IDLE_CHANNELS: usize = 32;

/// One broker connection and the channels every replica needs.
#[derive(Clone)]
struct Live {
    connection: Arc<Connection>,
    /// Plain publishes (data, answers): no confirms, so nothing waits.
    publish: Channel,
    /// Requests: confirms on, so an unroutable (mandatory) one comes back.
    request: Channel,
    /// Where answers to this replica's requests arrive.
    reply_queue: String,
}

fn broker(e: lapin::Error) -> BusError {
    BusError::Broker(e.to_string())
}

impl Amqp {
    /// `root` starts every queue and exchange name (see [`super::Bus`]).
    pub async fn connect(url: &str, replica: &str, root: &str) -> Result<Amqp, BusError> {
        let shared = Arc::new(Shared {
            url: url.to_string(),
            replica: replica.to_string(),
            reply_queue: format!("{root}reply.{replica}"),
            conn: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            lost: watch::channel(0).0,
            up: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
        });
        let (live, errors) = Shared::open(&shared).await?;
        *shared.conn.lock().expect("conn") = Some(live);
        shared.up.store(true, Ordering::Relaxed);
        tokio::spawn(supervise(Arc::downgrade(&shared), errors));
        Ok(Amqp { shared })
    }

    fn live(&self) -> Result<Live, BusError> {
        self.shared
            .conn
            .lock()
            .expect("conn")
            .clone()
            .ok_or_else(|| BusError::Down("reconnecting to RabbitMQ".into()))
    }

    /// A channel for a new subscription: an idle one, or a new one.
    async fn channel(&self, live: &Live) -> Result<Channel, BusError> {
        loop {
            let Some(c) = self.shared.idle.lock().expect("idle").pop() else {
                break;
            };
            if c.status().connected() {
                return Ok(c);
            }
        }
        live.connection.create_channel().await.map_err(broker)
    }

    pub async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        let live = self.live()?;
        let channel = self.channel(&live).await?;
        channel
            .queue_declare(subject.into(), PRIVATE_QUEUE, FieldTable::default())
            .await
            .map_err(|e| BusError::Broker(format!("cannot declare queue {subject}: {e}")))?;
        consume(channel, subject, Some(Arc::downgrade(&self.shared))).await
    }

    pub async fn subscribe_broadcast(&self, subject: &str) -> Result<Subscription, BusError> {
        let live = self.live()?;
        let channel = live.connection.create_channel().await.map_err(broker)?;
        channel
            .exchange_declare(
                subject.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let queue = format!("{subject}@{}", self.shared.replica);
        channel
            .queue_declare(queue.as_str().into(), PRIVATE_QUEUE, FieldTable::default())
            .await
            .map_err(broker)?;
        channel
            .queue_bind(
                queue.as_str().into(),
                subject.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        consume(channel, &queue, None).await
    }

    pub async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        let live = self.live()?;
        live.publish
            .basic_publish(
                "".into(),
                subject.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default(),
            )
            .await
            .map_err(|e| BusError::Down(e.to_string()))?;
        Ok(())
    }

    pub async fn broadcast(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        let live = self.live()?;
        // The exchange may not exist yet when nobody has subscribed.
        live.publish
            .exchange_declare(
                subject.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        live.publish
            .basic_publish(
                subject.into(),
                "".into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default(),
            )
            .await
            .map_err(|e| BusError::Down(e.to_string()))?;
        Ok(())
    }

    pub async fn request(&self, subject: &str, payload: Bytes) -> Result<Bytes, BusError> {
        let live = self.live()?;
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .expect("pending")
            .insert(id.clone(), tx);
        let _forget = Forget {
            shared: &self.shared,
            id: &id,
        };
        let confirm = live
            .request
            .basic_publish(
                "".into(),
                subject.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                BasicProperties::default()
                    .with_reply_to(live.reply_queue.as_str().into())
                    .with_correlation_id(id.as_str().into()),
            )
            .await
            .map_err(|e| BusError::Down(e.to_string()))?
            .await
            .map_err(|e| BusError::Down(e.to_string()))?;
        if confirm.is_nack() {
            return Err(BusError::Down(format!(
                "RabbitMQ refused a message to {subject}"
            )));
        }
        if confirm.take_message().is_some() {
            return Err(BusError::NoResponders(subject.to_string()));
        }
        rx.await
            .map_err(|_| BusError::Down("the RabbitMQ connection was lost".into()))
    }

    /// Messages sent to this replica's reply queue tagged with `id`.
    pub fn inbox(&self, id: &str) -> Result<(String, Subscription), BusError> {
        let live = self.live()?;
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        self.shared
            .inboxes
            .lock()
            .expect("inboxes")
            .insert(id.to_string(), tx);
        let guard = LeaveInbox {
            shared: Arc::downgrade(&self.shared),
            id: id.to_string(),
        };
        Ok((
            format!("{}|{id}", live.reply_queue),
            Subscription::new(rx, guard),
        ))
    }

    /// `reply` is "QUEUE|CORRELATION-ID", as [`consume`] builds it.
    pub async fn respond(&self, reply: &str, payload: Bytes) -> Result<(), BusError> {
        let (queue, id) = reply.split_once('|').unwrap_or((reply, ""));
        let live = self.live()?;
        live.publish
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_correlation_id(id.into()),
            )
            .await
            .map_err(|e| BusError::Down(e.to_string()))?;
        Ok(())
    }

    pub fn lost(&self) -> watch::Receiver<u64> {
        self.shared.lost.subscribe()
    }

    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }
}

/// Forgets an inbox when its subscription is dropped.
struct LeaveInbox {
    shared: std::sync::Weak<Shared>,
    id: String,
}

impl Drop for LeaveInbox {
    fn drop(&mut self) {
        if let Some(s) = self.shared.upgrade() {
            s.inboxes.lock().expect("inboxes").remove(&self.id);
        }
    }
}

/// Drops a pending request however `request` ends.
struct Forget<'a> {
    shared: &'a Shared,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().expect("pending").remove(self.id);
    }
}

/// Consumes `queue` on its own channel (a channel error, such as another
/// replica holding an exclusive queue, then harms nothing else). When the
/// subscription is dropped the consumer is cancelled, so the broker deletes
/// the queue, and the channel goes back to `pool` (or is closed).
async fn consume(
    channel: Channel,
    queue: &str,
    pool: Option<std::sync::Weak<Shared>>,
) -> Result<Subscription, BusError> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            SOLE_CONSUMER,
            FieldTable::default(),
        )
        .await
        .map_err(broker)?;
    let tag = consumer.tag();
    let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
    let task = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let reply = d.properties.reply_to().as_ref().map(|r| {
                let id = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str())
                    .unwrap_or("");
                format!("{}|{id}", r.as_str())
            });
            let msg = Msg {
                subject: d.routing_key.to_string(),
                reply,
                payload: Bytes::from(d.data),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    Ok(Subscription::new(
        rx,
        Release {
            channel,
            tag,
            pool,
            _task: AbortOnDrop(task),
        },
    ))
}

struct Release {
    channel: Channel,
    tag: lapin::types::ShortString,
    pool: Option<std::sync::Weak<Shared>>,
    _task: AbortOnDrop,
}

impl Drop for Release {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        let tag = self.tag.clone();
        let pool = self.pool.take();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let cancelled = channel
                    .basic_cancel(tag, lapin::options::BasicCancelOptions::default())
                    .await
                    .is_ok();
                if cancelled
                    && channel.status().connected()
                    && let Some(shared) = pool.and_then(|p| p.upgrade())
                {
                    let mut idle = shared.idle.lock().expect("idle");
                    if idle.len() < IDLE_CHANNELS {
                        idle.push(channel);
                        return;
                    }
                }
                let _ = channel.close(200, "unsubscribed".into()).await;
            });
        }
    }
}

impl Shared {
    async fn open(shared: &Arc<Shared>) -> Result<(Live, mpsc::Receiver<String>), BusError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("gatekey-server {}", shared.replica).into());
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&shared.url, props),
        )
        .await
        .map_err(|_| {
            BusError::Down(format!(
                "no answer from RabbitMQ at {}",
                redact(&shared.url)
            ))
        })?
        .map_err(|e| {
            BusError::Down(format!(
                "cannot connect to RabbitMQ at {}: {e}",
                redact(&shared.url)
            ))
        })?;
        let (err_tx, err_rx) = mpsc::channel(4);
        let mut events = connection.events_listener();
        let status = connection.status().clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                // A channel error (another replica holding an exclusive
                // queue) is reported here too; only a dead connection counts.
                if let lapin::Event::Error(e) = event
                    && !status.connected()
                {
                    let _ = err_tx.send(e.to_string()).await;
                    break;
                }
            }
            if !status.connected() {
                let _ = err_tx.send("connection closed".into()).await;
            }
        });
        let publish = connection.create_channel().await.map_err(broker)?;
        let request = connection.create_channel().await.map_err(broker)?;
        request
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker)?;
        let reply_queue = shared.reply_queue.clone();
        let replies_channel = connection.create_channel().await.map_err(broker)?;
        replies_channel
            .queue_declare(
                reply_queue.as_str().into(),
                PRIVATE_QUEUE,
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if is_locked(&e) {
                    BusError::IdTaken(shared.replica.clone())
                } else {
                    broker(e)
                }
            })?;
        let mut replies = replies_channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                SOLE_CONSUMER,
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let weak = Arc::downgrade(shared);
        tokio::spawn(async move {
            let _keep = replies_channel;
            while let Some(Ok(d)) = replies.next().await {
                let Some(shared) = weak.upgrade() else { break };
                let id = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                if let Some(tx) = shared.pending.lock().expect("pending").remove(&id) {
                    let _ = tx.send(Bytes::from(d.data));
                    continue;
                }
                let mut inboxes = shared.inboxes.lock().expect("inboxes");
                if let Some(tx) = inboxes.get(&id) {
                    let msg = Msg {
                        subject: shared.reply_queue.clone(),
                        reply: None,
                        payload: Bytes::from(d.data),
                    };
                    // Never wait here: every answer to this replica comes
                    // through this loop. An inbox that overflows ends.
                    if tx.try_send(msg).is_err() {
                        inboxes.remove(&id);
                    }
                }
            }
        });
        Ok((
            Live {
                connection: Arc::new(connection),
                publish,
                request,
                reply_queue,
            },
            err_rx,
        ))
    }
}

/// RabbitMQ's answer to declaring an exclusive queue another connection
/// holds.
fn is_locked(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)))
}

/// Re-makes the connection whenever it fails, for as long as the bus lives.
async fn supervise(shared: std::sync::Weak<Shared>, mut errors: mpsc::Receiver<String>) {
    loop {
        let why = errors
            .recv()
            .await
            .unwrap_or_else(|| "connection closed".into());
        let Some(s) = shared.upgrade() else { return };
        tracing::warn!(error = %why, "RabbitMQ connection lost; reconnecting");
        s.up.store(false, Ordering::Relaxed);
        if let Some(old) = s.conn.lock().expect("conn").take() {
            // Close it for good, so it holds no exclusive queue.
            tokio::spawn(async move {
                let _ = old.connection.close(320, "reconnecting".into()).await;
            });
        }
        s.pending.lock().expect("pending").clear();
        s.inboxes.lock().expect("inboxes").clear();
        s.idle.lock().expect("idle").clear();
        s.lost.send_modify(|n| *n += 1);
        drop(s);
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::time::sleep(backoff).await;
            let Some(s) = shared.upgrade() else { return };
            match Shared::open(&s).await {
                Ok((live, e)) => {
                    *s.conn.lock().expect("conn") = Some(live);
                    s.up.store(true, Ordering::Relaxed);
                    errors = e;
                    tracing::info!("RabbitMQ connection re-established");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "RabbitMQ still unreachable");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
