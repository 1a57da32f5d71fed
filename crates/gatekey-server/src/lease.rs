//! No session or agent link ends without its closing audit record, even
//! when the control plane holding it is killed.
//!
//! Opening a session (or accepting an agent's link) notes in the database
//! the record that would close it; writing that record drops the note. Each
//! control plane renews a lease every `replica_timeout`/3; the notes of one
//! whose lease ran out (another replica notices) or that was restarted on
//! the same database (it notices itself) are taken and their records
//! written, with reason `control_plane_lost`.

use std::time::Duration;

use crate::state::{AppState, State};
use crate::store::{NewAuditRecord, StoreError, now_ms};

/// The reason in a closing record written for a control plane that died.
pub const REASON_CONTROL_PLANE_LOST: &str = "control_plane_lost";

/// Registers this control plane and starts renewing its lease. Alone on its
/// database (no bus), every earlier control plane is known dead; with a
/// fixed `replica_id`, so is an earlier instance of that replica (the bus
/// said nobody else holds the id).
pub async fn start(state: &AppState) -> Result<(), StoreError> {
    let store = &state.store;
    store
        .instance_started(&state.instance, &state.replica_name(), now_ms())
        .await?;
    match (&state.cluster, &state.config.replica_id) {
        (None, _) => store.predecessors_dead(&state.instance, None).await?,
        (Some(_), Some(id)) => store.predecessors_dead(&state.instance, Some(id)).await?,
        (Some(_), None) => {}
    }
    sweep(state).await?;
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(renew_every(&state));
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = sweep(&state).await {
                tracing::warn!(error = %e, "cannot renew this control plane's lease in the database");
            }
        }
    });
    Ok(())
}

fn renew_every(state: &State) -> Duration {
    state.config.replica_timeout / 3
}

/// At shutdown, once agent links are closed: waits (at most `limit`) for
/// the sessions and links to write their closing records themselves, with
/// their real reasons, before the process ends.
pub async fn settle(state: &State, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        match state.store.owed_by(&state.instance).await {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tracing::warn!(
        "shutting down before every session and agent link wrote its closing record; the next control plane on this database writes them"
    );
}

/// Renews the lease, declares dead the control planes whose lease ran out,
/// and writes the records they owed. Returns how many it wrote.
pub async fn sweep(state: &State) -> Result<usize, StoreError> {
    let store = &state.store;
    let now = now_ms();
    if !store
        .instance_alive(&state.instance, &state.replica_name(), now)
        .await?
    {
        tracing::error!(
            "this control plane's lease in the database ran out (not renewed for replica_timeout): \
             another replica may have written closing records for sessions still running here"
        );
    }
    let cutoff = now - state.config.replica_timeout.as_millis() as i64;
    for dead in store.expire_instances(&state.instance, cutoff).await? {
        tracing::warn!(
            replica = %dead.replica_id, instance = %dead.instance,
            "a control plane stopped renewing its lease: writing the closing records it owed"
        );
    }
    store.drop_orphaned_claims().await?;
    let owed = store.take_orphaned_closes().await?;
    let mut written = 0;
    for (i, o) in owed.iter().enumerate() {
        if let Some(id) = &o.record.session_id
            && o.record.action == "session.closed"
            && store.session_closed(id).await?
        {
            continue;
        }
        let mut record = o.record.clone();
        record.detail["recorded_by"] = state.replica_name().into();
        if let Err(e) = store.append_audit(&record).await {
            // Put back what is not written, for the next sweep.
            for rest in &owed[i..] {
                let _ = store
                    .owe_close(&rest.key, &rest.instance, &rest.record)
                    .await;
            }
            return Err(e);
        }
        written += 1;
    }
    Ok(written)
}

/// For a `session.opened` record: its note's key and the record that closes
/// the session if its control plane dies.
pub fn closing_of_session(opened: &NewAuditRecord) -> Option<(String, NewAuditRecord)> {
    if opened.action != "session.opened" {
        return None;
    }
    let id = opened.session_id.as_ref()?;
    let closing = NewAuditRecord {
        action: "session.closed".into(),
        outcome: "failed",
        detail: serde_json::json!({
            "kind": opened.detail["kind"],
            "command": opened.detail["command"],
            "reason": REASON_CONTROL_PLANE_LOST,
            "message": "the control plane running this session stopped (killed, crashed or its host lost) before the session ended",
        }),
        ..opened.clone()
    };
    Some((session_key(id), closing))
}

pub fn session_key(id: &str) -> String {
    format!("session:{id}")
}

impl State {
    /// This control plane's name in the lease table and in records.
    pub fn replica_name(&self) -> String {
        match &self.cluster {
            Some(c) => c.replica.clone(),
            None => "local".into(),
        }
    }
}
