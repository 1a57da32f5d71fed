//! Which control plane holds each agent's link, when there are several.
//!
//! A replica accepting an agent claims the node's row; the primary key makes
//! the claim atomic, so two connections with one token that reach two
//! replicas at the same moment cannot both win. A claim held elsewhere is
//! taken over only by compare-and-swap on the holder's link id.

use sqlx::Row;

use super::{Result, Store};

/// The link that holds a node's claim.
#[derive(Clone, Debug)]
pub struct LinkHolder {
    pub link: String,
    pub instance: String,
    pub claimed_at: i64,
}

impl Store {
    /// Claims the node for `link`; returns the holder if another link holds it.
    pub async fn claim_agent(
        &self,
        node_id: &str,
        instance: &str,
        link: &str,
        now: i64,
    ) -> Result<Option<LinkHolder>> {
        let claimed = sqlx::query(
            "INSERT INTO agent_links (node_id, link, instance, claimed_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (node_id) DO NOTHING",
        )
        .bind(node_id)
        .bind(link)
        .bind(instance)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if claimed == 1 {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT link, instance, claimed_at FROM agent_links WHERE node_id = $1")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some(r) => Ok(Some(LinkHolder {
                link: r.try_get("link")?,
                instance: r.try_get("instance")?,
                claimed_at: r.try_get("claimed_at")?,
            })),
            // Released since: try once more.
            None => Box::pin(self.claim_agent(node_id, instance, link, now)).await,
        }
    }

    /// Takes the claim over from `from`, if it still holds it.
    pub async fn take_agent_claim(
        &self,
        node_id: &str,
        from: &str,
        instance: &str,
        link: &str,
        now: i64,
    ) -> Result<bool> {
        let taken = sqlx::query(
            "UPDATE agent_links SET link = $1, instance = $2, claimed_at = $3 \
             WHERE node_id = $4 AND link = $5",
        )
        .bind(link)
        .bind(instance)
        .bind(now)
        .bind(node_id)
        .bind(from)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }

    /// Ends `link`'s claim (no-op if another link took it over).
    pub async fn release_agent(&self, node_id: &str, link: &str) -> Result<()> {
        sqlx::query("DELETE FROM agent_links WHERE node_id = $1 AND link = $2")
            .bind(node_id)
            .bind(link)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Drops the claims of control planes no longer registered.
    pub async fn drop_orphaned_claims(&self) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM agent_links WHERE instance NOT IN (SELECT instance FROM control_planes)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The claims `instance` holds: node id → link.
    pub async fn claims_of(&self, instance: &str) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT node_id, link FROM agent_links WHERE instance = $1")
            .bind(instance)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("node_id")?, r.try_get("link")?)))
            .collect()
    }

    /// Releases every claim of `instance` (it stops cleanly).
    pub async fn release_claims_of(&self, instance: &str) -> Result<()> {
        sqlx::query("DELETE FROM agent_links WHERE instance = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether `instance` renewed its lease since `cutoff`.
    pub async fn instance_live(&self, instance: &str, cutoff: i64) -> Result<bool> {
        let seen: Option<i64> =
            sqlx::query_scalar("SELECT seen_at FROM control_planes WHERE instance = $1")
                .bind(instance)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seen.is_some_and(|s| s >= cutoff))
    }
}
