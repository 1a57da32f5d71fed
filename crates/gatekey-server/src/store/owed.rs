//! Closing records a control plane owes the audit log.
//!
//! A control plane that opens a session (or takes an agent's link) notes
//! here the record that closes it, and drops the note when it writes that
//! record. Each running control plane (an *instance*: one process) renews
//! its row in `control_planes`; one silent for longer than its lease is
//! dead, and whoever notices first (another replica, or the control plane
//! restarted on the same database) writes their records, each in the same
//! statement that deletes its note, so under concurrent takers each record
//! is written once and none is lost.

use sqlx::Row;

use super::{NewAuditRecord, Note, Result, Store};

/// A closing record left by a control plane that stopped without writing it.
#[derive(Clone, Debug)]
pub struct OwedClose {
    pub key: String,
    /// The instance that owed it.
    pub instance: String,
    pub opened_at: i64,
    pub record: NewAuditRecord,
}

/// An instance found dead.
#[derive(Clone, Debug)]
pub struct DeadInstance {
    pub instance: String,
    pub replica_id: String,
    pub seen_at: i64,
}

impl Store {
    /// Registers a starting control plane.
    pub async fn instance_started(&self, instance: &str, replica_id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO control_planes (instance, replica_id, started_at, seen_at) VALUES ($1, $2, $3, $3)",
        )
        .bind(instance)
        .bind(replica_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews the instance's lease; false if its row is gone (others took
    /// it for dead), in which case it is registered again.
    pub async fn instance_alive(&self, instance: &str, replica_id: &str, now: i64) -> Result<bool> {
        let renewed = sqlx::query("UPDATE control_planes SET seen_at = $1 WHERE instance = $2")
            .bind(now)
            .bind(instance)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if renewed == 0 {
            self.instance_started(instance, replica_id, now).await?;
        }
        Ok(renewed > 0)
    }

    /// A control plane stopping cleanly, with nothing owed.
    pub async fn instance_stopped(&self, instance: &str) -> Result<()> {
        sqlx::query("DELETE FROM control_planes WHERE instance = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The time leases are judged by: the database's clock on PostgreSQL,
    /// so that replicas whose clocks differ agree on who is late.
    pub async fn clock_ms(&self) -> Result<i64> {
        if self.sqlite {
            return Ok(super::now_ms());
        }
        Ok(sqlx::query_scalar(
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub fn is_sqlite(&self) -> bool {
        self.sqlite
    }

    /// Declares dead, at once, the other instances registered under
    /// `replica_id` (or every other instance when `replica_id` is None): a
    /// restarted control plane knows its predecessor is gone.
    pub async fn predecessors_dead(&self, instance: &str, replica_id: Option<&str>) -> Result<()> {
        let q = match replica_id {
            Some(id) => sqlx::query(
                "UPDATE control_planes SET seen_at = 0 WHERE instance <> $1 AND replica_id = $2",
            )
            .bind(instance)
            .bind(id.to_string()),
            None => sqlx::query("UPDATE control_planes SET seen_at = 0 WHERE instance <> $1")
                .bind(instance),
        };
        q.execute(&self.pool).await?;
        Ok(())
    }

    /// Removes the instances not heard since `cutoff` (never `instance`
    /// itself), returning the ones this call removed.
    pub async fn expire_instances(&self, instance: &str, cutoff: i64) -> Result<Vec<DeadInstance>> {
        let rows = sqlx::query(
            "DELETE FROM control_planes WHERE seen_at < $1 AND instance <> $2 \
             RETURNING instance, replica_id, seen_at",
        )
        .bind(cutoff)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadInstance {
                    instance: r.try_get("instance")?,
                    replica_id: r.try_get("replica_id")?,
                    seen_at: r.try_get("seen_at")?,
                })
            })
            .collect()
    }

    /// The other control planes that renewed their lease after `since`:
    /// (replica id, started at), by the database's clock.
    pub async fn instances_renewed_after(
        &self,
        instance: &str,
        since: i64,
    ) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT replica_id, started_at FROM control_planes WHERE seen_at > $1 AND instance <> $2",
        )
        .bind(since)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("replica_id")?, r.try_get("started_at")?)))
            .collect()
    }

    /// How many notes `instance` holds.
    pub async fn owed_by(&self, instance: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM owed_closes WHERE instance = $1")
                .bind(instance)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Notes the record `instance` owes if it stops before closing `key`
    /// (without an audit record of its own: see `append_audit_noting`).
    pub async fn owe_close(
        &self,
        key: &str,
        instance: &str,
        record: &NewAuditRecord,
    ) -> Result<()> {
        let note = Note::Owe {
            key,
            instance,
            closing: record,
        };
        let sql = note.sql(1);
        note.bind(sqlx::query(&sql), super::now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The oldest 1,000 notes of instances no longer registered (the rest
    /// at the next sweeps, so one sweep's memory is bounded). Each is
    /// written with [`Note::Take`], so that under concurrent sweeps only one
    /// writes it, and a sweep that dies leaves the rest noted.
    pub async fn orphaned_closes(&self) -> Result<Vec<OwedClose>> {
        let rows = sqlx::query(
            "SELECT close_key, instance, opened_at, action, outcome, user_name, remote_addr, agent, \
             session_id, detail FROM owed_closes \
             WHERE instance NOT IN (SELECT instance FROM control_planes) \
             ORDER BY opened_at LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get("detail")?;
                let outcome: String = r.try_get("outcome")?;
                Ok(OwedClose {
                    key: r.try_get("close_key")?,
                    instance: r.try_get("instance")?,
                    opened_at: r.try_get("opened_at")?,
                    record: NewAuditRecord {
                        action: r.try_get("action")?,
                        outcome: match outcome.as_str() {
                            "ok" => "ok",
                            "denied" => "denied",
                            _ => "failed",
                        },
                        user: r.try_get("user_name")?,
                        remote_addr: r.try_get("remote_addr")?,
                        agent: r.try_get("agent")?,
                        session_id: r.try_get("session_id")?,
                        detail: serde_json::from_str(&detail).unwrap_or_default(),
                    },
                })
            })
            .collect()
    }

    /// Drops a note whose record is already written.
    pub async fn drop_note(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM owed_closes WHERE close_key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether the log already holds a `session.closed` for `session_id`
    /// (a control plane that died between writing it and dropping its note).
    pub async fn session_closed(&self, session_id: &str) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM audit_log WHERE session_id = $1 AND action = 'session.closed' LIMIT 1",
        )
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }
}
