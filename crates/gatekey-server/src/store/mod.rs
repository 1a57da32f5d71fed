//! Persistent state: nodes (agents and their tokens), users and API keys,
//! and the audit log.
//!
//! One implementation over sqlx's `Any` driver serves SQLite (the embedded
//! default: WAL, created if missing) and PostgreSQL (clusters). The schema
//! uses only types both share (TEXT, BIGINT), timestamps are Unix
//! milliseconds, booleans are 0/1.

mod audit;
mod identity;
mod installation;
mod links;
mod migrations;
mod owed;

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The kinds of node an agent can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeType {
    Gateway,
    Hub,
    Spoke,
    Device,
}

impl NodeType {
    pub const ALL: [NodeType; 4] = [
        NodeType::Gateway,
        NodeType::Hub,
        NodeType::Spoke,
        NodeType::Device,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Gateway => "gateway",
            NodeType::Hub => "hub",
            NodeType::Spoke => "spoke",
            NodeType::Device => "device",
        }
    }

    pub fn parse(s: &str) -> Option<NodeType> {
        NodeType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Prefix of this type's agent tokens.
    pub fn token_prefix(self) -> &'static str {
        match self {
            NodeType::Gateway => "gw_",
            NodeType::Hub => "hub_",
            NodeType::Spoke => "spoke_",
            NodeType::Device => "dev_",
        }
    }

    /// The CLI words that manage this type (for messages).
    pub fn cli_noun(self) -> &'static str {
        match self {
            NodeType::Gateway => "gateway",
            NodeType::Hub => "mesh hub",
            NodeType::Spoke => "mesh spoke",
            NodeType::Device => "device",
        }
    }
}

/// A registered node.
#[derive(Clone, Debug)]
pub struct Node {
    pub id: String,
    pub name: String,
    pub node_type: NodeType,
    pub token_lookup: String,
    pub token_hash: String,
    /// The control plane's side of the session switch.
    pub session_enabled: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seen_at: Option<i64>,
    pub last_addr: Option<String>,
    pub agent_version: Option<String>,
    pub hostname: Option<String>,
    /// The node's own side, as its agent last reported it.
    pub agent_session_enabled: Option<bool>,
}

/// What an agent reported when it connected.
pub struct AgentSeen<'a> {
    pub addr: &'a str,
    pub version: &'a str,
    pub hostname: &'a str,
    pub session_enabled: bool,
}

pub use audit::{AuditFilter, AuditRecord, NewAuditRecord, Note, Verification};
pub use identity::{ApiKey, User};
pub use links::LinkHolder;
pub use owed::{DeadInstance, OwedClose};

/// How long a starting replica waits, by default, for another one that is
/// migrating the same PostgreSQL schema (`migration_lock_timeout`).
pub const DEFAULT_MIGRATION_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Serialises this process's audit appends and caches the chain's head
    /// (other replicas are kept in one chain by the primary key on `seq`,
    /// with a retry).
    audit_head: std::sync::Arc<tokio::sync::Mutex<Option<(i64, String)>>>,
    sqlite: bool,
}

const NODE_COLUMNS: &str = "id, name, node_type, token_lookup, token_hash, session_enabled, created_at, updated_at, \
     last_seen_at, last_addr, agent_version, hostname, agent_session_enabled";

impl Store {
    /// Connects (creating a SQLite file if missing) and migrates, waiting
    /// up to [`DEFAULT_MIGRATION_LOCK_TIMEOUT`] for another replica that is
    /// migrating.
    pub async fn open(url: &str) -> Result<Store> {
        Store::open_with(url, DEFAULT_MIGRATION_LOCK_TIMEOUT).await
    }

    /// [`open`](Self::open), waiting at most `migration_lock_timeout` for
    /// another replica's migration (PostgreSQL).
    pub async fn open_with(
        url: &str,
        migration_lock_timeout: std::time::Duration,
    ) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL: readers don't block the writer; NORMAL sync is durable across process crashes.
                        sqlx::query("PRAGMA journal_mode=WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous=NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout=5000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA foreign_keys=ON")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let store = Store {
            pool,
            audit_head: Default::default(),
            sqlite,
        };
        migrations::run(&store.pool, sqlite, migration_lock_timeout).await?;
        Ok(store)
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A transaction that reads and then writes. SQLite must take the write
    /// lock up front: upgrading a read snapshot after another connection
    /// wrote fails at once (SQLITE_BUSY_SNAPSHOT) instead of waiting.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(if self.sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        })
    }

    // ---- nodes ----

    pub async fn create_node(&self, node: &Node) -> Result<()> {
        let r = sqlx::query(&format!(
            "INSERT INTO nodes ({NODE_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)"
        ))
        .bind(&node.id)
        .bind(&node.name)
        .bind(node.node_type.as_str())
        .bind(&node.token_lookup)
        .bind(&node.token_hash)
        .bind(node.session_enabled as i64)
        .bind(node.created_at)
        .bind(node.updated_at)
        .bind(node.last_seen_at)
        .bind(node.last_addr.clone())
        .bind(node.agent_version.clone())
        .bind(node.hostname.clone())
        .bind(node.agent_session_enabled.map(|b| b as i64))
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a node named {:?} or with id {:?}",
                node.name, node.id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_nodes(&self, node_type: Option<NodeType>) -> Result<Vec<Node>> {
        let rows = match node_type {
            Some(t) => {
                sqlx::query(&format!(
                    "SELECT {NODE_COLUMNS} FROM nodes WHERE node_type = $1 ORDER BY name"
                ))
                .bind(t.as_str())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(node_from_row).collect()
    }

    /// Finds a node by name or id.
    pub async fn find_node(&self, reference: &str) -> Result<Option<Node>> {
        let row = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = $1 OR id = $1 ORDER BY (name = $1) DESC LIMIT 1"))
            .bind(reference)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    pub async fn node_by_token_lookup(&self, lookup: &str) -> Result<Option<Node>> {
        let row = sqlx::query(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE token_lookup = $1"
        ))
        .bind(lookup)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(node_from_row).transpose()
    }

    pub async fn set_node_session(&self, id: &str, enabled: bool) -> Result<bool> {
        let r = sqlx::query("UPDATE nodes SET session_enabled = $1, updated_at = $2 WHERE id = $3")
            .bind(enabled as i64)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn delete_node(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Records an agent's connection details (and, on disconnect, when it was last seen).
    pub async fn node_seen(&self, id: &str, seen: &AgentSeen<'_>) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET last_seen_at = $1, last_addr = $2, agent_version = $3, hostname = $4, agent_session_enabled = $5 WHERE id = $6",
        )
        .bind(now_ms())
        .bind(seen.addr)
        .bind(seen.version)
        .bind(seen.hostname)
        .bind(seen.session_enabled as i64)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn node_last_seen(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE nodes SET last_seen_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn node_from_row(r: &AnyRow) -> Result<Node> {
    let node_type: String = r.try_get("node_type")?;
    Ok(Node {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        node_type: NodeType::parse(&node_type).ok_or_else(|| {
            StoreError::Db(sqlx::Error::Decode(
                format!("unknown node type {node_type:?}").into(),
            ))
        })?,
        token_lookup: r.try_get("token_lookup")?,
        token_hash: r.try_get("token_hash")?,
        session_enabled: r.try_get::<i64, _>("session_enabled")? != 0,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        last_seen_at: r.try_get("last_seen_at")?,
        last_addr: r.try_get("last_addr")?,
        agent_version: r.try_get("agent_version")?,
        hostname: r.try_get("hostname")?,
        agent_session_enabled: r
            .try_get::<Option<i64>, _>("agent_session_enabled")?
            .map(|v| v != 0),
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

#[cfg(test)]
mod tests;
