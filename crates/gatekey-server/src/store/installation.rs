//! The installation's id: made once, by whichever control plane first asks,
//! and the same for every replica on the database. It names the
//! installation's subjects and queues on the message broker, so that two
//! installations sharing one broker never hear each other.

use sqlx::Row;

use super::{Result, Store};

impl Store {
    /// The installation's id (16 hex digits).
    pub async fn installation_id(&self) -> Result<String> {
        // Two replicas starting at once both try; the primary key keeps
        // the first, and both read it back.
        sqlx::query("INSERT INTO installation (k, id) VALUES (1, $1) ON CONFLICT (k) DO NOTHING")
            .bind(crate::secret::random_hex(8))
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT id FROM installation WHERE k = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("id")?)
    }
}
