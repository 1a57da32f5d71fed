//! Shared control-plane state handed to every handler.

use std::sync::Arc;

use crate::config::Config;
use crate::live::Sessions;
use crate::registry::Registry;
use crate::store::Store;

pub struct State {
    pub config: Config,
    pub store: Store,
    pub registry: Registry,
    pub sessions: Sessions,
    /// Other replicas, when this is one of several (`bus_url`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// This process among all control planes that ever ran on the database
    /// (its lease, crate::lease).
    pub instance: String,
    /// Set at shutdown: the lease is no longer renewed.
    pub stopping: std::sync::atomic::AtomicBool,
}

pub type AppState = Arc<State>;

impl State {
    /// One connected agent, here or on another replica.
    pub async fn connected_agent(&self, node_id: &str) -> Option<crate::cluster::AgentInfo> {
        let replica = self
            .cluster
            .as_ref()
            .map(|c| c.replica.as_str())
            .unwrap_or("");
        if let Some(conn) = self.registry.get(node_id) {
            return Some(crate::cluster::AgentInfo::of(&conn, replica));
        }
        let cluster = self.cluster.as_ref()?;
        let answer = cluster
            .ask_agent(node_id, crate::cluster::agent_op::INFO, cluster.ask_timeout)
            .await
            .ok()?;
        serde_json::from_slice(&answer).ok()
    }

    /// Every connected agent, here and on other replicas, by node id.
    pub async fn connected_agents(
        &self,
    ) -> std::collections::HashMap<String, crate::cluster::AgentInfo> {
        let replica = self
            .cluster
            .as_ref()
            .map(|c| c.replica.as_str())
            .unwrap_or("");
        let mut all: std::collections::HashMap<_, _> = self
            .registry
            .list()
            .iter()
            .map(|c| (c.node_id.clone(), crate::cluster::AgentInfo::of(c, replica)))
            .collect();
        if let Some(cluster) = &self.cluster {
            for a in cluster.remote_agents().await {
                all.entry(a.node_id.clone()).or_insert(a);
            }
        }
        all
    }

    /// The timeouts of a session of this kind.
    pub fn session_timeouts(&self, console: bool) -> crate::relay::Timeouts {
        let nonzero = |d: std::time::Duration| (!d.is_zero()).then_some(d);
        crate::relay::Timeouts {
            close: self.config.request_timeout,
            heartbeat_interval: self.config.heartbeat_interval,
            heartbeat_timeout: self.config.heartbeat_timeout,
            idle: if console {
                nonzero(self.config.console_idle_timeout)
            } else {
                None
            },
            max_duration: nonzero(self.config.session_max_duration),
        }
    }
}
