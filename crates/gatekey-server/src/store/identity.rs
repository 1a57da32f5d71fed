//! Users and their API keys.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError, is_unique_violation, now_ms};

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub name: String,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
    /// Node patterns the user may reach; empty: all.
    pub scopes: Vec<String>,
    /// argon2id PHC string, when the user has a password.
    pub password_hash: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Clone, Debug)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub key_hash: String,
    /// Further limits on top of the user's scopes; empty: none.
    pub scopes: Vec<String>,
    /// `api`, or `login` for keys that `POST /api/v1/login` made.
    pub kind: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

const USER_COLUMNS: &str = "u.id AS u_id, u.name AS u_name, u.role, u.scopes AS u_scopes, u.password_hash, u.created_at AS u_created_at, u.updated_at AS u_updated_at";
const KEY_COLUMNS: &str = "k.id, k.user_id, k.name, k.key_hash, k.scopes, k.kind, k.created_at, k.expires_at, k.revoked_at, k.last_used_at";

/// Scopes are stored space-separated (patterns never contain spaces).
fn join_scopes(scopes: &[String]) -> String {
    scopes.join(" ")
}

fn split_scopes(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn user_from_row(r: &AnyRow) -> Result<User> {
    let created_at: i64 = r.try_get("u_created_at")?;
    Ok(User {
        id: r.try_get("u_id")?,
        name: r.try_get("u_name")?,
        role: r.try_get("role")?,
        scopes: split_scopes(&r.try_get::<String, _>("u_scopes")?),
        password_hash: r.try_get("password_hash")?,
        created_at,
        updated_at: r
            .try_get::<Option<i64>, _>("u_updated_at")?
            .unwrap_or(created_at),
    })
}

fn key_from_row(r: &AnyRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        key_hash: r.try_get("key_hash")?,
        scopes: split_scopes(&r.try_get::<String, _>("scopes")?),
        kind: r.try_get("kind")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
        last_used_at: r.try_get("last_used_at")?,
    })
}

impl Store {
    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    pub async fn admin_count(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM users WHERE role = 'admin'")
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    pub async fn create_user(&self, user: &User) -> Result<()> {
        let r = sqlx::query(
            "INSERT INTO users (id, name, role, scopes, password_hash, created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7)",
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.role)
        .bind(join_scopes(&user.scopes))
        .bind(user.password_hash.clone())
        .bind(user.created_at)
        .bind(user.updated_at)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("user {:?}", user.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u ORDER BY u.name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_from_row).collect()
    }

    pub async fn find_user(&self, name: &str) -> Result<Option<User>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users u WHERE u.name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Saves role and scopes of an existing user.
    pub async fn update_user(&self, user: &User) -> Result<bool> {
        let r =
            sqlx::query("UPDATE users SET role = $1, scopes = $2, updated_at = $3 WHERE id = $4")
                .bind(&user.role)
                .bind(join_scopes(&user.scopes))
                .bind(now_ms())
                .bind(&user.id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Sets (or, with `None`, removes) a user's password hash.
    pub async fn set_user_password(&self, id: &str, hash: Option<&str>) -> Result<bool> {
        let r = sqlx::query("UPDATE users SET password_hash = $1, updated_at = $2 WHERE id = $3")
            .bind(hash.map(str::to_string))
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a user and its keys.
    pub async fn delete_user(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM api_keys WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, key_hash, scopes, kind, created_at, expires_at, revoked_at, last_used_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
        )
        .bind(&key.id)
        .bind(&key.user_id)
        .bind(&key.name)
        .bind(&key.key_hash)
        .bind(join_scopes(&key.scopes))
        .bind(&key.kind)
        .bind(key.created_at)
        .bind(key.expires_at)
        .bind(key.revoked_at)
        .bind(key.last_used_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The key with this lookup id and its user.
    pub async fn api_key(&self, id: &str) -> Result<Option<(ApiKey, User)>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, {USER_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some((key_from_row(&r)?, user_from_row(&r)?)))
    }

    /// Keys with their owners, oldest first; one user's when `user_id` is set.
    pub async fn list_api_keys(&self, user_id: Option<&str>) -> Result<Vec<(ApiKey, User)>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS}, {USER_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id {} ORDER BY k.created_at, k.id",
            if user_id.is_some() {
                "WHERE k.user_id = $1"
            } else {
                ""
            }
        );
        let mut q = sqlx::query(&sql);
        if let Some(id) = user_id {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((key_from_row(r)?, user_from_row(r)?)))
            .collect()
    }

    /// Revokes a key; false when it does not exist or was already revoked.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn touch_api_key(&self, id: &str, at: i64) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
