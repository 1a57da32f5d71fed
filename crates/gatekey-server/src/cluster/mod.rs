//! Control-plane replicas working as one (docs/scaling.md).
//!
//! Each replica listens on the bus for its agents (`agent.ID`) and for
//! itself (`replica.ID`), and hears the others' heartbeats on `replicas`
//! (all under the installation's root, see [`Bus`]). A request that concerns an agent held by another
//! replica is carried there whole, through a [`tunnel`], and served by that
//! replica's own API as if its client were connected to it: the same checks,
//! the same session table (so consoles are shared, observed and taken over
//! in one place), the same audit records. Lists are gathered from every
//! live replica.

pub mod proxy;
pub mod rebalance;
pub mod tunnel;
pub mod tunnel_io;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bus::{Bus, BusError, Msg, Subscription};
use crate::registry::AgentConn;
use crate::state::AppState;
use tunnel::TunnelConfig;

const REPLICAS: &str = "replicas";

/// The version of what replicas say to each other. Raise it with any
/// change an older replica would misread: replicas of different versions
/// then refuse each other's requests with a message that says so, and
/// leave each other out of lists, rather than misunderstand each other.
pub const PROTOCOL: u32 = 1;

/// Why a replica of another protocol version cannot serve a request.
pub fn protocol_mismatch(replica: &str, theirs: u32) -> String {
    format!(
        "replica {replica} runs gatekey {} (replica protocol {PROTOCOL}) and cannot serve a request from a replica of protocol {theirs}: run one gatekey version on every replica",
        env!("CARGO_PKG_VERSION")
    )
}

pub fn agent_subject(node_id: &str) -> String {
    format!("agent.{node_id}")
}

pub fn replica_subject(replica: &str) -> String {
    format!("replica.{replica}")
}

/// Ids that go into subjects and queue names: short, and nothing a broker
/// treats specially (dots, wildcards, spaces).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Marks a request that arrived through a tunnel from another replica: it
/// is served here, never forwarded again, and a session it opens takes the
/// tunnel's id.
#[derive(Clone, Debug)]
pub struct Proxied {
    pub session_id: String,
    pub from_replica: String,
}

/// A connected agent as every replica sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    pub node_id: String,
    pub name: String,
    pub node_type: String,
    pub remote_addr: String,
    pub connected_at: i64,
    pub version: String,
    pub hostname: String,
    pub session_enabled: bool,
    pub capabilities: Vec<String>,
    pub replica: String,
}

impl AgentInfo {
    pub fn of(conn: &AgentConn, replica: &str) -> AgentInfo {
        AgentInfo {
            node_id: conn.node_id.clone(),
            name: conn.name.clone(),
            node_type: conn.node_type.as_str().to_string(),
            remote_addr: conn.remote_addr.to_string(),
            connected_at: conn.connected_at,
            version: conn.version.clone(),
            hostname: conn.hostname.clone(),
            session_enabled: conn.session_enabled,
            capabilities: conn.capabilities.clone(),
            replica: replica.to_string(),
        }
    }
}

/// Questions one replica asks another.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Query {
    /// A page of the agents held there, after the node id `after`.
    Agents {
        #[serde(default)]
        after: Option<String>,
    },
    /// A page of the sessions running there, after the session id `after`.
    Sessions {
        #[serde(default)]
        after: Option<String>,
    },
    HasSession {
        id: String,
    },
}

impl Query {
    /// The same list question, for the page after `key`.
    fn next_page(&self, key: String) -> Option<Query> {
        match self {
            Query::Agents { .. } => Some(Query::Agents { after: Some(key) }),
            Query::Sessions { .. } => Some(Query::Sessions { after: Some(key) }),
            Query::HasSession { .. } => None,
        }
    }
}

/// One page of a list answer: a replica's answer must fit one bus message
/// (NATS: `max_payload`, 1 MB by default), however many agents it holds.
#[derive(Serialize, Deserialize, Default, Debug)]
struct Page {
    items: Vec<serde_json::Value>,
    /// The key to ask after for the next page; None on the last.
    next: Option<String>,
}

/// Bytes of items in one page (a single larger item still goes alone).
const PAGE_BYTES: usize = 256 * 1024;

/// Most pages asked of one replica for one list.
const MAX_PAGES: usize = 10_000;

/// The page of `items` (key, item) after `after`, in key order.
fn page(mut items: Vec<(String, serde_json::Value)>, after: Option<&str>, budget: usize) -> Page {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Page::default();
    let mut used = 0;
    let mut last = None;
    for (key, item) in items {
        if after.is_some_and(|a| key.as_str() <= a) {
            continue;
        }
        let size = item.to_string().len();
        if !out.items.is_empty() && used + size > budget {
            out.next = last;
            break;
        }
        used += size;
        out.items.push(item);
        last = Some(key);
    }
    out
}

pub struct Cluster {
    pub bus: Bus,
    pub replica: String,
    /// This process (the lease's instance id): tells it from another
    /// process claiming the same replica id.
    instance: String,
    /// The subscription to this replica's own subject made by
    /// [`Cluster::claim_id`], still answering (so that a later claim is
    /// refused) until [`Cluster::start`] stops it and listens on it.
    claimed: Mutex<Option<ClaimHeld>>,
    pub tunnel: TunnelConfig,
    /// Where the tunnels this replica opens hear back.
    pub inboxes: Arc<tunnel::Inboxes>,
    /// Bounds questions to other replicas.
    pub ask_timeout: Duration,
    heartbeat: Duration,
    /// Other replicas, by id, with when they were last heard.
    peers: Mutex<HashMap<String, Peer>>,
    router: OnceLock<axum::Router>,
    /// Agent name or id → (node id, name), so that routing a request costs
    /// no database query; entries live `NODE_CACHE_TTL`.
    nodes: Mutex<HashMap<String, (String, String, Instant)>>,
    /// Credentials seen valid recently (SHA-256 of the credential → when).
    callers: Mutex<HashMap<[u8; 32], Instant>>,
    /// Requests answered at once being served here for another replica, by
    /// session id: what stops one when its client went away.
    serving: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
}

/// How long a credential checked here is not checked again before a
/// request is carried (the serving replica always checks it).
const CALLER_CACHE_TTL: Duration = Duration::from_secs(5);

const NODE_CACHE_TTL: Duration = Duration::from_secs(10);

/// Another replica, as its heartbeats describe it.
struct Peer {
    seen: Instant,
    protocol: u32,
    version: String,
    agents: Option<u64>,
}

/// A replica as `GET /api/v1/replicas` shows it.
#[derive(Serialize, Debug)]
pub struct ReplicaView {
    pub id: String,
    /// The replica answering the request.
    pub this: bool,
    pub version: String,
    pub protocol: u32,
    /// Agent links it holds (as of its last heartbeat for the others).
    pub agents: Option<u64>,
    /// Milliseconds since its last heartbeat (0 for this one).
    pub last_heard_ms: u64,
}

impl ReplicaView {
    /// The replica answering, holding `agents` links.
    pub fn this(id: &str, agents: u64) -> ReplicaView {
        ReplicaView {
            id: id.to_string(),
            this: true,
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL,
            agents: Some(agents),
            last_heard_ms: 0,
        }
    }
}

impl Cluster {
    pub fn new(
        bus: Bus,
        replica: String,
        instance: String,
        tunnel: TunnelConfig,
        heartbeat: Duration,
    ) -> Cluster {
        Cluster {
            inboxes: tunnel::Inboxes::new(bus.clone()),
            bus,
            replica,
            instance,
            claimed: Mutex::new(None),
            // A replica that is gone is "no responders" at once; only a
            // hung one makes a list wait, and not for long.
            ask_timeout: tunnel.open_timeout.min(Duration::from_secs(2)),
            tunnel,
            heartbeat,
            peers: Mutex::new(HashMap::new()),
            router: OnceLock::new(),
            nodes: Mutex::new(HashMap::new()),
            callers: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
        }
    }

    /// Starts the replica's listeners and heartbeat. The router serves
    /// requests that other replicas carry here.
    pub async fn start(state: &AppState, router: axum::Router) -> Result<(), BusError> {
        let Some(cluster) = state.cluster.clone() else {
            return Ok(());
        };
        let _ = cluster.router.set(router);
        // Listening is retried by the listeners themselves; the first
        // failure is reported to the caller for the log.
        let claimed = cluster.claimed.lock().expect("claimed").take();
        let held = match claimed {
            Some(held) => held.release().await,
            None => None,
        };
        let own = match held {
            Some(own) => Ok(own),
            None => {
                cluster
                    .bus
                    .subscribe(&replica_subject(&cluster.replica))
                    .await
            }
        };
        let heard = cluster.bus.subscribe_broadcast(REPLICAS).await;
        let failed = own.as_ref().err().or(heard.as_ref().err()).cloned();
        tokio::spawn(listen_replica(state.clone(), own.ok()));
        tokio::spawn(listen_heartbeats(state.clone(), heard.ok()));
        tokio::spawn(send_heartbeats(state.clone()));
        cluster.inboxes.fill();
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops serving a request answered at once whose client went away.
    fn stop_serving(&self, msg: &Msg) {
        if let Some(id) = tunnel::parse_cancel(msg)
            && let Some(stop) = self.serving.lock().expect("serving").remove(id)
        {
            let _ = stop.send(());
        }
    }

    pub fn cached_node(&self, reference: &str) -> Option<(String, String)> {
        let nodes = self.nodes.lock().expect("nodes");
        let (id, name, at) = nodes.get(reference)?;
        (at.elapsed() < NODE_CACHE_TTL).then(|| (id.clone(), name.clone()))
    }

    pub fn cache_node(&self, reference: &str, id: &str, name: &str) {
        let mut nodes = self.nodes.lock().expect("nodes");
        if nodes.len() > 100_000 {
            nodes.retain(|_, (_, _, at)| at.elapsed() < NODE_CACHE_TTL);
        }
        nodes.insert(
            reference.to_string(),
            (id.to_string(), name.to_string(), Instant::now()),
        );
    }

    pub fn caller_recently_valid(&self, credential: &str) -> bool {
        let key = digest(credential);
        self.callers
            .lock()
            .expect("callers")
            .get(&key)
            .is_some_and(|at| at.elapsed() < CALLER_CACHE_TTL)
    }

    pub fn remember_caller(&self, credential: String) {
        let mut callers = self.callers.lock().expect("callers");
        if callers.len() > 10_000 {
            callers.retain(|_, at| at.elapsed() < CALLER_CACHE_TTL);
        }
        callers.insert(digest(&credential), Instant::now());
    }

    pub fn forget_node(&self, reference: &str) {
        self.nodes.lock().expect("nodes").remove(reference);
    }

    /// Replicas of this protocol version heard from recently, except this
    /// one. A replica heard within four `replica_timeout`s is asked: one
    /// that is gone answers "no responders" at once, so a late heartbeat
    /// never hides a live replica's agents and sessions.
    pub fn live_peers(&self) -> Vec<String> {
        let forget_after = self.forget_after();
        let mut peers = self.peers.lock().expect("peers");
        peers.retain(|_, p| p.seen.elapsed() < forget_after);
        let mut v: Vec<String> = peers
            .iter()
            .filter(|(_, p)| p.protocol == PROTOCOL)
            .map(|(id, _)| id.clone())
            .collect();
        v.sort();
        v
    }

    /// How long a silent peer is still asked and listed: four
    /// `replica_timeout`s.
    fn forget_after(&self) -> Duration {
        self.heartbeat * 12
    }

    /// The replicas heard recently (of any protocol), this one first.
    pub fn replicas(&self, own_agents: u64) -> Vec<ReplicaView> {
        let forget_after = self.forget_after();
        let mut out = vec![ReplicaView::this(&self.replica, own_agents)];
        let peers = self.peers.lock().expect("peers");
        let mut others: Vec<ReplicaView> = peers
            .iter()
            .filter(|(_, p)| p.seen.elapsed() < forget_after)
            .map(|(id, p)| ReplicaView {
                id: id.clone(),
                this: false,
                version: p.version.clone(),
                protocol: p.protocol,
                agents: p.agents,
                last_heard_ms: p.seen.elapsed().as_millis() as u64,
            })
            .collect();
        others.sort_by(|a, b| a.id.cmp(&b.id));
        out.extend(others);
        out
    }

    /// The agent counts of the replicas of this protocol heard within the
    /// last three heartbeats; None if one of them reports none (an older
    /// version), since the share would come out wrong.
    fn peer_loads(&self) -> Option<Vec<u64>> {
        let fresh = self.heartbeat * 3;
        self.peers
            .lock()
            .expect("peers")
            .values()
            .filter(|p| p.protocol == PROTOCOL && p.seen.elapsed() < fresh)
            .map(|p| p.agents)
            .collect()
    }

    /// Whether `replica`'s heartbeats are heard here (of any protocol).
    pub fn heard(&self, replica: &str) -> bool {
        let forget_after = self.forget_after();
        self.peers
            .lock()
            .expect("peers")
            .get(replica)
            .is_some_and(|p| p.seen.elapsed() < forget_after)
    }

    /// Asks one replica; a list answer is followed page by page and
    /// returned whole, as an array.
    async fn ask_all(&self, replica: &str, query: &Query) -> Result<serde_json::Value, BusError> {
        let first = self.ask(replica, query).await?;
        if matches!(query, Query::HasSession { .. }) {
            return Ok(first);
        }
        let bad = |e: serde_json::Error| BusError::Broker(format!("bad list answer: {e}"));
        let mut page: Page = serde_json::from_value(first).map_err(bad)?;
        let mut items = std::mem::take(&mut page.items);
        for _ in 1..MAX_PAGES {
            let Some(next) = page.next.take().and_then(|k| query.next_page(k)) else {
                return Ok(serde_json::Value::Array(items));
            };
            page = serde_json::from_value(self.ask(replica, &next).await?).map_err(bad)?;
            items.append(&mut page.items);
        }
        Err(BusError::Broker(format!(
            "replica {replica} answered more than {MAX_PAGES} pages"
        )))
    }

    async fn ask(&self, replica: &str, query: &Query) -> Result<serde_json::Value, BusError> {
        let mut payload = vec![b'J'];
        payload.extend(serde_json::to_vec(query).expect("serializable"));
        let answer = self
            .bus
            .request(
                &replica_subject(replica),
                Bytes::from(payload),
                self.ask_timeout,
            )
            .await?;
        serde_json::from_slice(&answer).map_err(|e| BusError::Broker(e.to_string()))
    }

    /// Fails if a running replica answers to this replica's id (asked
    /// before this one listens on it), or if the bus cannot tell: only "no
    /// responders" says the id is free.
    pub async fn check_id_free(&self) -> Result<(), BusError> {
        let probe = Query::HasSession { id: String::new() };
        match self.ask(&self.replica, &probe).await {
            Ok(_) => Err(BusError::IdTaken(self.replica.clone())),
            Err(BusError::NoResponders(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Claims the replica id against another process claiming it at the
    /// same moment (which [`Cluster::check_id_free`] cannot see: neither
    /// answers yet). Listens on the replica's subject, tells whoever else
    /// listens there, and waits `ask_timeout`/4 (at least 100 ms) for an
    /// answer: from a replica that runs, or one that is claiming too (which
    /// then fails as well, so a tie starts neither). Until
    /// [`Cluster::start`], later claims are answered "taken" and questions
    /// as an empty replica would. RabbitMQ already refuses a second
    /// listener on the exclusive queue.
    pub async fn claim_id(&self) -> Result<(), BusError> {
        let subject = replica_subject(&self.replica);
        let mut own = self.bus.subscribe(&subject).await?;
        let (address, mut answers) = self.bus.inbox(&crate::live::new_session_id()).await?;
        let claim = Claim {
            instance: self.instance.clone(),
            reply: address,
        };
        self.bus.publish(&subject, claim.message()).await?;
        let window = (self.ask_timeout / 4).max(Duration::from_millis(100));
        let until = tokio::time::Instant::now() + window;
        let mut taken = false;
        loop {
            tokio::select! {
                Some(m) = own.next() => taken |= while_claiming(&self.bus, &self.instance, &m).await,
                Some(_) = answers.next() => taken = true,
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        if taken {
            return Err(BusError::IdTaken(self.replica.clone()));
        }
        let held = ClaimHeld::keep(self.bus.clone(), self.instance.clone(), own);
        *self.claimed.lock().expect("claimed") = Some(held);
        Ok(())
    }

    /// Asks every live peer at once; peers that fail are logged and left out.
    async fn gather(&self, query: &Query) -> Vec<(String, serde_json::Value)> {
        let peers = self.live_peers();
        let asks = peers
            .iter()
            .map(|p| async move { (p, self.ask_all(p, query).await) });
        let mut out = Vec::new();
        for (peer, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Ok(v) => out.push((peer.clone(), v)),
                Err(BusError::NoResponders(_)) => {
                    tracing::debug!(replica = %peer, "a replica that left was not asked again");
                    self.peers.lock().expect("peers").remove(peer);
                }
                Err(e) => tracing::warn!(replica = %peer, error = %e, "a replica did not answer"),
            }
        }
        out
    }

    /// Agents connected to other replicas.
    pub async fn remote_agents(&self) -> Vec<AgentInfo> {
        self.gather(&Query::Agents { after: None })
            .await
            .into_iter()
            .flat_map(|(_, v)| serde_json::from_value::<Vec<AgentInfo>>(v).unwrap_or_default())
            .collect()
    }

    /// Sessions live on other replicas, as the API shows them.
    pub async fn remote_sessions(&self) -> Vec<serde_json::Value> {
        self.gather(&Query::Sessions { after: None })
            .await
            .into_iter()
            .flat_map(|(_, v)| match v {
                serde_json::Value::Array(a) => a,
                _ => vec![],
            })
            .collect()
    }

    /// The replica holding a live session, if another one does.
    pub async fn session_holder(&self, id: &str) -> Option<String> {
        let query = Query::HasSession { id: id.to_string() };
        self.gather(&query)
            .await
            .into_iter()
            .find(|(_, v)| v.as_bool() == Some(true))
            .map(|(peer, _)| peer)
    }

    /// Asks the replica holding `node_id` something about its link.
    pub async fn ask_agent(
        &self,
        node_id: &str,
        op: u8,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        self.bus
            .request(&agent_subject(node_id), Bytes::from(vec![op]), timeout)
            .await
    }
}

fn digest(credential: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, credential.as_bytes());
    d.as_ref().try_into().expect("32 bytes")
}

/// A message on a replica's own subject before it serves anything:
/// answered as an empty replica would. Returns whether another process
/// claims the id (it is told the id is taken).
async fn while_claiming(bus: &Bus, instance: &str, msg: &Msg) -> bool {
    match msg.payload.first() {
        Some(b'C') => match Claim::parse(msg) {
            Some(c) if c.instance != instance => {
                let _ = bus.send_to(&c.reply, Bytes::from_static(b"taken")).await;
                true
            }
            _ => false,
        },
        Some(b'J') => {
            let answer = match serde_json::from_slice::<Query>(&msg.payload[1..]) {
                Ok(Query::HasSession { .. }) => serde_json::Value::Bool(false),
                Ok(_) => serde_json::to_value(Page::default()).unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            };
            let body = serde_json::to_vec(&answer).expect("serializable");
            let _ = bus.respond(msg, Bytes::from(body)).await;
            false
        }
        Some(b'T') => {
            tunnel::refuse(bus, msg, "the replica is starting").await;
            false
        }
        _ => false,
    }
}

/// A claimed subscription between the claim and the start of the
/// replica's listeners: a task answers on it meanwhile.
struct ClaimHeld {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Subscription>,
}

impl ClaimHeld {
    fn keep(bus: Bus, instance: String, mut own: Subscription) -> ClaimHeld {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return own,
                    m = own.next() => match m {
                        Some(m) => {
                            while_claiming(&bus, &instance, &m).await;
                        }
                        None => return own,
                    },
                }
            }
        });
        ClaimHeld { stop, task }
    }

    /// The subscription, for the replica's own listener.
    async fn release(self) -> Option<Subscription> {
        let _ = self.stop.send(());
        self.task.await.ok()
    }
}

/// A process claiming a replica id (see [`Cluster::claim_id`]).
#[derive(Serialize, Deserialize)]
struct Claim {
    instance: String,
    /// Where to say the id is taken.
    reply: String,
}

impl Claim {
    fn message(&self) -> Bytes {
        let mut b = vec![b'C'];
        b.extend(serde_json::to_vec(self).expect("serializable"));
        Bytes::from(b)
    }

    fn parse(msg: &Msg) -> Option<Claim> {
        serde_json::from_slice(msg.payload.strip_prefix(b"C")?).ok()
    }
}

/// Answers to `ask_agent`.
pub mod agent_op {
    /// "Is your link alive?": answers `alive` or `dead` (after closing it).
    pub const PROBE: u8 = b'P';
    /// "Describe it": answers the agent's [`super::AgentInfo`] as JSON.
    pub const INFO: u8 = b'I';
    /// "Close it, the node was deleted": answers `ok`.
    pub const DROP: u8 = b'D';
}

/// A subscription made again whenever it ends (the broker connection was
/// re-made) or could not be made.
struct Resubscribing {
    bus: Bus,
    subject: String,
    broadcast: bool,
    sub: Option<Subscription>,
}

impl Resubscribing {
    fn new(bus: &Bus, subject: &str, broadcast: bool, first: Option<Subscription>) -> Self {
        Resubscribing {
            bus: bus.clone(),
            subject: subject.to_string(),
            broadcast,
            sub: first,
        }
    }

    async fn next(&mut self) -> Msg {
        loop {
            let Some(s) = self.sub.as_mut() else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.sub = if self.broadcast {
                    self.bus.subscribe_broadcast(&self.subject).await.ok()
                } else {
                    self.bus.subscribe(&self.subject).await.ok()
                };
                continue;
            };
            match s.next().await {
                Some(m) => return m,
                None => self.sub = None,
            }
        }
    }
}

/// Listens on an agent's subject while this replica holds its link.
/// Dropping it stops listening.
pub struct AgentListener(tokio::task::JoinHandle<()>);

impl Drop for AgentListener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn listen_agent(state: &AppState, conn: Arc<AgentConn>) -> Option<AgentListener> {
    let cluster = state.cluster.clone()?;
    let subject = agent_subject(&conn.node_id);
    let first = match cluster.bus.subscribe(&subject).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(agent = %conn.name, error = %e, "cannot listen for the agent on the bus; retrying");
            None
        }
    };
    let state = state.clone();
    let mut listening = Resubscribing::new(&cluster.bus, &subject, false, first);
    Some(AgentListener(tokio::spawn(async move {
        loop {
            let msg = listening.next().await;
            let state = state.clone();
            let cluster = cluster.clone();
            let conn = conn.clone();
            tokio::spawn(async move { on_agent_message(&state, &cluster, &conn, msg).await });
        }
    })))
}

async fn on_agent_message(state: &AppState, cluster: &Cluster, conn: &AgentConn, msg: Msg) {
    match msg.payload.first() {
        Some(b'T') => {
            // Only while this replica still holds the link.
            let held = state
                .registry
                .get(&conn.node_id)
                .is_some_and(|c| c.conn_id == conn.conn_id);
            if held {
                serve_tunnel(state, cluster, &msg).await;
            } else {
                tunnel::refuse(&cluster.bus, &msg, "the agent has just left this replica").await;
            }
        }
        Some(b'X') => cluster.stop_serving(&msg),
        Some(&agent_op::PROBE) => {
            let alive = conn.mux.probe(state.config.liveness_probe_timeout).await;
            if !alive {
                conn.mux.close(
                    crate::agent_link::close::DUPLICATE,
                    "replaced by a new connection",
                );
            }
            let answer: &'static [u8] = if alive { b"alive" } else { b"dead" };
            let _ = cluster.bus.respond(&msg, Bytes::from_static(answer)).await;
        }
        Some(&agent_op::INFO) => {
            let info = AgentInfo::of(conn, &cluster.replica);
            let body = serde_json::to_vec(&info).expect("serializable");
            let _ = cluster.bus.respond(&msg, Bytes::from(body)).await;
        }
        Some(&agent_op::DROP) => {
            conn.mux.close(
                crate::agent_link::close::NODE_DELETED,
                "node deleted on the control plane",
            );
            let _ = cluster.bus.respond(&msg, Bytes::from_static(b"ok")).await;
        }
        _ => {}
    }
}

/// Serves a request another replica carried here, on this replica's API.
async fn serve_tunnel(state: &AppState, cluster: &Cluster, msg: &Msg) {
    let Some((request, first)) = tunnel::parse_open(msg) else {
        tunnel::refuse(&cluster.bus, msg, "malformed tunnel request").await;
        return;
    };
    if request.protocol != PROTOCOL {
        let why = protocol_mismatch(&cluster.replica, request.protocol);
        tunnel::refuse(&cluster.bus, msg, &why).await;
        return;
    }
    let Some(router) = cluster.router.get().cloned() else {
        tunnel::refuse(&cluster.bus, msg, "the replica is starting").await;
        return;
    };
    let t = tunnel::accept(&cluster.bus, msg, &request, first, cluster.tunnel);
    let addr = request
        .client_addr
        .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
    let proxied = Proxied {
        session_id: request.id.clone(),
        from_replica: request.from_replica.clone(),
    };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(crate::server::RemoteAddr(addr));
            req.extensions_mut().insert(proxied.clone());
            tower::ServiceExt::oneshot(router.clone(), req)
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(state.config.request_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(t.io), service)
        .with_upgrades();
    // A request answered at once stops when its client's replica says
    // nobody waits any more (it cannot otherwise tell).
    let (stop_tx, stop) = tokio::sync::oneshot::channel();
    let whole = request.reply_to.is_some();
    if whole {
        cluster
            .serving
            .lock()
            .expect("serving")
            .insert(request.id.clone(), stop_tx);
    }
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnelled connection ended with an error");
            }
        }
        Ok(()) = stop => tracing::debug!(session = %request.id, "the client went away"),
    }
    if whole {
        cluster.serving.lock().expect("serving").remove(&request.id);
    }
}

async fn listen_replica(state: AppState, first: Option<Subscription>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let subject = replica_subject(&cluster.replica);
    let mut listening = Resubscribing::new(&cluster.bus, &subject, false, first);
    loop {
        let msg = listening.next().await;
        let state = state.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            match msg.payload.first() {
                Some(b'T') => serve_tunnel(&state, &cluster, &msg).await,
                Some(b'X') => cluster.stop_serving(&msg),
                Some(b'C') => {
                    // Another process claims this replica's id.
                    if let Some(c) = Claim::parse(&msg)
                        && c.instance != cluster.instance
                    {
                        tracing::warn!(replica = %cluster.replica, "another process tried to start with this replica_id; it was refused");
                        let _ = cluster
                            .bus
                            .send_to(&c.reply, Bytes::from_static(b"taken"))
                            .await;
                    }
                }
                Some(b'J') => {
                    let answer = match serde_json::from_slice::<Query>(&msg.payload[1..]) {
                        Ok(q) => answer(&state, &cluster, q),
                        Err(_) => serde_json::Value::Null,
                    };
                    let body = serde_json::to_vec(&answer).expect("serializable");
                    let _ = cluster.bus.respond(&msg, Bytes::from(body)).await;
                }
                _ => {}
            }
        });
    }
}

fn answer(state: &AppState, cluster: &Cluster, q: Query) -> serde_json::Value {
    let items: Vec<(String, serde_json::Value)> = match &q {
        Query::Agents { .. } => state
            .registry
            .list()
            .iter()
            .map(|c| {
                let info = AgentInfo::of(c, &cluster.replica);
                (
                    c.node_id.clone(),
                    serde_json::to_value(info).unwrap_or_default(),
                )
            })
            .collect(),
        Query::Sessions { .. } => state
            .sessions
            .list()
            .iter()
            .map(|l| {
                let view = l.snapshot();
                (
                    view.id.clone(),
                    serde_json::to_value(view).unwrap_or_default(),
                )
            })
            .collect(),
        Query::HasSession { id } => {
            return serde_json::Value::Bool(state.sessions.get(id).is_some());
        }
    };
    let after = match &q {
        Query::Agents { after } | Query::Sessions { after } => after.as_deref(),
        Query::HasSession { .. } => None,
    };
    serde_json::to_value(page(items, after, PAGE_BYTES)).unwrap_or_default()
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    replica: String,
    /// A new replica asks the others to introduce themselves at once.
    hello: bool,
    /// [`PROTOCOL`] and the gatekey version of the sender (0 and empty
    /// from versions before they were sent).
    #[serde(default)]
    protocol: u32,
    #[serde(default)]
    version: String,
    /// Agent links the sender holds.
    #[serde(default)]
    agents: Option<u64>,
}

impl Heartbeat {
    fn of(state: &AppState, cluster: &Cluster, hello: bool) -> Heartbeat {
        Heartbeat {
            replica: cluster.replica.clone(),
            hello,
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
            agents: Some(state.registry.len() as u64),
        }
    }
}

async fn send_heartbeats(state: AppState) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let mut hello = true;
    let mut tick = tokio::time::interval(cluster.heartbeat);
    let mut balancer = rebalance::Balancer::default();
    loop {
        tick.tick().await;
        if state.config.rebalance_batch > 0 && !hello {
            even_out(&state, &cluster, &mut balancer);
        }
        let beat = Heartbeat::of(&state, &cluster, hello);
        let body = serde_json::to_vec(&beat).expect("serializable");
        match cluster.bus.broadcast(REPLICAS, Bytes::from(body)).await {
            Ok(()) => hello = false,
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat not sent");
                hello = true;
            }
        }
    }
}

/// Hands idle agents to the other replicas while this one holds more than
/// its share (cluster/rebalance.rs).
fn even_out(state: &AppState, cluster: &Cluster, balancer: &mut rebalance::Balancer) {
    let Some(peers) = cluster.peer_loads() else {
        return;
    };
    let own = state.registry.len() as u64;
    let batch = u64::from(state.config.rebalance_batch);
    let here = |node_id: &str| state.registry.get(node_id).is_some();
    let now = Instant::now();
    match balancer.step(now, cluster.heartbeat, own, &peers, batch, here) {
        rebalance::Step::Nothing => {}
        rebalance::Step::Paused(pause) => tracing::warn!(
            "agents handed to other replicas came back to this one (they dial it directly rather than through a load balancer): handing over pauses for {}s",
            pause.as_secs()
        ),
        rebalance::Step::Hand(k) => {
            // Not one in a session, and not one that arrived lately (perhaps
            // handed over by another replica); the newest of the rest,
            // which came here in a failover.
            let busy: std::collections::HashSet<String> = state
                .sessions
                .list()
                .iter()
                .map(|l| l.agent_id.clone())
                .collect();
            let settled = crate::live::now_ms()
                - (cluster.heartbeat * rebalance::SETTLE_BEATS).as_millis() as i64;
            let mut candidates: Vec<_> = state
                .registry
                .list()
                .into_iter()
                .filter(|c| c.connected_at <= settled && !busy.contains(&c.node_id))
                .collect();
            candidates.sort_by_key(|c| std::cmp::Reverse(c.connected_at));
            let mut handed = Vec::new();
            for conn in candidates {
                if handed.len() as u64 >= k {
                    break;
                }
                // Only while no stream is open on it, checked as it closes.
                if conn.mux.close_if_idle(
                    crate::agent_link::close::GOING_AWAY,
                    "handed to another control-plane replica to even out the load",
                ) {
                    handed.push(conn.node_id.clone());
                }
            }
            if !handed.is_empty() {
                let share = peers
                    .iter()
                    .fold(own, |t, &p| t.saturating_add(p))
                    .div_ceil(peers.len() as u64 + 1);
                tracing::info!(
                    handed = handed.len(),
                    holds = own,
                    share,
                    "handed idle agents to other replicas to even out the load"
                );
            }
            balancer.handed(now, handed);
        }
    }
}

async fn listen_heartbeats(state: AppState, first: Option<Subscription>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let mut listening = Resubscribing::new(&cluster.bus, REPLICAS, true, first);
    loop {
        let msg = listening.next().await;
        let Ok(beat) = serde_json::from_slice::<Heartbeat>(&msg.payload) else {
            continue;
        };
        if beat.replica == cluster.replica || !valid_id(&beat.replica) {
            continue;
        }
        // Shown in lists and logs: a version string, not a payload.
        let version: String = beat.version.chars().take(64).collect();
        let peer = Peer {
            seen: Instant::now(),
            protocol: beat.protocol,
            version: version.clone(),
            agents: beat.agents,
        };
        let new = cluster
            .peers
            .lock()
            .expect("peers")
            .insert(beat.replica.clone(), peer)
            .is_none();
        if new && beat.protocol == PROTOCOL {
            tracing::info!(replica = %beat.replica, "replica joined");
        } else if new {
            tracing::warn!(
                replica = %beat.replica,
                "replica joined running gatekey {} (replica protocol {}), this one runs {} (protocol {PROTOCOL}): they refuse each other's requests and leave each other out of lists until every replica runs one version",
                if version.is_empty() { "of an older version" } else { &version },
                beat.protocol,
                env!("CARGO_PKG_VERSION"),
            );
        }
        if beat.hello {
            let reply = Heartbeat::of(&state, &cluster, false);
            let body = serde_json::to_vec(&reply).expect("serializable");
            let _ = cluster.bus.broadcast(REPLICAS, Bytes::from(body)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<(String, serde_json::Value)> {
        (0..n)
            .map(|i| {
                let key = format!("n{i:05}");
                let v = serde_json::json!({"node_id": key, "pad": "x".repeat(100)});
                (key, v)
            })
            .collect()
    }

    /// Following `next` yields every item once, in order, each page within
    /// the budget, whatever order the items came in.
    #[test]
    fn pages_cover_every_item_once_within_the_budget() {
        let mut all = items(1000);
        all.reverse();
        let budget = 4096;
        let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let p = page(all.clone(), after.as_deref(), budget);
            let bytes: usize = p.items.iter().map(|i| i.to_string().len()).sum();
            assert!(bytes <= budget, "page of {bytes} bytes");
            seen.extend(
                p.items
                    .iter()
                    .map(|i| i["node_id"].as_str().unwrap().to_string()),
            );
            pages += 1;
            match p.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = (0..1000).map(|i| format!("n{i:05}")).collect();
        assert_eq!(seen, want);
        assert!(pages > 30, "{pages} pages");
        // An item larger than the budget still goes, alone.
        let big = vec![("a".to_string(), serde_json::json!("y".repeat(10_000)))];
        let p = page(big, None, budget);
        assert_eq!((p.items.len(), p.next), (1, None));
        // Nothing after the last key.
        let p = page(items(3), Some("n00002"), budget);
        assert!(p.items.is_empty() && p.next.is_none());
    }

    /// A replica of the previous version asked without `after` still
    /// understands the question.
    #[test]
    fn list_questions_without_after_parse() {
        let q: Query = serde_json::from_str(r#"{"op":"agents"}"#).unwrap();
        assert!(matches!(q, Query::Agents { after: None }));
    }
}
