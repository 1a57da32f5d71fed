//! The store's behaviour, on SQLite always and on PostgreSQL when
//! GATEKEY_TEST_POSTGRES_URL (or the machine's local server) is reachable.

use super::*;

fn node(name: &str, lookup: &str) -> Node {
    Node {
        id: format!("id-{name}"),
        name: name.into(),
        node_type: NodeType::Hub,
        token_lookup: lookup.into(),
        token_hash: "h".into(),
        session_enabled: true,
        created_at: now_ms(),
        updated_at: now_ms(),
        last_seen_at: None,
        last_addr: None,
        agent_version: None,
        hostname: None,
        agent_session_enabled: None,
    }
}

async fn exercise(store: &Store, url: &str) {
    store.create_node(&node("hub-1", "l1")).await.unwrap();
    assert!(matches!(
        store.create_node(&node("hub-1", "l2")).await,
        Err(StoreError::Conflict(_))
    ));
    let by_name = store.find_node("hub-1").await.unwrap().unwrap();
    let by_id = store.find_node("id-hub-1").await.unwrap().unwrap();
    assert_eq!(by_name.id, by_id.id);
    assert!(store.find_node("nope").await.unwrap().is_none());
    assert_eq!(
        store
            .node_by_token_lookup("l1")
            .await
            .unwrap()
            .unwrap()
            .name,
        "hub-1"
    );
    assert!(store.set_node_session(&by_id.id, false).await.unwrap());
    assert!(
        !store
            .find_node("hub-1")
            .await
            .unwrap()
            .unwrap()
            .session_enabled
    );
    store
        .node_seen(
            &by_id.id,
            &AgentSeen {
                addr: "127.0.0.1:1",
                version: "1",
                hostname: "h",
                session_enabled: true,
            },
        )
        .await
        .unwrap();
    let n = store.find_node("hub-1").await.unwrap().unwrap();
    assert_eq!(n.agent_session_enabled, Some(true));
    assert!(n.last_seen_at.is_some());
    assert_eq!(
        store.list_nodes(Some(NodeType::Hub)).await.unwrap().len(),
        1
    );
    assert_eq!(
        store.list_nodes(Some(NodeType::Spoke)).await.unwrap().len(),
        0
    );
    assert!(store.delete_node(&by_id.id).await.unwrap());
    assert!(store.find_node("hub-1").await.unwrap().is_none());

    let mut u = User {
        id: "u1".into(),
        name: "admin".into(),
        role: "admin".into(),
        scopes: vec![],
        password_hash: None,
        created_at: now_ms(),
        updated_at: now_ms(),
    };
    store.create_user(&u).await.unwrap();
    assert!(matches!(
        store.create_user(&u).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.user_count().await.unwrap(), 1);
    let k = ApiKey {
        id: "k1".into(),
        user_id: "u1".into(),
        name: "bootstrap".into(),
        key_hash: "hash".into(),
        scopes: vec!["spoke:dc-*".into()],
        kind: "api".into(),
        created_at: now_ms(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    };
    store.create_api_key(&k).await.unwrap();
    let (key, user) = store.api_key("k1").await.unwrap().unwrap();
    assert_eq!(
        (key.key_hash.as_str(), user.role.as_str()),
        ("hash", "admin")
    );
    assert_eq!(key.scopes, vec!["spoke:dc-*"]);
    u.role = "operator".into();
    u.scopes = vec!["hub:*".into(), "spoke:dc-*".into()];
    u.password_hash = Some("$argon2id$x".into());
    assert!(store.update_user(&u).await.unwrap());
    assert!(
        store
            .set_user_password("u1", Some("$argon2id$x"))
            .await
            .unwrap()
    );
    let back = store.find_user("admin").await.unwrap().unwrap();
    assert_eq!(back.scopes, u.scopes);
    assert_eq!(back.password_hash.as_deref(), Some("$argon2id$x"));
    assert_eq!(store.admin_count().await.unwrap(), 0);
    store.touch_api_key("k1", 5).await.unwrap();
    assert!(store.revoke_api_key("k1").await.unwrap());
    assert!(!store.revoke_api_key("k1").await.unwrap());
    let keys = store.list_api_keys(Some("u1")).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].0.revoked_at.is_some());
    assert_eq!(keys[0].0.last_used_at, Some(5));
    assert!(store.delete_user("u1").await.unwrap());
    assert!(store.api_key("k1").await.unwrap().is_none());

    audit_chain(store, url).await;
    owed_closes(store).await;
    link_claims(store).await;
    installation_id(store).await;
}

/// One installation id, whoever asks first and however many ask at once.
async fn installation_id(store: &Store) {
    let ids = futures_util::future::join_all((0..4).map(|_| store.installation_id())).await;
    let first = ids[0].as_ref().unwrap().clone();
    assert_eq!(first.len(), 16, "{first}");
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    for id in ids {
        assert_eq!(id.unwrap(), first);
    }
    assert_eq!(store.installation_id().await.unwrap(), first);
}

/// One claim per node: atomic, taken over only from the link that holds it.
async fn link_claims(store: &Store) {
    let now = now_ms();
    // Two replicas claiming at the same moment: one wins, the other learns who.
    let (a, b) = tokio::join!(
        store.claim_agent("n1", "ia", "ia:1", now),
        store.claim_agent("n1", "ib", "ib:1", now)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.is_none() ^ b.is_none(), "{a:?} {b:?}");
    let (winner, loser) = if a.is_none() {
        ("ia:1", "ib:1")
    } else {
        ("ib:1", "ia:1")
    };
    assert_eq!(a.or(b).unwrap().link, winner);
    // A takeover from a link that no longer holds it fails.
    assert!(
        !store
            .take_agent_claim("n1", loser, "ic", "ic:1", now)
            .await
            .unwrap()
    );
    assert!(
        store
            .take_agent_claim("n1", winner, "ic", "ic:1", now)
            .await
            .unwrap()
    );
    // The old holder's late release leaves the new claim alone.
    store.release_agent("n1", winner).await.unwrap();
    let held = store
        .claim_agent("n1", "id", "id:1", now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((held.link.as_str(), held.instance.as_str()), ("ic:1", "ic"));
    store.release_agent("n1", "ic:1").await.unwrap();
    assert!(
        store
            .claim_agent("n1", "id", "id:1", now)
            .await
            .unwrap()
            .is_none()
    );
    // Claims of control planes no longer registered are dropped.
    store.instance_started("id", "r9", now).await.unwrap();
    store
        .claim_agent("n2", "gone", "gone:1", now)
        .await
        .unwrap();
    assert_eq!(store.drop_orphaned_claims().await.unwrap(), 1);
    assert!(
        store
            .claim_agent("n1", "ie", "ie:1", now)
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.instance_live("id", now - 1).await.unwrap());
    assert!(!store.instance_live("id", now + 1).await.unwrap());
    assert!(!store.instance_live("gone", 0).await.unwrap());
    // What one instance holds, and all of it released when it stops.
    store.claim_agent("n3", "id", "id:3", now).await.unwrap();
    let mut held = store.claims_of("id").await.unwrap();
    held.sort();
    assert_eq!(
        held,
        [
            ("n1".to_string(), "id:1".to_string()),
            ("n3".into(), "id:3".into())
        ]
    );
    store.release_claims_of("id").await.unwrap();
    assert!(store.claims_of("id").await.unwrap().is_empty());
    // Leases are judged by one clock (the database's on PostgreSQL).
    let clock = store.clock_ms().await.unwrap();
    assert!((clock - now_ms()).abs() < 60_000, "{clock}");
}

/// Closing records owed by control planes: taken once, and only those of
/// instances no longer registered.
async fn owed_closes(store: &Store) {
    let closing = |id: &str| NewAuditRecord {
        action: "session.closed".into(),
        outcome: "failed",
        user: Some("alice".into()),
        remote_addr: Some("127.0.0.1:9".into()),
        agent: Some("hub-1".into()),
        session_id: Some(id.into()),
        detail: serde_json::json!({"reason": "control_plane_lost", "command": "sleep 9"}),
    };
    let now = now_ms();
    store.instance_started("dead", "r1", 1_000).await.unwrap();
    store.instance_started("live", "r2", now).await.unwrap();
    for (key, instance) in [
        ("session:a", "dead"),
        ("session:b", "dead"),
        ("session:c", "live"),
    ] {
        // Noted with the opening record, in one transaction (one statement
        // on PostgreSQL).
        let id = key.trim_start_matches("session:");
        let opened = NewAuditRecord {
            action: "session.opened".into(),
            ..closing(id)
        };
        let note = Note::Owe {
            key,
            instance,
            closing: &closing(id),
        };
        store
            .append_audit_noting(&opened, Some(&note))
            .await
            .unwrap();
    }
    // Both still registered: nothing to take.
    assert!(store.orphaned_closes().await.unwrap().is_empty());
    // Dropped with the closing record.
    let paid = Note::Paid { key: "session:b" };
    store
        .append_audit_noting(&closing("b"), Some(&paid))
        .await
        .unwrap();
    // A note that would duplicate one is refused with its record: neither is
    // written.
    let before = audit_rows(store).await;
    let twice = Note::Owe {
        key: "session:c",
        instance: "live",
        closing: &closing("c"),
    };
    assert!(
        store
            .append_audit_noting(&closing("c2"), Some(&twice))
            .await
            .is_err()
    );
    assert_eq!(audit_rows(store).await, before);
    // The silent one expires once, and never the one asking.
    let dead = store.expire_instances("live", now - 10_000).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].instance.as_str(), dead[0].replica_id.as_str()),
        ("dead", "r1")
    );
    assert!(
        store
            .expire_instances("live", now - 10_000)
            .await
            .unwrap()
            .is_empty()
    );
    let taken = store.orphaned_closes().await.unwrap();
    assert_eq!(taken.len(), 1, "{taken:?}");
    let t = &taken[0];
    assert_eq!((t.key.as_str(), t.instance.as_str()), ("session:a", "dead"));
    let r = &t.record;
    assert_eq!((r.action.as_str(), r.outcome), ("session.closed", "failed"));
    assert_eq!(r.user.as_deref(), Some("alice"));
    assert_eq!(r.remote_addr.as_deref(), Some("127.0.0.1:9"));
    assert_eq!(r.agent.as_deref(), Some("hub-1"));
    assert_eq!(r.session_id.as_deref(), Some("a"));
    assert_eq!(r.detail["command"], "sleep 9");
    // Written by the one that takes the note, and by nobody after it.
    let take = Note::Take { key: "session:a" };
    let first = store.append_audit_noting(r, Some(&take)).await.unwrap();
    assert_eq!(first.unwrap().session_id.as_deref(), Some("a"));
    let records = audit_rows(store).await;
    assert!(
        store
            .append_audit_noting(r, Some(&take))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(audit_rows(store).await, records);
    assert!(store.orphaned_closes().await.unwrap().is_empty());
    // The chain goes on from the record written, not the one skipped.
    store.append_audit(&closing("after")).await.unwrap();

    // Takers at the same moment write each record once.
    for i in 0..20 {
        let key = format!("session:g{i}");
        store.owe_close(&key, "gone", &closing(&key)).await.unwrap();
    }
    let notes = store.orphaned_closes().await.unwrap();
    assert_eq!(notes.len(), 20);
    let before = audit_rows(store).await;
    let other = store.clone();
    let take_all = |store: Store, notes: Vec<OwedClose>| async move {
        let mut n = 0;
        for o in &notes {
            let take = Note::Take { key: &o.key };
            if store
                .append_audit_noting(&o.record, Some(&take))
                .await
                .unwrap()
                .is_some()
            {
                n += 1;
            }
        }
        n
    };
    let (one, two) = tokio::join!(
        take_all(store.clone(), notes.clone()),
        take_all(other, notes)
    );
    assert_eq!(one + two, 20, "{one} + {two}");
    assert_eq!(audit_rows(store).await, before + 20);

    // A lease taken for dead is registered again at the next renewal.
    exec_sql(store, "DELETE FROM control_planes WHERE instance = 'live'").await;
    assert!(!store.instance_alive("live", "r2", now).await.unwrap());
    assert!(store.instance_alive("live", "r2", now).await.unwrap());
    // A restarted replica declares its predecessor with the same id dead.
    store.instance_started("old-r2", "r2", now).await.unwrap();
    store.instance_started("r3", "r3", now).await.unwrap();
    store.predecessors_dead("live", Some("r2")).await.unwrap();
    let dead = store.expire_instances("live", now - 10_000).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| d.instance.as_str()).collect::<Vec<_>>(),
        ["old-r2"]
    );
    // Alone on its database, every other instance is dead.
    store.predecessors_dead("live", None).await.unwrap();
    let dead = store.expire_instances("live", now - 10_000).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| d.instance.as_str()).collect::<Vec<_>>(),
        ["r3"]
    );
    exec_sql(store, "DELETE FROM control_planes WHERE instance = 'live'").await;

    assert!(!store.session_closed("z").await.unwrap());
    store.append_audit(&closing("z")).await.unwrap();
    assert!(store.session_closed("z").await.unwrap());
}

fn rec(action: &str, user: &str) -> NewAuditRecord {
    NewAuditRecord {
        action: action.into(),
        outcome: "ok",
        user: Some(user.into()),
        agent: Some("hub-1".into()),
        detail: serde_json::json!({"n": action.len()}),
        ..Default::default()
    }
}

async fn audit_rows(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn exec_sql(store: &Store, sql: &str) {
    sqlx::query(sql).execute(store.pool()).await.unwrap();
}

async fn audit_chain(store: &Store, url: &str) {
    for i in 0..6 {
        let action = if i % 2 == 0 {
            "session.opened"
        } else {
            "user.created"
        };
        store
            .append_audit(&rec(action, &format!("u{i}")))
            .await
            .unwrap();
    }
    // Concurrent writers, also through a second store (another replica,
    // whose cached head goes stale), still form one chain.
    let other = Store::open(url).await.unwrap();
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let s = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            tokio::spawn(async move {
                s.append_audit(&rec("session.closed", &format!("w{i}")))
                    .await
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let v = store.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(
        (v.records, v.first_seq, v.last_seq),
        (14, Some(1), Some(14))
    );

    // Filters: `session` covers session.*; newest first; paging.
    let f = AuditFilter {
        action: Some("session".into()),
        ..Default::default()
    };
    let got = store.list_audit(&f, 100, false).await.unwrap();
    assert_eq!(got.len(), 11);
    assert!(got.windows(2).all(|w| w[0].seq > w[1].seq));
    let f = AuditFilter {
        user: Some("u1".into()),
        ..Default::default()
    };
    assert_eq!(store.list_audit(&f, 100, false).await.unwrap().len(), 1);
    let f = AuditFilter {
        before_seq: Some(5),
        ..Default::default()
    };
    let page = store.list_audit(&f, 2, false).await.unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 3]);

    // An edited row.
    exec_sql(
        store,
        "UPDATE audit_log SET user_name = 'mallory' WHERE seq = 3",
    )
    .await;
    let v = store.verify_audit().await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, Some(3));
    assert!(v.problem.as_deref().unwrap().contains("changed"), "{v:?}");
    exec_sql(store, "UPDATE audit_log SET user_name = 'u2' WHERE seq = 3").await;
    assert!(store.verify_audit().await.unwrap().ok);

    // Two rows swapped (their contents exchanged, seq kept).
    let a = store
        .list_audit(
            &AuditFilter {
                after_seq: Some(6),
                ..Default::default()
            },
            2,
            true,
        )
        .await
        .unwrap();
    let (r7, r8) = (&a[0], &a[1]);
    for (seq, r) in [(7i64, r8), (8i64, r7)] {
        sqlx::query(
            "UPDATE audit_log SET user_name = $1, prev_hash = $2, hash = $3 WHERE seq = $4",
        )
        .bind(r.user.clone())
        .bind(&r.prev_hash)
        .bind(&r.hash)
        .bind(seq)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let v = store.verify_audit().await.unwrap();
    assert_eq!(v.first_bad_seq, Some(7), "{v:?}");
    for r in [r7, r8] {
        sqlx::query(
            "UPDATE audit_log SET user_name = $1, prev_hash = $2, hash = $3 WHERE seq = $4",
        )
        .bind(r.user.clone())
        .bind(&r.prev_hash)
        .bind(&r.hash)
        .bind(r.seq)
        .execute(store.pool())
        .await
        .unwrap();
    }
    assert!(store.verify_audit().await.unwrap().ok);

    // A deleted row.
    exec_sql(store, "DELETE FROM audit_log WHERE seq = 10").await;
    let v = store.verify_audit().await.unwrap();
    assert_eq!(v.first_bad_seq, Some(10), "{v:?}");
    assert!(v.problem.as_deref().unwrap().contains("removed"), "{v:?}");
}

#[tokio::test]
async fn retention_keeps_an_anchor() {
    let dir = std::env::temp_dir().join(format!("gk-prune-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    for i in 0..5 {
        store
            .append_audit(&rec("session.opened", &format!("u{i}")))
            .await
            .unwrap();
    }
    exec_sql(&store, "UPDATE audit_log SET at = 1 WHERE seq <= 3").await;
    // Changing `at` broke those rows' hashes; retention removes exactly them.
    assert_eq!(store.prune_audit(1000).await.unwrap(), 3);
    let v = store.verify_audit().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(
        (v.records, v.first_seq, v.anchor.as_ref().map(|a| a.seq)),
        (2, Some(4), Some(3))
    );
    store
        .append_audit(&rec("audit.pruned", "system"))
        .await
        .unwrap();
    assert!(store.verify_audit().await.unwrap().ok);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn sqlite_store() {
    let dir = std::env::temp_dir().join(format!("gk-store-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    exercise(&store, &url).await;
    // Reopening runs no migration twice.
    drop(store);
    Store::open(&url).await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn postgres_store() {
    let base = std::env::var("GATEKEY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    sqlx::any::install_default_drivers();
    let Ok(admin) = sqlx::AnyPool::connect(&base).await else {
        eprintln!("SKIP postgres_store: no PostgreSQL at {base} (set GATEKEY_TEST_POSTGRES_URL)");
        return;
    };
    // A schema of its own, so parallel runs and old tables don't interfere.
    let schema = format!("gk_store_{}_{}", std::process::id(), now_ms());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    // Replicas started together on an empty database all come up.
    let opened = futures_util::future::join_all((0..4).map(|_| Store::open(&url))).await;
    for o in opened {
        o.unwrap();
    }
    // A replica that holds the migration lock and hangs stops another from
    // starting only for migration_lock_timeout, with a message that says so.
    let mut holder = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let lock = migrations::LOCK_KEY;
    sqlx::query(&format!("SELECT pg_advisory_lock({lock})"))
        .execute(&mut holder)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Bounded here too, so a wait that ignores the timeout fails the test
    // instead of hanging it.
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        Store::open_with(&url, std::time::Duration::from_millis(300)),
    )
    .await
    .expect("the migration lock wait ignored migration_lock_timeout");
    let Err(StoreError::Migration(why)) = refused else {
        panic!("opened while another replica held the migration lock");
    };
    assert!(why.contains("migration_lock_timeout"), "{why}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    sqlx::query(&format!("SELECT pg_advisory_unlock({lock})"))
        .execute(&mut holder)
        .await
        .unwrap();
    let store = Store::open(&url).await.unwrap();
    exercise(&store, &url).await;
    drop(store);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}
