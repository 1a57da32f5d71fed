//! The audit log: append-only and hash-chained.
//!
//! Record `seq` holds `prev_hash`, the hash of record `seq - 1` (or of the
//! retention anchor, or 64 zeros for the first record), and its own `hash`:
//! SHA-256 of `prev_hash`, a newline, and the canonical JSON array
//! `[seq, at, action, outcome, user, remote_addr, agent, session_id, detail]`
//! (absent values as null, `detail` as its stored JSON text). Editing a
//! record breaks its hash; removing or reordering records breaks the
//! sequence or the link to the previous hash.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError, is_unique_violation, now_ms};

/// Another replica appended this seq first (not some other unique key,
/// such as a note's, which no retry would cure).
fn is_seq_conflict(e: &sqlx::Error) -> bool {
    is_unique_violation(e)
        && e.as_database_error().is_some_and(|d| {
            d.constraint() == Some("audit_log_pkey") || d.message().contains("audit_log.seq")
        })
}

/// `prev_hash` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a caller records.
#[derive(Clone, Debug, Default)]
pub struct NewAuditRecord {
    pub action: String,
    /// `ok`, `denied` or `failed`.
    pub outcome: &'static str,
    pub user: Option<String>,
    pub remote_addr: Option<String>,
    pub agent: Option<String>,
    pub session_id: Option<String>,
    pub detail: serde_json::Value,
}

/// A stored record.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    pub seq: i64,
    #[serde(skip)]
    pub at: i64,
    pub time: String,
    pub action: String,
    pub outcome: String,
    pub user: Option<String>,
    pub remote_addr: Option<String>,
    pub agent: Option<String>,
    pub session_id: Option<String>,
    #[serde(serialize_with = "raw_json")]
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

fn raw_json<S: serde::Serializer>(text: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
    v.serialize(s)
}

/// Which records to list or export.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// `session` matches `session` and `session.*`.
    pub action: Option<String>,
    pub agent: Option<String>,
    pub user: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only records with a smaller seq (paging back).
    pub before_seq: Option<i64>,
    /// Only records with a larger seq (paging forward).
    pub after_seq: Option<i64>,
}

/// The result of checking the whole chain.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    pub ok: bool,
    pub records: i64,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    pub head_hash: String,
    pub anchor: Option<Anchor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Where the chain starts after retention removed older records.
#[derive(Clone, Debug, Serialize)]
pub struct Anchor {
    pub seq: i64,
    pub hash: String,
}

const COLUMNS: &str =
    "seq, at, action, outcome, user_name, remote_addr, agent, session_id, detail, prev_hash, hash";

/// The hash a record must have.
pub fn record_hash(prev_hash: &str, r: &AuditRecord) -> String {
    let canonical = serde_json::json!([
        r.seq,
        r.at,
        r.action,
        r.outcome,
        r.user,
        r.remote_addr,
        r.agent,
        r.session_id,
        r.detail
    ]);
    let mut data = Vec::with_capacity(prev_hash.len() + 256);
    data.extend_from_slice(prev_hash.as_bytes());
    data.push(b'\n');
    data.extend_from_slice(canonical.to_string().as_bytes());
    crate::secret::sha256_hex(&data)
}

fn record_from_row(r: &AnyRow) -> Result<AuditRecord> {
    let at: i64 = r.try_get("at")?;
    Ok(AuditRecord {
        seq: r.try_get("seq")?,
        at,
        time: format_time_ms(at),
        action: r.try_get("action")?,
        outcome: r.try_get("outcome")?,
        user: r.try_get("user_name")?,
        remote_addr: r.try_get("remote_addr")?,
        agent: r.try_get("agent")?,
        session_id: r.try_get("session_id")?,
        detail: r.try_get("detail")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_record<'q>(q: AnyQuery<'q>, rec: &'q AuditRecord) -> AnyQuery<'q> {
    q.bind(rec.seq)
        .bind(rec.at)
        .bind(&rec.action)
        .bind(&rec.outcome)
        .bind(rec.user.as_deref())
        .bind(rec.remote_addr.as_deref())
        .bind(rec.agent.as_deref())
        .bind(rec.session_id.as_deref())
        .bind(&rec.detail)
        .bind(&rec.prev_hash)
        .bind(&rec.hash)
}

/// A change to the closing records owed, made with an audit record.
pub enum Note<'a> {
    /// This record opens something: note the record that closes it.
    Owe {
        key: &'a str,
        instance: &'a str,
        closing: &'a NewAuditRecord,
    },
    /// This record closes `key`: drop its note.
    Paid { key: &'a str },
    /// This is the record noted under `key`, written for a control plane
    /// that died: only by whoever takes the note.
    Take { key: &'a str },
}

impl Note<'_> {
    /// The note's statement, its parameters numbered from `first`.
    pub(super) fn sql(&self, first: usize) -> String {
        let p = |i: usize| format!("${}", first + i);
        match self {
            Note::Owe { .. } => format!(
                "INSERT INTO owed_closes (close_key, instance, opened_at, action, outcome, \
                 user_name, remote_addr, agent, session_id, detail) \
                 VALUES ({},{},{},{},{},{},{},{},{},{})",
                p(0),
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
                p(6),
                p(7),
                p(8),
                p(9)
            ),
            Note::Paid { .. } | Note::Take { .. } => {
                format!("DELETE FROM owed_closes WHERE close_key = {}", p(0))
            }
        }
    }

    pub(super) fn bind<'q>(&'q self, q: AnyQuery<'q>, at: i64) -> AnyQuery<'q> {
        match self {
            Note::Owe {
                key,
                instance,
                closing,
            } => q
                .bind(*key)
                .bind(*instance)
                .bind(at)
                .bind(closing.action.as_str())
                .bind(closing.outcome)
                .bind(closing.user.as_deref())
                .bind(closing.remote_addr.as_deref())
                .bind(closing.agent.as_deref())
                .bind(closing.session_id.as_deref())
                .bind(closing.detail.to_string()),
            Note::Paid { key } | Note::Take { key } => q.bind(*key),
        }
    }
}

/// RFC 3339 UTC with milliseconds.
fn format_time_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

impl Store {
    /// Appends a record and commits it before returning.
    ///
    /// The chain's head (last seq and hash) is kept in memory under the
    /// append lock, so an append is one INSERT. Another replica may have
    /// appended since: the primary key on seq refuses ours, and we re-read
    /// the head from the database and try again.
    pub async fn append_audit(&self, new: &NewAuditRecord) -> Result<AuditRecord> {
        self.append_audit_noting(new, None)
            .await?
            .ok_or_else(|| StoreError::Conflict("audit record".into()))
    }

    /// Appends a record and, in the same transaction, notes or drops a
    /// closing record owed (store/owed.rs): one round trip on PostgreSQL.
    /// None: the note was [`Note::Take`] and another control plane took it
    /// first, so nothing was written.
    pub async fn append_audit_noting(
        &self,
        new: &NewAuditRecord,
        note: Option<&Note<'_>>,
    ) -> Result<Option<AuditRecord>> {
        let mut head = self.audit_head.lock().await;
        let detail = if new.detail.is_null() {
            "{}".to_string()
        } else {
            new.detail.to_string()
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (last_seq, prev_hash) = match head.clone() {
                Some(h) => h,
                None => self.read_audit_head().await?,
            };
            let mut rec = AuditRecord {
                seq: last_seq + 1,
                at: now_ms(),
                time: String::new(),
                action: new.action.clone(),
                outcome: new.outcome.to_string(),
                user: new.user.clone(),
                remote_addr: new.remote_addr.clone(),
                agent: new.agent.clone(),
                session_id: new.session_id.clone(),
                detail: detail.clone(),
                prev_hash: prev_hash.clone(),
                hash: String::new(),
            };
            rec.hash = record_hash(&prev_hash, &rec);
            rec.time = format_time_ms(rec.at);
            let inserted = self.insert_audit(&rec, note).await;
            match inserted {
                Ok(true) => {
                    *head = Some((rec.seq, rec.hash.clone()));
                    return Ok(Some(rec));
                }
                Ok(false) => return Ok(None),
                Err(e) if is_seq_conflict(&e) && attempt < 50 => {
                    *head = None;
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    *head = None;
                    return Err(e.into());
                }
            }
        }
    }

    /// One INSERT, or with a note: on PostgreSQL one statement (the note as
    /// a data-modifying CTE), on SQLite one local transaction. False: a
    /// [`Note::Take`] found its note gone, and no record was written.
    async fn insert_audit(
        &self,
        rec: &AuditRecord,
        note: Option<&Note<'_>>,
    ) -> std::result::Result<bool, sqlx::Error> {
        let insert = format!("INSERT INTO audit_log ({COLUMNS})");
        let values = "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)";
        let Some(note) = note else {
            bind_record(sqlx::query(&format!("{insert} {values}")), rec)
                .execute(&self.pool)
                .await?;
            return Ok(true);
        };
        if self.sqlite {
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let note_sql = note.sql(1);
            let changed = note
                .bind(sqlx::query(&note_sql), rec.at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if matches!(note, Note::Take { .. }) && changed == 0 {
                return Ok(false);
            }
            bind_record(sqlx::query(&format!("{insert} {values}")), rec)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(true);
        }
        let sql = match note {
            // Written only if this statement is the one that took the note.
            Note::Take { .. } => format!(
                "WITH note AS ({} RETURNING 1) {insert} \
                 SELECT $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11 WHERE EXISTS (SELECT 1 FROM note)",
                note.sql(12)
            ),
            _ => format!("WITH note AS ({}) {insert} {values}", note.sql(12)),
        };
        let written = note
            .bind(bind_record(sqlx::query(&sql), rec), rec.at)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(written == 1)
    }

    /// The last record's seq and hash, else the anchor's, else genesis.
    async fn read_audit_head(&self) -> Result<(i64, String)> {
        let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        if let Some(r) = last {
            return Ok((r.try_get("seq")?, r.try_get("hash")?));
        }
        let mut conn = self.pool.acquire().await?;
        Ok(match anchor(&mut conn).await? {
            Some(a) => (a.seq, a.hash),
            None => (0, GENESIS.to_string()),
        })
    }

    /// Records matching `filter`: newest first (`oldest_first` false) or
    /// oldest first, at most `limit`.
    pub async fn list_audit(
        &self,
        filter: &AuditFilter,
        limit: i64,
        oldest_first: bool,
    ) -> Result<Vec<AuditRecord>> {
        let mut clauses: Vec<String> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut nums: Vec<i64> = Vec::new();
        // Placeholders are numbered in bind order: texts first, then numbers.
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if let Some(a) = &filter.action {
            let p1 = next();
            let p2 = next();
            clauses.push(format!("(action = {p1} OR action LIKE {p2})"));
            texts.push(a.clone());
            texts.push(format!("{}.%", a.replace(['%', '_'], "")));
        }
        if let Some(a) = &filter.agent {
            clauses.push(format!("agent = {}", next()));
            texts.push(a.clone());
        }
        if let Some(u) = &filter.user {
            clauses.push(format!("user_name = {}", next()));
            texts.push(u.clone());
        }
        for (value, op, column) in [
            (filter.since_ms, ">=", "at"),
            (filter.until_ms, "<", "at"),
            (filter.before_seq, "<", "seq"),
            (filter.after_seq, ">", "seq"),
        ] {
            if let Some(v) = value {
                clauses.push(format!("{column} {op} {}", next()));
                nums.push(v);
            }
        }
        let limit_param = next();
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_log {} ORDER BY seq {} LIMIT {limit_param}",
            if clauses.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", clauses.join(" AND "))
            },
            if oldest_first { "ASC" } else { "DESC" }
        );
        let mut q = sqlx::query(&sql);
        for t in texts {
            q = q.bind(t);
        }
        for v in nums {
            q = q.bind(v);
        }
        q = q.bind(limit);
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(record_from_row).collect()
    }

    /// Checks the whole chain, a page at a time; names the first bad record.
    pub async fn verify_audit(&self) -> Result<Verification> {
        let mut conn = self.pool.acquire().await?;
        let anchor = anchor(&mut conn).await?;
        drop(conn);
        let (mut expected_seq, mut prev) = match &anchor {
            Some(a) => (a.seq + 1, a.hash.clone()),
            None => (1, GENESIS.to_string()),
        };
        let mut v = Verification {
            ok: true,
            records: 0,
            first_seq: None,
            last_seq: None,
            head_hash: prev.clone(),
            anchor,
            first_bad_seq: None,
            problem: None,
        };
        let mut after = i64::MIN;
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000"
            ))
            .bind(after)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let r = record_from_row(row)?;
                after = r.seq;
                let problem = if r.seq > expected_seq {
                    Some((
                        expected_seq,
                        if expected_seq + 1 == r.seq {
                            format!("record {expected_seq} was removed")
                        } else {
                            format!("records {expected_seq}–{} were removed", r.seq - 1)
                        },
                    ))
                } else if r.seq < expected_seq {
                    Some((
                        r.seq,
                        format!("record {} is before the start of the chain", r.seq),
                    ))
                } else if record_hash(&r.prev_hash, &r) != r.hash {
                    Some((
                        r.seq,
                        format!("record {} was changed after it was written", r.seq),
                    ))
                } else if r.prev_hash != prev {
                    Some((
                        r.seq,
                        format!(
                            "record {} does not follow record {}: records were removed or reordered",
                            r.seq,
                            r.seq - 1
                        ),
                    ))
                } else {
                    None
                };
                if let Some((seq, text)) = problem {
                    v.ok = false;
                    v.first_bad_seq = Some(seq);
                    v.problem = Some(text);
                    return Ok(v);
                }
                v.records += 1;
                v.first_seq.get_or_insert(r.seq);
                v.last_seq = Some(r.seq);
                prev = r.hash.clone();
                v.head_hash = r.hash;
                expected_seq += 1;
            }
        }
        Ok(v)
    }

    /// Removes records older than `cutoff_ms`, keeping the last removed
    /// record's seq and hash as the anchor the rest verifies from. Returns
    /// how many were removed.
    pub async fn prune_audit(&self, cutoff_ms: i64) -> Result<u64> {
        // Appends wait; the head they cached stays valid (the last pruned
        // record becomes the anchor, and the newest record is never pruned
        // without its successors).
        let _serial = self.audit_head.lock().await;
        let mut tx = self.begin_write().await?;
        let last_old =
            sqlx::query("SELECT seq, hash FROM audit_log WHERE at < $1 ORDER BY seq DESC LIMIT 1")
                .bind(cutoff_ms)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(last_old) = last_old else {
            return Ok(0);
        };
        let seq: i64 = last_old.try_get("seq")?;
        let hash: String = last_old.try_get("hash")?;
        sqlx::query("DELETE FROM audit_anchor WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO audit_anchor (id, seq, hash, at) VALUES (1, $1, $2, $3)")
            .bind(seq)
            .bind(&hash)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM audit_log WHERE seq <= $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }
}

async fn anchor(conn: &mut sqlx::AnyConnection) -> Result<Option<Anchor>> {
    let row = sqlx::query("SELECT seq, hash FROM audit_anchor WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| {
        Ok(Anchor {
            seq: r.try_get("seq")?,
            hash: r.try_get("hash")?,
        })
    })
    .transpose()
    .map_err(|e: sqlx::Error| StoreError::Db(e))
}
