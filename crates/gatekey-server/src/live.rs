//! The table of live sessions: what `session active` lists, what
//! `session kill` ends, and which console each agent has open (at most one;
//! others join it, observe it or take it over).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::relay::Command;
use crate::store::NodeType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Exec,
    Console,
}

/// How a participant takes part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees the output and may type.
    Interactive,
    /// Sees the output; input is refused.
    Observe,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParticipantInfo {
    #[serde(skip)]
    pub id: u64,
    pub user: String,
    pub mode: Role,
    pub remote_addr: Option<String>,
    pub joined_at: String,
}

/// One live session.
pub struct Live {
    pub id: String,
    pub kind: Kind,
    pub agent: String,
    pub agent_id: String,
    pub node_type: NodeType,
    /// Who opened it, and from where (for the closing audit record).
    pub opened_by: String,
    pub opened_from: Option<String>,
    pub command: Option<String>,
    pub started_at_ms: i64,
    /// Client → agent bytes (stdin).
    pub bytes_in: AtomicU64,
    /// Agent → clients bytes (output, counted once however many watch).
    pub bytes_out: AtomicU64,
    /// Unix ms of the last input or output, for the idle timeout.
    pub last_activity_ms: AtomicI64,
    /// The terminal size the console has now (late joiners are told it).
    pub size: Mutex<Option<(u16, u16)>>,
    pub participants: Mutex<Vec<ParticipantInfo>>,
    commands: mpsc::UnboundedSender<Command>,
    ended: watch::Sender<bool>,
}

impl Live {
    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Sends a command to the session's relay; gives it back once the
    /// session has ended.
    pub fn command(&self, c: Command) -> Result<(), Command> {
        self.commands.send(c).map_err(|e| e.0)
    }

    /// Waits until the session's relay has finished.
    pub async fn wait_ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    pub fn holders(&self) -> String {
        let p = self.participants.lock().expect("participants lock");
        let mut users: Vec<&str> = p.iter().map(|p| p.user.as_str()).collect();
        users.dedup();
        if users.is_empty() {
            "another user".into()
        } else {
            users.join(", ")
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.participants.lock().expect("participants lock").len() > 1 {
            "shared"
        } else {
            "exclusive"
        }
    }

    pub fn snapshot(&self) -> SessionView {
        let participants = self.participants.lock().expect("participants lock").clone();
        let mut users: Vec<String> = participants.iter().map(|p| p.user.clone()).collect();
        users.dedup();
        SessionView {
            id: self.id.clone(),
            agent: self.agent.clone(),
            agent_type: self.node_type.as_str(),
            agent_id: self.agent_id.clone(),
            kind: self.kind,
            mode: self.mode(),
            users,
            participants,
            started_at: crate::api::format_time(self.started_at_ms),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            command: self.command.clone(),
        }
    }
}

/// A session as the API shows it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    pub agent: String,
    pub agent_type: &'static str,
    pub agent_id: String,
    pub kind: Kind,
    pub mode: &'static str,
    pub users: Vec<String>,
    pub participants: Vec<ParticipantInfo>,
    pub started_at: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<String, Arc<Live>>,
    /// agent id → its open console.
    consoles: HashMap<String, Arc<Live>>,
}

/// All live sessions of this control plane.
#[derive(Default)]
pub struct Sessions {
    table: Arc<Mutex<Table>>,
}

/// What a new session needs to be registered.
pub struct NewSession {
    /// The id to use (a session carried from another replica keeps its
    /// tunnel's id); default: a new one.
    pub id: Option<String>,
    pub kind: Kind,
    pub agent: String,
    pub agent_id: String,
    pub node_type: NodeType,
    pub opened_by: String,
    pub opened_from: Option<String>,
    pub command: Option<String>,
    pub size: Option<(u16, u16)>,
    /// Bounds telling a late joiner that the session has ended.
    pub close_timeout: Duration,
}

/// A registered session; dropping it removes the session from the table.
pub struct Registration {
    pub live: Arc<Live>,
    table: Arc<Mutex<Table>>,
}

impl Registration {
    /// Removes the session from the table and tells whoever waits for its
    /// end (a kill, a takeover), before the relay's slower goodbyes to its
    /// clients. Idempotent.
    pub fn unlist(&self) {
        let mut t = self.table.lock().expect("sessions lock");
        t.by_id.remove(&self.live.id);
        if self.live.kind == Kind::Console
            && t.consoles
                .get(&self.live.agent_id)
                .is_some_and(|c| Arc::ptr_eq(c, &self.live))
        {
            t.consoles.remove(&self.live.agent_id);
        }
        drop(t);
        let _ = self.live.ended.send(true);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.unlist();
    }
}

/// The receiving end of a session's commands. Dropping it (the session
/// ended, or never started) refuses every join still queued with a status,
/// so no client is left with a silently closed socket.
pub struct Commands {
    rx: mpsc::UnboundedReceiver<Command>,
    close_timeout: Duration,
}

impl Commands {
    pub async fn recv(&mut self) -> Option<Command> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Command> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(command) = self.rx.try_recv() {
            if let Command::Join(p) = command
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(crate::relay::refuse_late(*p, self.close_timeout));
            }
        }
    }
}

impl Sessions {
    /// Registers a session. A console fails with the agent's open console
    /// when there is one.
    pub fn register(&self, new: NewSession) -> Result<(Registration, Commands), Arc<Live>> {
        let mut t = self.table.lock().expect("sessions lock");
        if new.kind == Kind::Console
            && let Some(existing) = t.consoles.get(&new.agent_id)
        {
            return Err(existing.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let now = now_ms();
        let id = new
            .id
            .filter(|id| !t.by_id.contains_key(id))
            .unwrap_or_else(new_session_id);
        let live = Arc::new(Live {
            id,
            kind: new.kind,
            agent: new.agent,
            agent_id: new.agent_id,
            node_type: new.node_type,
            opened_by: new.opened_by,
            opened_from: new.opened_from,
            command: new.command,
            started_at_ms: now,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            last_activity_ms: AtomicI64::new(now),
            size: Mutex::new(new.size),
            participants: Mutex::new(Vec::new()),
            commands: tx,
            ended: watch::channel(false).0,
        });
        t.by_id.insert(live.id.clone(), live.clone());
        if live.kind == Kind::Console {
            t.consoles.insert(live.agent_id.clone(), live.clone());
        }
        Ok((
            Registration {
                live,
                table: self.table.clone(),
            },
            Commands {
                rx,
                close_timeout: new.close_timeout,
            },
        ))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.table
            .lock()
            .expect("sessions lock")
            .by_id
            .get(id)
            .cloned()
    }

    pub fn console_of(&self, agent_id: &str) -> Option<Arc<Live>> {
        self.table
            .lock()
            .expect("sessions lock")
            .consoles
            .get(agent_id)
            .cloned()
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<Arc<Live>> {
        let mut v: Vec<Arc<Live>> = self
            .table
            .lock()
            .expect("sessions lock")
            .by_id
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.started_at_ms.cmp(&b.started_at_ms).then(a.id.cmp(&b.id)));
        v
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn new_session_id() -> String {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("s_{hex}")
}

/// A participant's address for display.
pub fn addr_string(addr: Option<SocketAddr>) -> Option<String> {
    addr.map(|a| a.to_string())
}
