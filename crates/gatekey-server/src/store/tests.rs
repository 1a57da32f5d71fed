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

async fn exercise(store: &Store) {
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

    let u = User {
        id: "u1".into(),
        name: "admin".into(),
        role: "admin".into(),
        created_at: now_ms(),
    };
    store.create_user(&u).await.unwrap();
    assert_eq!(store.user_count().await.unwrap(), 1);
    let k = ApiKey {
        id: "k1".into(),
        user_id: "u1".into(),
        name: "bootstrap".into(),
        key_hash: "hash".into(),
        created_at: now_ms(),
        expires_at: None,
        revoked_at: None,
    };
    store.create_api_key(&k).await.unwrap();
    let (key, user) = store.api_key("k1").await.unwrap().unwrap();
    assert_eq!(
        (key.key_hash.as_str(), user.role.as_str()),
        ("hash", "admin")
    );
}

#[tokio::test]
async fn sqlite_store() {
    let dir = std::env::temp_dir().join(format!("gk-store-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    exercise(&store).await;
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
    let store = Store::open(&url).await.unwrap();
    exercise(&store).await;
    drop(store);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}
