//! No session or agent link ends without its closing audit record, even
//! when the control plane holding it is killed.
//!
//! Opening a session (or accepting an agent's link) notes in the database
//! the record that would close it; writing that record drops the note. Each
//! control plane renews a lease every `replica_timeout`/3; the notes of one
//! whose lease ran out (another replica notices) or that was restarted on
//! the same database (it notices itself) are taken and their records
//! written, with reason `control_plane_lost`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::state::{AppState, State};
use crate::store::{NewAuditRecord, Note, StoreError, now_ms};

/// The reason in a closing record written for a control plane that died.
pub const REASON_CONTROL_PLANE_LOST: &str = "control_plane_lost";

/// Registers this control plane and starts renewing its lease. Alone on an
/// SQLite database, every earlier control plane is known dead; with a fixed
/// `replica_id`, so is an earlier instance of that replica (the bus said
/// nobody else holds the id). Otherwise earlier ones are dead once their
/// lease has run out.
pub async fn start(state: &AppState) -> Result<(), StoreError> {
    let store = &state.store;
    let started = store.clock_ms().await?;
    store
        .instance_started(&state.instance, &state.replica_name(), started)
        .await?;
    match (&state.cluster, &state.config.replica_id) {
        (None, _) if store.is_sqlite() => store.predecessors_dead(&state.instance, None).await?,
        (Some(_), Some(id)) => store.predecessors_dead(&state.instance, Some(id)).await?,
        _ => {}
    }
    sweep(state, true).await?;
    let state = state.clone();
    tokio::spawn(async move {
        let every = renew_every(&state);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        let mut renewed = std::time::Instant::now();
        let mut warned = std::collections::HashSet::new();
        loop {
            tick.tick().await;
            if state.stopping.load(Ordering::Relaxed) {
                return;
            }
            // After an outage of our own (the database unreachable), the
            // others were probably cut off too: give them a period to
            // renew before taking any of them for dead.
            let fresh = renewed.elapsed() <= every * 2;
            match sweep(&state, fresh).await {
                Ok(_) => renewed = std::time::Instant::now(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew this control plane's lease in the database")
                }
            }
            if let Err(e) = check_peers(&state, started, &mut warned).await {
                tracing::debug!(error = %e, "cannot list the other control planes");
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
/// their real reasons; then leaves the lease table, so that nobody takes
/// this control plane for dead.
pub async fn settle(state: &State, limit: Duration) {
    state.stopping.store(true, Ordering::Relaxed);
    let store = &state.store;
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        match store.owed_by(&state.instance).await {
            Ok(0) => {
                let left = async {
                    store.release_claims_of(&state.instance).await?;
                    store.instance_stopped(&state.instance).await
                };
                if let Err(e) = left.await {
                    tracing::warn!(error = %e, "cannot leave the lease table; this control plane's lease runs out instead");
                }
                return;
            }
            Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tracing::warn!(
        "shutting down before every session and agent link wrote its closing record; they are written once this control plane's lease runs out"
    );
}

/// Renews the lease, checks the agent links this control plane holds
/// against their claims, and (when `may_expire`) declares dead the control
/// planes whose lease ran out and writes the records they owed. Returns how
/// many it wrote.
pub async fn sweep(state: &State, may_expire: bool) -> Result<usize, StoreError> {
    let store = &state.store;
    let now = store.clock_ms().await?;
    if !store
        .instance_alive(&state.instance, &state.replica_name(), now)
        .await?
    {
        // Others took us for dead and wrote our sessions and links closed:
        // make it so, and let the agents reconnect to a sound replica.
        tracing::error!(
            "this control plane's lease in the database ran out (not renewed for replica_timeout) and others wrote its sessions closed: closing its agent links"
        );
        for conn in state.registry.list() {
            conn.mux.close(
                crate::agent_link::close::GOING_AWAY,
                "the control plane lost its lease in the database",
            );
        }
    }
    if state.cluster.is_some() {
        check_claims(state, now).await?;
    }
    if !may_expire {
        return Ok(0);
    }
    let cutoff = now - state.config.replica_timeout.as_millis() as i64;
    for dead in store.expire_instances(&state.instance, cutoff).await? {
        tracing::warn!(
            replica = %dead.replica_id, instance = %dead.instance,
            "a control plane stopped renewing its lease: writing the closing records it owed"
        );
    }
    store.drop_orphaned_claims().await?;
    let owed = store.orphaned_closes().await?;
    let mut written = 0;
    for o in &owed {
        if let Some(id) = &o.record.session_id
            && o.record.action == "session.closed"
            && store.session_closed(id).await?
        {
            store.drop_note(&o.key).await?;
            continue;
        }
        let mut record = o.record.clone();
        record.detail["recorded_by"] = state.replica_name().into();
        let take = Note::Take { key: &o.key };
        if store
            .append_audit_noting(&record, Some(&take))
            .await?
            .is_some()
        {
            written += 1;
        }
    }
    Ok(written)
}

/// Every link held here must hold its node's claim: a missing claim (lost
/// with a lapsed lease, or released by a losing duplicate) is made again,
/// and a link whose claim another replica took over is closed, so at most
/// one link per node outlives a race.
async fn check_claims(state: &State, now: i64) -> Result<(), StoreError> {
    let store = &state.store;
    // Links younger than this may be between claiming and registering.
    let settled = now_ms() - 1_000;
    let held: std::collections::HashMap<String, String> = store
        .claims_of(&state.instance)
        .await?
        .into_iter()
        .collect();
    for conn in state.registry.list() {
        let link = link_id(&state.instance, conn.conn_id);
        if conn.connected_at > settled || held.get(&conn.node_id) == Some(&link) {
            continue;
        }
        match store
            .claim_agent(&conn.node_id, &state.instance, &link, now)
            .await?
        {
            None => {
                tracing::info!(agent = %conn.name, "claimed again the link of an agent held here")
            }
            Some(holder) if holder.link == link => {}
            Some(holder) => {
                tracing::warn!(agent = %conn.name, holder = %holder.link, "another replica took over this agent's link: closing it here");
                conn.mux.close(
                    crate::agent_link::close::DUPLICATE,
                    "replaced by a new connection through another control-plane replica",
                );
            }
        }
    }
    Ok(())
}

/// Warns (once for each) about control planes that run on this database
/// but cannot reach this one: one started without `bus_url`, or one not
/// heard on the bus (another `bus_url`, or a broker that does not reach
/// it). Their agents are out of reach from here, and ours from there.
async fn check_peers(
    state: &State,
    started: i64,
    warned: &mut std::collections::HashSet<String>,
) -> Result<(), StoreError> {
    let store = &state.store;
    let now = store.clock_ms().await?;
    let grace = state.config.replica_timeout.as_millis() as i64;
    if now - started < grace {
        return Ok(());
    }
    // Renewed since we started: alive (not a predecessor yet to expire).
    for (replica, their_start) in store
        .instances_renewed_after(&state.instance, started)
        .await?
    {
        if now - their_start < grace || warned.contains(&replica) {
            continue;
        }
        match &state.cluster {
            None => tracing::warn!(
                %replica,
                "another control plane runs on this database, but this one has no bus_url: neither can reach the other's agents; give every control plane on one database the same bus_url"
            ),
            Some(c) if !c.heard(&replica) && replica != c.replica => tracing::warn!(
                %replica,
                "a replica renews its lease in this database but is not heard on the message bus: check that every replica has the same bus_url, and that the broker reaches it; until then neither reaches the other's agents"
            ),
            Some(_) => continue,
        }
        warned.insert(replica);
    }
    Ok(())
}

/// The id of an agent link in claims and notes.
pub fn link_id(instance: &str, conn_id: u64) -> String {
    format!("{instance}:{conn_id}")
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
