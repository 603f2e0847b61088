//! The patchflow daemon: serves chunk stores to training clients over gRPC.
//!
//! It owns the network layer: streams and their flow control, limits, access control, and the one
//! mapping of errors to gRPC statuses. It must not cut patches itself (the sampler does) and must
//! not link libtorch.
//!
//! Trainers should not decode volumes: a storage node holds the chunk stores, cuts and
//! normalises patches on its own cores and streams ready batches to as many GPU machines as it
//! can feed. This crate is the thin network layer that makes that possible on top of
//! [`patchflow_sampler`]:
//!
//! * the `patchflow.v1.Patchflow` service ([`patchflow_proto`]): dataset discovery and
//!   bidirectional `Sample` streams with credit-based flow control, on TCP and/or a Unix socket;
//! * sampling on a dedicated worker pool (never on the async threads), shared fairly by every
//!   stream, with bounded memory per stream;
//! * limits on patch, batch, message size, credits and concurrent streams, with clear statuses;
//! * gRPC health checking, server reflection, and Prometheus metrics on a separate listener;
//! * access control: a bearer token checked on every RPC, TLS (optionally with client
//!   certificates) on the TCP listener, a refusal to listen on a non-loopback address without
//!   authentication, and names in requests held to the identifier rule of the store;
//! * damaged stored data met while serving: the stream that meets it ends with DATA_LOSS and
//!   the case is set aside, reported (log, metrics, ListDatasets and DescribeDataset), and no
//!   longer drawn by any stream until the daemon restarts;
//! * shared memory for clients on the daemon's host: the sampler writes a batch straight into a
//!   slot file the client maps, so no voxel crosses the socket (`shm`);
//! * a sampling job that panics ends its own stream with INTERNAL; the daemon and every other
//!   stream carry on;
//! * graceful shutdown.
//!
//! ```no_run
//! # async fn run() -> Result<(), patchflow_server::ServerError> {
//! let config = patchflow_server::ServerConfig {
//!     stores: vec!["/data/stores".into()],
//!     metrics: Some("127.0.0.1:9464".parse().unwrap()),
//!     ..Default::default()
//! };
//! patchflow_server::serve(config, patchflow_server::shutdown_signal()).await
//! # }
//! ```

mod auth;
mod config;
mod convert;
mod damage;
mod error;
mod job;
mod metrics;
mod pool;
mod registry;
mod service;
mod shm;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use patchflow_proto::v1::patchflow_server::PatchflowServer;
use patchflow_store::ChunkCache;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::{InterceptorLayer, Routes};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

pub use auth::TlsFiles;
pub use config::{
    DEFAULT_PORT, Limits, MIN_MESSAGE_BYTES, ServerConfig, default_shared_memory_dir,
};
pub use convert::DEFAULT_FOREGROUND_FRACTION;
pub use error::ServerError;
pub use metrics::MetricsSnapshot;
pub use patchflow_proto::token::{MAX_TOKEN_BYTES, Secret, TokenError};

use auth::Authenticator;
use metrics::Metrics;
use pool::WorkerPool;
use registry::Registry;
use service::PatchflowService;
use stream::StreamContext;

/// Largest client message accepted (configurations and credits are small).
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// A started daemon. Dropping it stops the server without waiting; [`RunningServer::shutdown`]
/// stops it and waits.
pub struct RunningServer {
    local_addr: Option<SocketAddr>,
    tls: bool,
    unix_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<(String, JoinHandle<Result<(), ServerError>>)>,
    metrics: Arc<Metrics>,
    health: tonic_health::server::HealthReporter,
    grace: Duration,
}

impl RunningServer {
    /// The bound TCP address (with the actual port when the configuration asked for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The Unix socket path, when listening on one.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Endpoint URL of the TCP listener for clients (`http://127.0.0.1:PORT`, or `https://...`
    /// with TLS), or of the Unix socket (`unix:/path`) when there is no TCP listener.
    pub fn endpoint(&self) -> Option<String> {
        match (&self.local_addr, &self.unix_path) {
            (Some(addr), _) if self.tls => Some(format!("https://{addr}")),
            (Some(addr), _) => Some(format!("http://{addr}")),
            (None, Some(path)) => Some(format!("unix:{}", path.display())),
            (None, None) => None,
        }
    }

    /// The number of open Sample streams, as a watch channel (wait on it with `wait_for`).
    pub fn live_streams(&self) -> watch::Receiver<usize> {
        self.metrics.live_streams()
    }

    /// The main counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// A token that stops the server when cancelled (the same as calling
    /// [`RunningServer::shutdown`], without waiting).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, ends every open stream with UNAVAILABLE, and waits (at most the
    /// configured grace period) for connections to close. Returns the first transport error
    /// seen while serving, if any.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.health
            .set_not_serving::<PatchflowServer<PatchflowService>>()
            .await;
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut first_error = None;
        for (name, mut task) in std::mem::take(&mut self.tasks) {
            let outcome = match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    tracing::warn!(task = %name, "shutdown grace period over; dropping connections");
                    task.abort();
                    continue;
                }
            };
            let result = outcome.unwrap_or_else(|e| {
                Err(ServerError::Task {
                    task: name.clone(),
                    reason: e.to_string(),
                })
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        if let Some(path) = &self.unix_path
            && let Err(e) = std::fs::remove_file(path)
        {
            tracing::debug!(path = %path.display(), error = %e, "could not remove the socket file");
        }
        tracing::info!("server stopped");
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a daemon: opens every store, starts the worker pool, binds the listeners and starts
/// serving. Returns once everything is bound.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    config.check()?;
    // TLS problems (unreadable files, a key that does not fit) stop the start before any store
    // is opened. TLS applies to the TCP listener only; the Unix socket stays plaintext.
    let tls = config.tls.as_ref().map(auth::server_tls).transpose()?;
    let tcp_server = transport(&config, tls.clone())?;
    let unix_server = transport(&config, None)?;
    let workers = config.worker_threads();
    let shutdown = CancellationToken::new();
    let ctx = open_context(&config, workers, &shutdown).await?;
    let metrics = Arc::clone(&ctx.metrics);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PatchflowServer<PatchflowService>>()
        .await;
    let routes = add_services(Routes::new(health_service), &config, ctx)?;
    // The token check wraps every service of both listeners.
    let authenticator = Authenticator::new(config.token.clone(), Arc::clone(&metrics));
    let router = |server: Server| {
        server
            .layer(InterceptorLayer::new(authenticator.clone()))
            .add_routes(routes.clone())
    };
    warn_about_exposure(&config);

    let mut tasks = Vec::new();
    let mut local_addr = None;
    if let Some(addr) = config.listen {
        let (listener, bound) = bind_tcp(addr, "binding TCP address").await?;
        local_addr = Some(bound);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let serving = router(tcp_server)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        tasks.push(spawn_listener(format!("tcp {bound}"), serving, &shutdown));
        tracing::info!(
            address = %bound,
            workers,
            tls = tls.is_some(),
            token = config.token.is_some(),
            "listening on TCP"
        );
    }
    let mut unix_path = None;
    if let Some(path) = &config.unix {
        let incoming = UnixListenerStream::new(bind_unix(path)?);
        unix_path = Some(path.clone());
        let serving = router(unix_server)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        tasks.push(spawn_listener(
            format!("unix {}", path.display()),
            serving,
            &shutdown,
        ));
        tracing::info!(path = %path.display(), workers, "listening on Unix socket");
    }
    let mut metrics_addr = None;
    if let Some(addr) = config.metrics {
        let (bound, task) = spawn_metrics(addr, Arc::clone(&metrics), &shutdown).await?;
        metrics_addr = Some(bound);
        tasks.push(task);
    }

    Ok(RunningServer {
        local_addr,
        tls: tls.is_some(),
        unix_path,
        metrics_addr,
        shutdown,
        tasks,
        metrics,
        health,
        grace: config.shutdown_grace,
    })
}

/// What every stream shares: the opened stores, the counters, the worker pool, the buffer pool
/// and the shared-memory folder.
async fn open_context(
    config: &ServerConfig,
    workers: usize,
    shutdown: &CancellationToken,
) -> Result<Arc<StreamContext>, ServerError> {
    let cache_bytes = config.cache_mb.saturating_mul(1 << 20);
    let cache = match &config.disk_cache {
        Some(dir) => {
            let budget = (config.disk_cache_gb * 1e9) as u64;
            let disk =
                patchflow_store::DiskCache::open(dir, budget).map_err(|e| ServerError::Config {
                    field: "disk_cache",
                    reason: e.to_string(),
                })?;
            ChunkCache::with_disk_cache(cache_bytes, disk)
        }
        None => ChunkCache::new(cache_bytes),
    };
    let stores = config.stores.clone();
    let registry_cache = Arc::clone(&cache);
    let registry = tokio::task::spawn_blocking(move || Registry::open(&stores, &registry_cache))
        .await
        .map_err(|e| ServerError::Task {
            task: "opening stores".into(),
            reason: e.to_string(),
        })??;
    let metrics = Arc::new(Metrics::new(cache, workers));
    for (name, _) in registry.iter() {
        metrics.track_dataset(name);
    }
    let pool = WorkerPool::new(workers, Arc::clone(&metrics))?;
    let shared_memory = config
        .shared_memory
        .as_deref()
        .map(|dir| shm::SharedDir::open(dir, config.shared_memory_mb.saturating_mul(1 << 20)))
        .transpose()?;
    if let Some(dir) = &shared_memory {
        tracing::info!(folder = %dir.path().display(), "shared memory offered to clients on this host");
    }
    Ok(Arc::new(StreamContext {
        registry: Arc::new(registry),
        pool: Arc::new(pool),
        limits: config.limits.clone(),
        metrics,
        shutdown: shutdown.clone(),
        // Room for the batches a few streams have in flight; beyond that, buffers are freed.
        buffers: patchflow_proto::buffers::BufferPool::new(
            4 * workers.max(1),
            usize::try_from(config.limits.max_batch_bytes)
                .unwrap_or(usize::MAX)
                .min(1 << 30),
        ),
        shared_memory,
    }))
}

/// `routes` (health checking) with gRPC reflection (v1 and v1alpha) and the Patchflow service
/// added.
fn add_services(
    routes: Routes,
    config: &ServerConfig,
    ctx: Arc<StreamContext>,
) -> Result<Routes, ServerError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(patchflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(patchflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let service = PatchflowServer::new(PatchflowService::new(ctx))
        .max_encoding_message_size(config.limits.max_message_bytes)
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    Ok(routes
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service))
}

/// Spawns the task serving one listener; a listener that fails stops the whole server.
fn spawn_listener(
    name: String,
    serving: impl Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    shutdown: &CancellationToken,
) -> (String, JoinHandle<Result<(), ServerError>>) {
    let token = shutdown.clone();
    let listener = name.clone();
    let task = tokio::spawn(async move { finish_listener(listener, serving.await, &token) });
    (name, task)
}

/// Binds the metrics endpoint and spawns the task serving it.
async fn spawn_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(SocketAddr, (String, JoinHandle<Result<(), ServerError>>)), ServerError> {
    let (listener, bound) = bind_tcp(addr, "binding metrics address").await?;
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        metrics::serve_metrics(listener, metrics, token).await;
        Ok(())
    });
    tracing::info!(address = %bound, "metrics on http://{bound}/metrics");
    Ok((bound, (format!("metrics {bound}"), task)))
}

/// Runs a daemon until `signal` completes (or a listener fails), then shuts it down gracefully.
pub async fn serve(
    config: ServerConfig,
    signal: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = start(config).await?;
    let stopped = server.shutdown_token();
    tokio::select! {
        _ = signal => tracing::info!("shutdown requested"),
        _ = stopped.cancelled() => {}
    }
    server.shutdown().await
}

/// Completes on SIGINT or SIGTERM (for [`serve`]). If the handlers cannot be installed it never
/// completes and logs why.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The transport settings shared by every listener, with `tls` when given.
fn transport(config: &ServerConfig, tls: Option<ServerTlsConfig>) -> Result<Server, ServerError> {
    let builder = Server::builder()
        .http2_adaptive_window(Some(true))
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    let (Some(tls), Some(files)) = (tls, &config.tls) else {
        return Ok(builder);
    };
    builder.tls_config(tls).map_err(|e| ServerError::Tls {
        path: files.cert.clone(),
        reason: format!(
            "cannot be used with the key {}: {}",
            files.key.display(),
            error_chain(&e)
        ),
    })
}

/// Logs loudly what an operator must know about who can reach the daemon.
fn warn_about_exposure(config: &ServerConfig) {
    let Some(addr) = config.listen else {
        return;
    };
    if config.unprotected_listener().is_some() {
        tracing::warn!(
            address = %addr,
            "INSECURE: listening on a non-loopback address without authentication (--insecure): \
             anyone who can reach this address can read every served dataset"
        );
    } else if config.token.is_some()
        && config.tls.is_none()
        && !addr.ip().to_canonical().is_loopback()
    {
        tracing::warn!(
            address = %addr,
            "the bearer token travels in clear text on this non-loopback address; \
             add TLS (--tls-cert, --tls-key) unless the network is trusted"
        );
    }
}

/// An error and its sources, joined (transport errors keep the useful part in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Turns a listener's end into the task result; a failing listener stops the whole server.
fn finish_listener(
    listener: String,
    result: Result<(), tonic::transport::Error>,
    shutdown: &CancellationToken,
) -> Result<(), ServerError> {
    result.map_err(|source| {
        tracing::error!(%listener, error = %source, "listener failed; stopping the server");
        shutdown.cancel();
        ServerError::Transport { listener, source }
    })
}

/// Binds a TCP listener at `addr` (`what` says which, for errors); returns it with the address
/// it got (the actual port when `addr` asked for port 0).
async fn bind_tcp(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let io = |what, source| ServerError::Io {
        what,
        path: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(|e| io(what, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| io("reading bound address of", e))?;
    Ok((listener, bound))
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by a previous run.
fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |what, source| ServerError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io(
                "refusing to replace",
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket",
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io(
                "binding Unix socket",
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is listening on it",
                ),
            ));
        }
        std::fs::remove_file(path).map_err(|e| io("removing stale socket", e))?;
    }
    UnixListener::bind(path).map_err(|e| io("binding Unix socket", e))
}
