//! regmirror: a pull-through cache for OCI container registries.
//!
//! The library owns the server; `main.rs` only parses arguments. [`app`] builds the router
//! (testable without a socket) and [`run`] serves it until the shutdown future resolves.

pub mod api;
pub mod cache;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod error;
pub mod healthcheck;
pub mod metrics;
pub mod oci;
pub mod outcome;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod upstream;
pub mod warm;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use api::{app, AppState};
pub use config::Config;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("storage at {path}: {source}")]
    Storage {
        path: String,
        source: storage::Error,
    },
    #[error("{0}")]
    Upstream(String),
    /// The mirror's TLS files or htpasswd file cannot be used.
    #[error("{0}")]
    Security(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
    /// The pinned images do not fit the cache.
    #[error("{0}")]
    Pins(String),
}

/// Builds the application state from a configuration: opens (and reconciles) the store and
/// creates one HTTP client per upstream.
pub async fn state(config: &Config) -> Result<AppState, RunError> {
    tracing::info!(
        max_size = %config.storage.max_size,
        low_watermark_percent = config.storage.low_watermark_percent,
        min_free = %config.storage.min_free,
        max_age = %config.cache.max_age,
        "effective storage limits"
    );
    let root = config.storage.root.clone();
    let path = root.display().to_string();
    let options = storage::Options {
        index_cache: config.storage.index_cache.0,
    };
    let (store, reconciled) =
        tokio::task::spawn_blocking(move || storage::Store::open_with(&root, &options))
            .await
            .expect("store opening does not panic")
            .map_err(|source| RunError::Storage {
                path: path.clone(),
                source,
            })?;
    tracing::info!(root = %path, blobs = store.blob_count(), bytes = store.used_bytes(), dropped = reconciled.dropped, corrupt = reconciled.corrupt, unverified = reconciled.unverified, index_rebuilt = reconciled.broken_index.is_some(), "store opened");
    let metrics = Arc::new(metrics::Metrics::new());
    cache::scrub::spawn(
        &store,
        metrics.clone(),
        &config.storage.scrub,
        reconciled.unverified,
    );
    let upstreams =
        Arc::new(upstream::Upstreams::from_config(config, &metrics).map_err(RunError::Upstream)?);
    let mut policy = cache::Policy::from_config(config);
    let shared = shared(config, &metrics).await?;
    if config.storage.s3.is_some() {
        // The local disk is a hot tier of the bucket: its own bound, and what it drops stays
        // in the bucket.
        policy.max_size = config.storage.local.max_size.0;
    }
    let access = access_control(config, &upstreams)?;
    Ok(AppState {
        cache: cache::Cache::new_shared(store, upstreams, policy, metrics.clone(), shared),
        metrics,
        shutting_down: Arc::new(AtomicBool::new(false)),
        metrics_enabled: config.metrics.enabled,
        max_size: config.storage.max_size.0,
        access,
        seen: Default::default(),
    })
}

/// The shared bucket and the cluster, when configured.
async fn shared(
    config: &Config,
    metrics: &Arc<metrics::Metrics>,
) -> Result<cache::Shared, RunError> {
    let Some(s3) = &config.storage.s3 else {
        return Ok(cache::Shared::none());
    };
    let (access_key_id, secret) = s3.load_credentials().map_err(RunError::Security)?;
    let options = storage::s3::BucketOptions {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        region: s3.region.clone(),
        access_key_id,
        secret_access_key: secret,
        path_style: s3.path_style,
    };
    let bucket =
        storage::s3::Bucket::new(&options, metrics.registry()).map_err(RunError::Security)?;
    match bucket.check().await {
        Ok(()) => {
            tracing::info!(endpoint = %s3.endpoint, bucket = %s3.bucket, "shared bucket answers")
        }
        // Not fatal: the bucket may come up after us; until then this replica works from its
        // disk and the upstream.
        Err(error) => {
            tracing::warn!(endpoint = %s3.endpoint, bucket = %s3.bucket, %error, "shared bucket does not answer yet")
        }
    }
    let cluster = match &config.cluster {
        Some(cluster) => {
            Some(cluster::Cluster::new(cluster, metrics.clone()).map_err(RunError::Security)?)
        }
        None => None,
    };
    let redirect = s3.redirect.then_some(s3.redirect_ttl.0);
    let bound = cache::BucketBound {
        max_size: config.storage.max_size.0,
        low_watermark_percent: config.storage.low_watermark_percent,
        max_age: config.cache.max_age.0,
        pin_hold: config.pins_refresh.0.saturating_mul(2),
        grace: s3.evict_grace.0,
        redirect_ttl: if s3.redirect {
            s3.redirect_ttl.0
        } else {
            std::time::Duration::ZERO
        },
    };
    Ok(cache::Shared::new(
        Some(Arc::new(bucket)),
        cluster,
        redirect,
        metrics.registry(),
    )
    .with_bound(bound, metrics.registry()))
}

/// Loads `auth.htpasswd`, and warns when private credentials sit behind an open mirror.
fn access_control(
    config: &Config,
    upstreams: &upstream::Upstreams,
) -> Result<Option<Arc<api::auth::AccessControl>>, RunError> {
    let access = match &config.auth {
        Some(auth) => Some(Arc::new(
            api::auth::AccessControl::load(auth).map_err(RunError::Security)?,
        )),
        None => None,
    };
    if access.is_none() {
        for upstream in upstreams.all().iter().filter(|u| u.has_credentials()) {
            tracing::warn!(upstream = %upstream.name, "this upstream has credentials and the mirror has no access control (auth.htpasswd): anyone who can reach the mirror can pull what those credentials can see");
        }
    }
    Ok(access)
}

/// Everything `run` would check before serving, without opening the store or a socket: the
/// upstreams' credentials (files, variables, helpers) and certificates, the mirror's TLS files
/// and htpasswd. For `regmirror check-config`.
pub fn check(config: &Config) -> Result<(), RunError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let mut problems = Vec::new();
    if let Err(problem) = upstream::Upstreams::from_config(config, &metrics) {
        problems.push(problem);
    }
    if let Some(tls) = &config.tls {
        if let Err(problem) = server::tls::Reloader::new(tls) {
            problems.push(problem);
        }
    }
    if let Some(auth) = &config.auth {
        if let Err(problem) = api::auth::AccessControl::load(auth) {
            problems.push(problem);
        }
    }
    if let Some(s3) = &config.storage.s3 {
        if let Err(problem) = s3.load_credentials() {
            problems.push(problem);
        }
    }
    if let Some(cluster) = &config.cluster {
        if let Err(problem) = cluster.load_secret() {
            problems.push(problem);
        }
        if let Some(tls) = &cluster.tls {
            // Both sides read the same files; the client side is checked only when the
            // listener's side passed, so one bad file is reported once.
            match server::tls::Reloader::peers(tls) {
                Err(problem) => problems.push(problem),
                Ok(_) => {
                    if let Err(problem) = cluster::tls::client_config(tls) {
                        problems.push(problem);
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RunError::Security(problems.join("\n")))
    }
}

/// Serves [`app`] on `listener` with the default `server:` settings until `shutdown` resolves
/// and in-flight requests finish (tests call it with a state they keep).
pub async fn serve(
    listener: server::Listener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, &config::ServerConfig::default(), shutdown).await
}

/// What [`run`] does once everything is set up: proves sendfile with its self-test (unless
/// `server.sendfile: off`), then serves [`app`] on `listener` until `shutdown` resolves and
/// in-flight requests finish.
pub async fn serve_with(
    listener: server::Listener,
    state: AppState,
    config: &config::ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sendfile = match config.sendfile {
        config::SendfileMode::Off => {
            tracing::info!("sendfile off (server.sendfile); cache hits are copied");
            false
        }
        config::SendfileMode::Auto => match server::sendfile_self_test(config).await {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(%reason, "sendfile self-test failed: the HTTP stack does not pass placeholder frames through untouched; cache hits are copied instead");
                false
            }
        },
    };
    state.metrics.sendfile_enabled.set(i64::from(sendfile));
    let options = server::Options {
        sendfile,
        sendfile_bytes: Some(state.metrics.sendfile_counter()),
        evicted: Some(state.metrics.connections_evicted_counter()),
    };
    // Each request learns whether its connection can send files (`server::Connection`).
    server::serve(listener, app(state), config, options, shutdown).await
}

/// Serves the configuration until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tls = match &config.tls {
        Some(tls) => Some(Arc::new(
            server::tls::Reloader::new(tls).map_err(RunError::Security)?,
        )),
        None => None,
    };
    // Before anything opens files: the default connection limit follows from this one.
    match server::raise_fd_limit() {
        Ok(fds) => tracing::info!(
            fd_limit = fds.now,
            raised_from = fds.was,
            max_connections = server::max_connections(config.server.max_connections, fds.now),
            configured = config.server.max_connections.is_some(),
            "file descriptors and connection limit"
        ),
        Err(error) => tracing::warn!(
            %error,
            fd_limit = server::fd_limit(),
            max_connections = server::max_connections(config.server.max_connections, server::fd_limit()),
            "cannot raise the soft file descriptor limit to the hard one"
        ),
    }
    let state = state(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(RunError::Serve)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = server::Listener::new(listener, tls).map_err(RunError::Serve)?;
    tracing::info!(%addr, scheme, default_upstream = %config.default_upstream, upstreams = config.upstreams.len(), "listening");
    let flag = state.shutting_down.clone();
    let store = state.cache.store().clone();
    // One shutdown signal fans out to the server and the background tasks.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let delay = config.shutdown_delay.0;
    tokio::spawn(async move {
        shutdown.await;
        // Not ready from now on; still serving until the delay is over.
        flag.store(true, Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(
                seconds = delay.as_secs_f64(),
                "shutting down: /readyz answers 503, still accepting requests"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    let state = match config.metrics.listen.filter(|_| config.metrics.enabled) {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen { addr, source })?;
            let addr = listener.local_addr().map_err(RunError::Serve)?;
            tracing::info!(%addr, "metrics listening");
            api::serve_metrics(listener, state, until_stopped(stopped.clone()))
        }
        None => state,
    };
    tokio::spawn(
        state
            .cache
            .evictor()
            .clone()
            .run(until_stopped(stopped.clone())),
    );
    if config.storage.s3.is_some() {
        // The bucket's own bound, apart from the hot tier's evictor above.
        tokio::spawn(cache::bucket_evict::run(
            state.cache.clone(),
            until_stopped(stopped.clone()),
        ));
    }
    let (too_big, pins_too_big) = tokio::sync::oneshot::channel();
    if !config.pins.is_empty() {
        tokio::spawn(cache::pins::run(
            state.cache.clone(),
            config.pins.clone(),
            config.pins_refresh.0,
            until_stopped(stopped.clone()),
            too_big,
        ));
    }
    if let Some(access) = state.access.clone() {
        tokio::spawn(access.reload_loop(until_stopped(stopped.clone())));
    }
    if let (Some(cluster), Some(cluster_config)) = (state.cache.cluster(), &config.cluster) {
        let tls = match &cluster_config.tls {
            Some(tls) => Some(Arc::new(
                server::tls::Reloader::peers(tls).map_err(RunError::Security)?,
            )),
            None => None,
        };
        let addr = cluster_config.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen { addr, source })?;
        let addr = listener.local_addr().map_err(RunError::Serve)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "peer channel listening");
        let listener = server::Listener::new(listener, tls).map_err(RunError::Serve)?;
        let router = api::peer::router(state.clone(), cluster.clone());
        let server_config = config.server.clone();
        let stop = until_stopped(stopped.clone());
        tokio::spawn(async move {
            if let Err(error) = server::serve(
                listener,
                router,
                &server_config,
                server::Options::default(),
                stop,
            )
            .await
            {
                tracing::error!(%error, "peer channel stopped");
            }
        });
        tokio::spawn(cluster.clone().run(until_stopped(stopped.clone())));
    }
    let server = serve_with(
        listener,
        state,
        &config.server,
        until_stopped(stopped.clone()),
    );
    let grace = config.shutdown_timeout.0;
    let deadline = async move {
        until_stopped(stopped).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result.map_err(RunError::Serve)?,
        () = deadline => tracing::warn!(seconds = grace.as_secs(), "shutdown deadline passed, dropping the remaining connections"),
        Ok(message) = pins_too_big => return Err(RunError::Pins(message)),
    }
    if let Err(error) = store.index().flush() {
        tracing::warn!(%error, "index flush on shutdown failed");
    }
    Ok(())
}
