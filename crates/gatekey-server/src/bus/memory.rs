//! An in-process broker with the same semantics as the real ones (at most
//! once, ordered per publisher, "no responders"), for unit tests of the
//! cluster logic. Clusters use NATS or RabbitMQ.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{BusError, Msg, SUBSCRIPTION_BUFFER, Subscription};

#[derive(Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

/// Subscribers by subject: (subscription id, where its messages go).
type Subscribers = HashMap<String, Vec<(u64, mpsc::Sender<Msg>)>>;

#[derive(Default)]
struct Shared {
    subs: Mutex<Subscribers>,
    next: AtomicU64,
    lost: Mutex<Option<watch::Sender<u64>>>,
}

impl MemoryBroker {
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    pub(super) fn client(&self) -> Client {
        Client {
            shared: self.shared.clone(),
        }
    }

    /// Simulates a broker restart: every subscription ends and every
    /// client's `lost` counter moves.
    pub fn restart(&self) {
        self.shared.subs.lock().expect("subs").clear();
        if let Some(tx) = &*self.shared.lost.lock().expect("lost") {
            tx.send_modify(|n| *n += 1);
        }
    }
}

pub(super) struct Client {
    shared: Arc<Shared>,
}

struct Unsubscribe {
    shared: Arc<Shared>,
    subject: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut subs = self.shared.subs.lock().expect("subs");
        if let Some(v) = subs.get_mut(&self.subject) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                subs.remove(&self.subject);
            }
        }
    }
}

impl Client {
    pub fn subscribe(&self, subject: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        self.shared
            .subs
            .lock()
            .expect("subs")
            .entry(subject.to_string())
            .or_default()
            .push((id, tx));
        Subscription::new(
            rx,
            Unsubscribe {
                shared: self.shared.clone(),
                subject: subject.to_string(),
                id,
            },
        )
    }

    /// Delivers to every subscriber; false when there was none.
    pub fn publish(&self, subject: &str, reply: Option<String>, payload: Bytes) -> bool {
        let subs = self.shared.subs.lock().expect("subs");
        let Some(v) = subs.get(subject) else {
            return false;
        };
        for (_, tx) in v {
            let _ = tx.try_send(Msg {
                subject: subject.to_string(),
                reply: reply.clone(),
                payload: payload.clone(),
            });
        }
        true
    }

    pub async fn request(&self, subject: &str, payload: Bytes) -> Result<Bytes, BusError> {
        let inbox = format!(
            "_inbox.{}",
            self.shared.next.fetch_add(1, Ordering::Relaxed)
        );
        let mut sub = self.subscribe(&inbox);
        if !self.publish(subject, Some(inbox), payload) {
            return Err(BusError::NoResponders(subject.to_string()));
        }
        sub.next()
            .await
            .map(|m| m.payload)
            .ok_or_else(|| BusError::Down("the broker restarted".into()))
    }

    pub fn lost(&self) -> watch::Receiver<u64> {
        let mut lost = self.shared.lost.lock().expect("lost");
        lost.get_or_insert_with(|| watch::channel(0).0).subscribe()
    }
}
