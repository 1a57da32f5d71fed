//! NATS: subjects map one to one; async-nats reconnects and resubscribes by
//! itself, and each disconnection moves the `lost` counter so tunnels that
//! may have lost messages end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event, RequestErrorKind};
use bytes::Bytes;
use tokio::sync::watch;

use super::{BusError, SUBSCRIPTION_BUFFER, Subscription};

pub(super) struct Nats {
    client: async_nats::Client,
    lost: watch::Sender<u64>,
    up: Arc<AtomicBool>,
}

impl Nats {
    pub async fn connect(url: &str, root: &str) -> Result<Nats, BusError> {
        let (lost, _) = watch::channel(0u64);
        let up = Arc::new(AtomicBool::new(true));
        let events = {
            let lost = lost.clone();
            let up = up.clone();
            move |event: Event| {
                let lost = lost.clone();
                let up = up.clone();
                async move {
                    match event {
                        Event::Disconnected => {
                            tracing::warn!("NATS connection lost; reconnecting");
                            up.store(false, Ordering::Relaxed);
                            lost.send_modify(|n| *n += 1);
                        }
                        Event::Connected => {
                            tracing::info!("NATS connection (re)established");
                            up.store(true, Ordering::Relaxed);
                        }
                        Event::SlowConsumer(_) => {
                            // A dropped message may be a tunnel's: end what was in flight
                            // rather than carry on with a gap.
                            tracing::warn!("NATS dropped messages for a slow subscription");
                            lost.send_modify(|n| *n += 1);
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            }
        };
        let client = ConnectOptions::new()
            .name("gatekey-server")
            // Answers too stay under the installation's root, so a NATS
            // user limited to `gatekey.<installation>.>` can do everything.
            .custom_inbox_prefix(format!("{root}_INBOX"))
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            .subscription_capacity(SUBSCRIPTION_BUFFER)
            .request_timeout(None)
            .max_reconnects(None)
            .event_callback(events)
            .connect(url)
            .await
            .map_err(|e| {
                BusError::Down(format!(
                    "cannot connect to NATS at {}: {e}",
                    super::redact(url)
                ))
            })?;
        Ok(Nats { client, lost, up })
    }

    pub async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        let sub = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| BusError::Broker(e.to_string()))?;
        Ok(Subscription::nats(sub))
    }

    pub async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        self.client
            .publish(subject.to_string(), payload)
            .await
            .map_err(|e| BusError::Down(e.to_string()))
    }

    pub async fn request(&self, subject: &str, payload: Bytes) -> Result<Bytes, BusError> {
        match self.client.request(subject.to_string(), payload).await {
            Ok(m) => Ok(m.payload),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                Err(BusError::NoResponders(subject.to_string()))
            }
            Err(e) => Err(BusError::Broker(e.to_string())),
        }
    }

    pub fn lost(&self) -> watch::Receiver<u64> {
        self.lost.subscribe()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

pub(super) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
