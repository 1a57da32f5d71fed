//! Connected agents, by node id. One live link per node: a second connection
//! for the same node is refused while the first still answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gatekey_proto::mux::Mux;

use crate::store::NodeType;

/// One connected agent.
pub struct AgentConn {
    /// Distinguishes successive connections of the same node.
    pub conn_id: u64,
    pub node_id: String,
    pub name: String,
    pub node_type: NodeType,
    pub mux: Mux,
    pub remote_addr: SocketAddr,
    /// Unix milliseconds.
    pub connected_at: i64,
    pub version: String,
    pub hostname: String,
    /// The node's own side of the session switch, from its hello.
    pub session_enabled: bool,
    pub link_version: u32,
    /// Stream kinds the agent serves ("exec", "pty", "diag").
    pub capabilities: Vec<String>,
}

#[derive(Default)]
pub struct Registry {
    agents: Mutex<HashMap<String, Arc<AgentConn>>>,
    next_conn: AtomicU64,
}

impl Registry {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn get(&self, node_id: &str) -> Option<Arc<AgentConn>> {
        self.agents
            .lock()
            .expect("registry lock")
            .get(node_id)
            .filter(|c| !c.mux.is_closed())
            .cloned()
    }

    /// Registers a connection. Refuses (returning the holder) while another
    /// open connection holds the node.
    pub fn insert(&self, conn: Arc<AgentConn>) -> Result<(), Arc<AgentConn>> {
        let mut agents = self.agents.lock().expect("registry lock");
        if let Some(existing) = agents.get(&conn.node_id)
            && !existing.mux.is_closed()
            && existing.conn_id != conn.conn_id
        {
            return Err(existing.clone());
        }
        agents.insert(conn.node_id.clone(), conn);
        Ok(())
    }

    /// Removes the node's entry if it is still this connection.
    pub fn remove_conn(&self, node_id: &str, conn_id: u64) -> bool {
        let mut agents = self.agents.lock().expect("registry lock");
        if agents.get(node_id).is_some_and(|c| c.conn_id == conn_id) {
            agents.remove(node_id);
            return true;
        }
        false
    }

    pub fn remove(&self, node_id: &str) -> Option<Arc<AgentConn>> {
        self.agents.lock().expect("registry lock").remove(node_id)
    }

    pub fn list(&self) -> Vec<Arc<AgentConn>> {
        self.agents
            .lock()
            .expect("registry lock")
            .values()
            .filter(|c| !c.mux.is_closed())
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.agents.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
