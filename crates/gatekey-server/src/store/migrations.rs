//! Schema migrations, applied in order at start. Each runs once, in a
//! transaction, and is recorded in `schema_migrations`. The SQL is written
//! for both SQLite and PostgreSQL.

use std::time::Duration;

use sqlx::AnyPool;

use super::{Result, StoreError, now_ms};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        node_type TEXT NOT NULL,
        token_lookup TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL,
        session_enabled BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        last_seen_at BIGINT,
        last_addr TEXT,
        agent_version TEXT,
        hostname TEXT,
        agent_session_enabled BIGINT
    );
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        revoked_at BIGINT
    );
    CREATE INDEX api_keys_user ON api_keys(user_id);",
    ),
    (
        2,
        // Roles with scopes, passwords, key scopes and login keys; the
        // hash-chained audit log and the anchor that retention leaves.
        "ALTER TABLE users ADD COLUMN scopes TEXT NOT NULL DEFAULT '';
    ALTER TABLE users ADD COLUMN password_hash TEXT;
    ALTER TABLE users ADD COLUMN updated_at BIGINT;
    ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT '';
    ALTER TABLE api_keys ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';
    ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
    CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        at BIGINT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        user_name TEXT,
        remote_addr TEXT,
        agent TEXT,
        session_id TEXT,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_log_at ON audit_log(at);
    CREATE INDEX audit_log_action ON audit_log(action);
    CREATE TABLE audit_anchor (
        id BIGINT PRIMARY KEY,
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL,
        at BIGINT NOT NULL
    )",
    ),
    (
        3,
        // Running control planes with their lease, the closing records
        // each owes if it dies (store/owed.rs), and which one holds each
        // agent's link (store/links.rs).
        "CREATE TABLE control_planes (
        instance TEXT PRIMARY KEY,
        replica_id TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        seen_at BIGINT NOT NULL
    );
    CREATE TABLE owed_closes (
        close_key TEXT PRIMARY KEY,
        instance TEXT NOT NULL,
        opened_at BIGINT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        user_name TEXT,
        remote_addr TEXT,
        agent TEXT,
        session_id TEXT,
        detail TEXT NOT NULL
    );
    CREATE INDEX owed_closes_instance ON owed_closes(instance);
    CREATE TABLE agent_links (
        node_id TEXT PRIMARY KEY,
        link TEXT NOT NULL,
        instance TEXT NOT NULL,
        claimed_at BIGINT NOT NULL
    );
    CREATE INDEX audit_log_session ON audit_log(session_id)",
    ),
    (
        4,
        // The installation's id, which names its subjects and queues on
        // the message broker (store/installation.rs).
        "CREATE TABLE installation (
        k BIGINT PRIMARY KEY,
        id TEXT NOT NULL
    )",
    ),
];

/// Applies what is missing. On PostgreSQL one replica at a time (an
/// advisory lock per schema, released with the connection), so replicas
/// started together on an empty database do not race to create tables. A
/// replica waits at most `lock_timeout` for the lock: a holder that hangs
/// must not keep every other replica from starting, silently.
pub async fn run(pool: &AnyPool, sqlite: bool, lock_timeout: Duration) -> Result<()> {
    let mut conn = pool.acquire().await?;
    if !sqlite {
        lock(&mut conn, lock_timeout).await?;
    }
    let applied = apply(&mut conn).await;
    if !sqlite {
        let unlocked = sqlx::query(&format!("SELECT pg_advisory_unlock({LOCK_KEY})"))
            .execute(&mut *conn)
            .await;
        if unlocked.is_err() {
            // Closing the connection releases the lock.
            conn.detach();
        }
    }
    applied
}

/// The advisory lock that one migrating replica holds (per schema).
pub(super) const LOCK_KEY: &str = "hashtext('gatekey.migrations.' || current_schema())";

/// Takes the migration lock, trying again every 100 ms until `timeout`.
async fn lock(conn: &mut sqlx::AnyConnection, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got: bool = sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"))
            .fetch_one(&mut *conn)
            .await?;
        if got {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Migration(format!(
                "another replica has held the migration lock of this schema for over {} \
                 (waiting is bounded by migration_lock_timeout); if no replica is starting, \
                 find the session holding it in pg_locks (locktype 'advisory')",
                gatekey_proto::duration::format(timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply(conn: &mut sqlx::AnyConnection) -> Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
        .execute(&mut *conn)
        .await?;
    for (version, sql) in MIGRATIONS {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(*version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            continue;
        }
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::Migration(format!("version {version}: {e}")))?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(*version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}
