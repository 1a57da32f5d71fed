//! A console client speaking v5.channel.k8s.io, for the integration tests.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use gatekey::testkit::Cluster;
use gatekey_proto::channel::{self, Status};
use gatekey_proto::transport::{self, Endpoint, TransportError, WsStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A console client: everything received, and the final status.
pub struct Console {
    pub ws: WsStream,
    pub output: Vec<u8>,
    pub notices: String,
    pub status: Option<Status>,
}

pub fn query(metadata: &str, extra: &str) -> String {
    let m: String = form_urlencoded::byte_serialize(metadata.as_bytes()).collect();
    format!("metadata={m}{extra}")
}

pub async fn open(c: &Cluster, agent: &str, q: &str) -> Result<Console, TransportError> {
    open_as(c, &c.admin_key, agent, q).await
}

pub async fn open_as(
    c: &Cluster,
    key: &str,
    agent: &str,
    q: &str,
) -> Result<Console, TransportError> {
    let endpoint = Endpoint::parse(&c.url).unwrap();
    let tls = transport::client_config(Some(&c.ca_cert)).unwrap();
    let (ws, _) = transport::connect_ws(
        &endpoint,
        &format!("/ws/v1/agents/{agent}/console?{q}"),
        &[("authorization", format!("Bearer {key}"))],
        &[channel::V5],
        tls,
        WebSocketConfig::default(),
        Duration::from_secs(30),
    )
    .await?;
    Ok(Console {
        ws,
        output: Vec::new(),
        notices: String::new(),
        status: None,
    })
}

pub async fn tty(c: &Cluster, agent: &str, extra: &str) -> Result<Console, TransportError> {
    open(
        c,
        agent,
        &query(
            r#"{"tty":true,"initialDimensions":{"Width":80,"Height":24}}"#,
            extra,
        ),
    )
    .await
}

impl Console {
    pub async fn send(&mut self, text: &str) {
        let mut b = vec![channel::STDIN];
        b.extend_from_slice(text.as_bytes());
        self.ws.send(Message::Binary(Bytes::from(b))).await.unwrap();
    }

    pub async fn resize(&mut self, w: u16, h: u16) {
        let mut b = vec![channel::RESIZE];
        b.extend_from_slice(format!(r#"{{"Width":{w},"Height":{h}}}"#).as_bytes());
        self.ws.send(Message::Binary(Bytes::from(b))).await.unwrap();
    }

    /// Reads one message; false when the connection ended.
    pub async fn read_one(&mut self) -> bool {
        match self.ws.next().await {
            Some(Ok(Message::Binary(d))) if !d.is_empty() => {
                match d[0] {
                    channel::STDOUT => self.output.extend_from_slice(&d[1..]),
                    channel::STDERR => self.notices.push_str(&String::from_utf8_lossy(&d[1..])),
                    channel::STATUS => self.status = serde_json::from_slice(&d[1..]).ok(),
                    _ => {}
                }
                true
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => false,
            Some(Ok(_)) => true,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Reads until `f` holds on the output and notices, or panics after 15 s.
    pub async fn until(&mut self, what: &str, f: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f(&self.text(), &self.notices) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.read_one()).await {
                Ok(true) => {}
                Ok(false) => panic!(
                    "connection ended waiting for {what}; output {:?}, notices {:?}, status {:?}",
                    self.text(),
                    self.notices,
                    self.status
                ),
                Err(_) => panic!(
                    "timed out waiting for {what}; output {:?}, notices {:?}",
                    self.text(),
                    self.notices
                ),
            }
        }
    }

    pub async fn output_contains(&mut self, s: &str) {
        self.until(s, |o, _| o.contains(s)).await
    }

    /// Reads to the end; returns the final status.
    pub async fn finish(&mut self, within: Duration) -> Status {
        tokio::time::timeout(within, async { while self.read_one().await {} })
            .await
            .unwrap_or_else(|_| panic!("session did not end; output {:?}", self.text()));
        self.status.clone().expect("a status before the close")
    }
}
