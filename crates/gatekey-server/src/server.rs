//! The listener: TLS, HTTP/1.1 with upgrades, a cap on connections, and an
//! orderly shutdown that tells every agent to reconnect later.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use gatekey_proto::readahead::ReadAhead;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::agent_link::close;
use crate::config::Config;
use crate::registry::Registry;
use crate::state::{AppState, State};
use crate::store::{ApiKey, Store, User, now_ms};
use crate::{Error, api, secret, tls};

/// The client's address, added to every request.
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub SocketAddr);

/// A bound, not yet serving, control plane.
pub struct Server {
    state: AppState,
    listener: TcpListener,
    tls: TlsAcceptor,
    /// The bootstrap admin key, when this start created it.
    pub admin_token: Option<String>,
    /// The self-signed CA clients should trust, when self-signed.
    pub ca_cert: Option<PathBuf>,
}

impl Server {
    /// Prepares storage, TLS and the bootstrap key, and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, Error> {
        config.validate().map_err(Error::Config)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::Config(format!(
                "cannot create data dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let store = Store::open_with(&config.database_url(), config.migration_lock_timeout).await?;
        let admin_token = bootstrap_admin(&store, &config).await?;
        let (tls_config, ca_cert) = tls::server_config(&config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Listen(format!("cannot listen on {}: {e}", config.listen)))?;
        let instance = secret::random_hex(8);
        let cluster = match &config.bus_url {
            Some(url) => {
                let replica = config
                    .replica_id
                    .clone()
                    .unwrap_or_else(|| format!("r_{}", secret::random_hex(6)));
                if config.tls_cert.is_none() {
                    tracing::warn!(
                        "bus_url is set but tls_cert is not: this replica makes its own self-signed certificate, which agents and clients of the other replicas will not trust (see docs/scaling.md)"
                    );
                }
                let installation = store.installation_id().await?;
                let bus = crate::bus::Bus::connect(url, &replica, &installation).await?;
                tracing::info!(%replica, %installation, bus = bus.kind(), "joining the replicas on the bus");
                let tunnel = crate::cluster::tunnel::TunnelConfig {
                    window: config.bus_window,
                    silence: config.replica_timeout,
                    open_timeout: config.session_open_timeout,
                };
                let cluster = crate::cluster::Cluster::new(
                    bus,
                    replica.clone(),
                    instance.clone(),
                    tunnel,
                    config.replica_timeout / 3,
                );
                // Two replicas with one id would both answer for it, and this
                // one would close the other's sessions in the audit log.
                if config.replica_id.is_some() {
                    cluster.check_id_free().await?;
                    cluster.claim_id().await?;
                }
                Some(Arc::new(cluster))
            }
            None => None,
        };
        let state = Arc::new(State {
            config,
            store,
            registry: Registry::default(),
            sessions: Default::default(),
            cluster,
            instance,
            stopping: Default::default(),
        });
        crate::lease::start(&state).await?;
        tokio::spawn(crate::audit::retention(state.clone()));
        Ok(Server {
            state,
            listener,
            tls: TlsAcceptor::from(tls_config),
            admin_token,
            ca_cert,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then closes every agent link with
    /// "going away" so agents reconnect, and drops open connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let state = self.state;
        let router = api::router(state.clone());
        if let Err(e) = crate::cluster::Cluster::start(&state, router.clone()).await {
            tracing::error!(error = %e, "cannot listen on the message bus; other replicas cannot reach this one until it restarts");
        }
        let limiter = Arc::new(Semaphore::new(state.config.max_connections));
        let timeout = state.config.request_timeout;
        let keepalive = state.config.tcp_keepalive;
        let mut connections = JoinSet::new();
        tracing::info!(listen = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "control plane serving");
        tokio::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            let (tcp, addr) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limiter.clone().try_acquire_owned() else {
                tracing::warn!(%addr, max = state.config.max_connections, "connection refused: max_connections reached");
                continue;
            };
            tcp.set_nodelay(true).ok();
            if !keepalive.is_zero() {
                let probes = socket2::TcpKeepalive::new()
                    .with_time(keepalive)
                    .with_interval(std::time::Duration::from_secs(10))
                    .with_retries(3);
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&probes);
            }
            let tls = self.tls.clone();
            let router = router.clone();
            connections.spawn(async move {
                let _permit = permit;
                let stream =
                    match tokio::time::timeout(timeout, tls.accept(ReadAhead::new(tcp))).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let service =
                    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                        req.extensions_mut().insert(RemoteAddr(addr));
                        router.clone().oneshot(req)
                    });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "connection ended with an error");
                }
            });
        }
        tracing::info!("shutting down: closing agent links");
        for conn in state.registry.list() {
            conn.mux
                .close(close::GOING_AWAY, "control plane shutting down");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        crate::lease::settle(&state, state.config.shutdown_timeout).await;
        connections.abort_all();
    }
}

/// On first start (no users), creates the `admin` user and its API key,
/// saved once to DATA_DIR/admin-token (mode 0600).
async fn bootstrap_admin(store: &Store, config: &Config) -> Result<Option<String>, Error> {
    if store.user_count().await? > 0 {
        return Ok(None);
    }
    let user = User {
        id: format!("u_{}", secret::random_hex(8)),
        name: "admin".into(),
        role: "admin".into(),
        scopes: vec![],
        password_hash: None,
        created_at: now_ms(),
        updated_at: now_ms(),
    };
    match store.create_user(&user).await {
        Ok(()) => {}
        // Another replica starting at the same moment made it first.
        Err(crate::store::StoreError::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let key = secret::generate(secret::API_KEY_PREFIX);
    store
        .create_api_key(&ApiKey {
            id: key.lookup_id,
            user_id: user.id,
            name: "bootstrap".into(),
            key_hash: key.hash,
            scopes: vec![],
            kind: "api".into(),
            created_at: now_ms(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        })
        .await?;
    store
        .append_audit(&crate::store::NewAuditRecord {
            user: Some("admin".into()),
            ..crate::store::NewAuditRecord::new("user.created").detail(serde_json::json!({
                "name": "admin", "role": "admin", "scopes": [], "bootstrap": true,
            }))
        })
        .await?;
    let path = config.data_dir.join("admin-token");
    tls::write_file(&path, format!("{}\n", key.token).as_bytes(), 0o600)?;
    Ok(Some(key.token))
}
