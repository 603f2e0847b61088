//! Rust client of the patchflow daemon: the training side of the pipeline.
//!
//! It owns the training side of the contract: connections, ordering, prefetch, reconnection and
//! the conversion of compact batches (with the sampler's conversion from `patchflow-volume`). It
//! must not link a tensor library or sample stores itself.
//!
//! A trainer wants an endless, reproducible sequence of batches, delivered faster than the GPU
//! eats them, from one or several storage nodes, surviving restarts of any of them. This crate
//! provides exactly that, without linking any tensor library:
//!
//! * [`Client::connect`] to one or several endpoints (`http://host:port`, `https://host:port`,
//!   `host:port` or `unix:/path`); [`Client::list_datasets`] and [`Client::describe`] for
//!   discovery;
//! * a bearer token sent with every call ([`ClientOptions::token`]) and TLS for `https://`
//!   endpoints, with a private CA, a client certificate and a domain-name override
//!   ([`ClientOptions::tls`]);
//! * [`Client::stream`] opens a [`BatchStream`]: batch `k` comes from daemon `k mod N`, batches
//!   are handed out in index order, each daemon is asked `prefetch` batches ahead;
//! * [`BatchStream::reconfigure`] changes patch size, batch size, policy, ... from the next
//!   batch handed out (the PGPS curriculum does this at every stage);
//! * a daemon that fails does not stall the stream: batch `k` depends only on the dataset, the
//!   configuration and `k`, so the indices of a failed daemon go to the others until it answers
//!   again (see *Failover* below); nothing is skipped or repeated;
//! * each [`Batch`] holds its image and label as contiguous [`bytes::Bytes`] buffers with their
//!   shapes and element types, ready to become tensors;
//! * from a daemon on the same host (`unix:` or loopback), batches arrive through shared memory:
//!   the buffers are views of the daemon's slot file, mapped read-only, without a copy
//!   ([`ClientOptions::shared_memory`]).
//!
//! # Failover
//!
//! The indices of a stream are split into one *lane* per endpoint: lane `j` holds the batches
//! daemon `j` is given (`k ≡ j (mod N)` for a stream of stride 1), on one Sample stream opened
//! with `start_index` and `index_stride = N × stride`. A lane's daemon has failed when its
//! stream breaks with a status that reconnecting may cure (`Unavailable`, a broken connection,
//! `Internal`, `Unknown`, `Aborted`, `Cancelled`), or when it owes batches and sends nothing for
//! [`ClientOptions::batch_timeout`]. The lane then opens the same configuration (the one in
//! force, with its config id), from its first index not yet delivered and with the same
//! stride, on the next daemon not known to be down: at once, without a backoff wait. That
//! daemon serves two lanes on two streams. The failed daemon is probed
//! (`ListDatasets`, backoff from [`ClientOptions::initial_backoff`] up to
//! [`ClientOptions::max_backoff`]) and the lane moves back as soon as it answers, again from
//! its first index not yet delivered. Batches received and not handed out are kept (those in
//! flight from the failed daemon are asked for again), so the caller sees the same sequence as
//! without the failure. Batches already handed out stay valid, shared-memory ones included
//! (their mapping lives as long as they do).
//!
//! While at least one daemon is up, the longest wait for a batch is thus about
//! `batch_timeout` (a daemon that hangs) plus the time a healthy daemon takes for the batch; a
//! daemon that dies is noticed when its connection breaks, at once on a local network. When
//! every daemon is down, the lane tries them in turn with backoff and the stream fails after
//! [`ClientOptions::max_attempts`] such rounds ([`ClientError::GaveUp`], code `Unavailable`).
//! Refusals (`InvalidArgument`, `NotFound`, `Unauthenticated`, `PermissionDenied`,
//! `ResourceExhausted`, `DataLoss`, ...), protocol violations and certificate failures are not
//! failover material: they end the stream at once, as with one daemon. A daemon that is down
//! when the client connects is treated the same way from the first batch on (see
//! [`Client::connect`]).
//!
//! Failover needs every daemon to serve the same dataset (the same store, or copies of it)
//! with the same options; a daemon that has set a damaged case aside (`DataLoss`) draws from
//! the other cases, and its batches then differ from those of the others.
//!
//! ```no_run
//! # async fn run() -> Result<(), patchflow_client::ClientError> {
//! use patchflow_client::{Client, ClientOptions, StreamConfig};
//! let client = Client::connect(["http://10.0.0.5:50051"], ClientOptions::default()).await?;
//! let mut stream = client.stream(StreamConfig::new("Dataset001", [32, 32, 32], 2)).await?;
//! let batch = stream.next().await?;
//! assert_eq!(batch.image_shape()[2..], [32, 32, 32]);
//! stream.reconfigure(StreamConfig::new("Dataset001", [64, 64, 64], 2))?;
//! # Ok(()) }
//! ```

mod auth;
mod batch;
mod compact;
mod config;
mod error;
mod link;
mod shape;
mod shared;
mod transport;

use std::sync::Arc;

use patchflow_proto::buffers::BufferPool;
use patchflow_proto::v1 as pb;
use patchflow_proto::v1::patchflow_client::PatchflowClient;
use tonic::service::interceptor::InterceptedService;

pub use auth::TlsOptions;
pub use batch::{Batch, ImageDtype, Item, LabelDtype};
pub use config::{ClientOptions, Policy, SharedMemory, StreamConfig};
pub use error::ClientError;
pub use patchflow_proto::token::{MAX_TOKEN_BYTES, Secret, TokenError};
pub use patchflow_proto::v1::{
    Augmentation, DatasetDescription, DatasetSummary, ListDatasetsResponse, ServerLimits,
    SetAsideCase,
};
pub use shape::{image_dtype_size, label_dtype_size};

use auth::Credentials;
use link::{Command, Event, Health, Link, Target};
use transport::{Transport, is_local};

/// The generated client over a connection that adds the credentials to every call.
pub(crate) type Rpc = PatchflowClient<InterceptedService<Transport, Credentials>>;

/// Largest message accepted when a daemon does not say (it always does).
const DEFAULT_MAX_MESSAGE: usize = 64 << 20;
/// Room for the fields around a message's payload.
const MESSAGE_SLACK: usize = 1 << 20;

/// One daemon.
#[derive(Clone)]
struct Daemon {
    endpoint: String,
    client: Rpc,
    limits: pb::ServerLimits,
    /// Whether its streams ask for shared memory.
    shared: bool,
}

/// A connection to one or several daemons serving the same dataset (or shards of it).
///
/// Clones share the connections. A connection runs as a task of the tokio runtime it was
/// opened on, so keep that runtime alive while any clone streams: use one runtime for all of
/// them (shutting it down ends their streams, which then fail over or reconnect).
#[derive(Clone)]
pub struct Client {
    daemons: Vec<Daemon>,
    options: ClientOptions,
    /// Which daemons are known to be down, shared by the streams of this client.
    health: Arc<Health>,
}

impl Client {
    /// Connects to every endpoint and reads its limits. With one endpoint, an unreachable
    /// daemon is retried with the options' backoff and fails the call when it stays
    /// unreachable. With several, the call succeeds as soon as one of them answers: the others
    /// are tried once, and those that do not answer are taken for down (with the limits of the
    /// first that answered) and probed by the streams, which give their batches to the others
    /// meanwhile (see *Failover*). When none answers, all are retried with backoff.
    pub async fn connect<I, S>(endpoints: I, options: ClientOptions) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        options.check()?;
        let credentials = Credentials::new(options.token.as_ref())?;
        // TLS files are read once, for every endpoint.
        let tls = if options.tls.is_set() {
            Some(options.tls.load()?)
        } else {
            None
        };
        let mut clients = Vec::new();
        for endpoint in endpoints {
            let endpoint = endpoint.as_ref().to_owned();
            let (transport, origin) = transport::connect(&endpoint, &options, tls.as_ref())?;
            let client = PatchflowClient::with_origin(
                InterceptedService::new(transport, credentials.clone()),
                origin,
            );
            clients.push((endpoint, client));
        }
        if clients.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let listed = listings(&clients, &options).await?;
        // A daemon that is down is taken to have the limits of the first that answered (they
        // serve the same data, with the same options); its batches go to the others until it
        // answers.
        let known = listed.iter().flatten().next().copied().unwrap_or_default();
        let health = Arc::new(Health::new(clients.len()));
        let mut daemons = Vec::new();
        for (i, ((endpoint, mut client), limits)) in clients.into_iter().zip(listed).enumerate() {
            let limits = limits.unwrap_or_else(|| {
                tracing::warn!(
                    %endpoint,
                    "daemon unreachable; its batches go to the others until it answers"
                );
                health.set_down(i, true);
                known
            });
            let max_message = usize::try_from(limits.max_message_bytes)
                .ok()
                .filter(|&m| m > 0)
                .unwrap_or(DEFAULT_MAX_MESSAGE);
            client = client.max_decoding_message_size(max_message.saturating_add(MESSAGE_SLACK));
            let shared = match options.shared_memory {
                SharedMemory::Off => false,
                SharedMemory::On => true,
                SharedMemory::Auto => limits.max_shared_slots > 0 && is_local(&endpoint),
            };
            daemons.push(Daemon {
                endpoint,
                client,
                limits,
                shared,
            });
        }
        Ok(Client {
            health,
            daemons,
            options,
        })
    }

    /// The endpoints, in the order batches are spread over them.
    pub fn endpoints(&self) -> Vec<&str> {
        self.daemons.iter().map(|d| d.endpoint.as_str()).collect()
    }

    /// The limits each daemon announced, in endpoint order (for a daemon that was down when the
    /// client connected: those of the first daemon that answered).
    pub fn limits(&self) -> Vec<&ServerLimits> {
        self.daemons.iter().map(|d| &d.limits).collect()
    }

    /// The datasets served, with the daemon's limits, as the first daemon that answers lists
    /// them (see [`Client::describe`] for the order).
    pub async fn list_datasets(&self) -> Result<ListDatasetsResponse, ClientError> {
        self.discover(
            |mut client| async move { client.list_datasets(pb::ListDatasetsRequest {}).await },
        )
        .await
    }

    /// Describes `dataset` as the first daemon that answers serves it: the daemons are asked in
    /// endpoint order, those known to be down last; a failure that reconnecting may cure moves
    /// the call to the next daemon, and after a round without an answer the round is retried
    /// with backoff, [`ClientOptions::max_attempts`] times. A refusal (an unknown dataset, say)
    /// is final.
    pub async fn describe(&self, dataset: &str) -> Result<DatasetDescription, ClientError> {
        self.discover(|mut client| {
            let dataset = dataset.to_owned();
            async move {
                client
                    .describe_dataset(pb::DescribeDatasetRequest { dataset })
                    .await
            }
        })
        .await
    }

    /// Runs a unary call on the first daemon that answers (see [`Client::describe`]).
    async fn discover<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Rpc) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        if let [daemon] = self.daemons.as_slice() {
            return with_retries(&daemon.endpoint, &self.options, || {
                call(daemon.client.clone())
            })
            .await;
        }
        let n = self.daemons.len();
        // Daemons not known to be down first, in endpoint order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| self.health.is_down(i));
        let mut round = 0;
        loop {
            let mut last = None;
            for &i in &order {
                let daemon = &self.daemons[i];
                match call(daemon.client.clone()).await {
                    Ok(response) => {
                        self.health.set_down(i, false);
                        return Ok(response.into_inner());
                    }
                    Err(status) if error::is_retryable(&status) => {
                        tracing::debug!(endpoint = %daemon.endpoint, %status, "call failed; asking the next daemon");
                        self.health.set_down(i, true);
                        last = Some((i, status));
                    }
                    Err(status) => {
                        return Err(error::final_error(&daemon.endpoint, status, round + 1));
                    }
                }
            }
            let Some((i, status)) = last else {
                return Err(ClientError::NoEndpoints);
            };
            back_off(&self.options, &mut round, &self.daemons[i].endpoint, status).await?;
        }
    }

    /// Opens a stream of batches `0, 1, 2, ...` with `config`.
    pub async fn stream(&self, config: StreamConfig) -> Result<BatchStream, ClientError> {
        self.stream_from(config, 0).await
    }

    /// Opens a stream whose first batch is `start` (e.g. to resume a training run at a step).
    pub async fn stream_from(
        &self,
        config: StreamConfig,
        start: u64,
    ) -> Result<BatchStream, ClientError> {
        self.stream_strided(config, start, 1).await
    }

    /// Opens a stream of the batches `start, start + stride, start + 2 × stride, ...` of the
    /// sequence: one share of a sequence that several consumers split between them (rank `r` of
    /// `n` data-parallel trainers takes `start = r`, `stride = n`, and together they receive
    /// exactly the batches one trainer would). The batches of the stream are spread over the
    /// daemons in turn, as those of [`Client::stream`] are.
    pub async fn stream_strided(
        &self,
        config: StreamConfig,
        start: u64,
        stride: u64,
    ) -> Result<BatchStream, ClientError> {
        if stride == 0 {
            return Err(ClientError::Config {
                field: "index_stride",
                reason: "must be at least 1".into(),
            });
        }
        let targets: Arc<[Target]> = self
            .daemons
            .iter()
            .map(|d| {
                let window = self
                    .options
                    .prefetch
                    .min(d.limits.max_credits.max(1))
                    .max(1);
                let shared = d.shared.then(|| {
                    let slots = window.saturating_add(self.options.held_batches);
                    match d.limits.max_shared_slots {
                        0 => slots,
                        max => slots.min(max),
                    }
                });
                Target {
                    endpoint: d.endpoint.clone(),
                    client: d.client.clone(),
                    window,
                    shared,
                }
            })
            .collect();
        let links = (0..targets.len())
            .map(|lane| {
                Link::spawn(
                    lane,
                    Arc::clone(&targets),
                    Arc::clone(&self.health),
                    self.options.clone(),
                )
            })
            .collect();
        let mut stream = BatchStream {
            links,
            next_index: start,
            stride,
            config_id: 0,
            config: config.clone(),
            failed: None,
            buffers: BufferPool::new(SPARE_BUFFERS, SPARE_BYTES),
        };
        stream.reconfigure(config)?;
        Ok(stream)
    }
}

/// The limits of each daemon, `None` for those that did not answer (see [`Client::connect`]).
async fn listings(
    clients: &[(String, Rpc)],
    options: &ClientOptions,
) -> Result<Vec<Option<pb::ServerLimits>>, ClientError> {
    let list = |client: &Rpc| {
        let mut client = client.clone();
        async move { client.list_datasets(pb::ListDatasetsRequest {}).await }
    };
    if let [(endpoint, client)] = clients {
        let listing = with_retries(endpoint, options, || list(client)).await?;
        return Ok(vec![Some(listing.limits.unwrap_or_default())]);
    }
    let mut limits = vec![None; clients.len()];
    let mut attempt = 0;
    loop {
        let mut last = None;
        for ((endpoint, client), limits) in clients.iter().zip(limits.iter_mut()) {
            match list(client).await {
                Ok(response) => *limits = Some(response.into_inner().limits.unwrap_or_default()),
                Err(status) if error::is_retryable(&status) => last = Some((endpoint, status)),
                Err(status) => return Err(error::final_error(endpoint, status, attempt + 1)),
            }
        }
        match last {
            Some((endpoint, status)) if limits.iter().all(Option::is_none) => {
                back_off(options, &mut attempt, endpoint, status).await?;
            }
            _ => return Ok(limits),
        }
    }
}

/// Runs a unary call, retrying failures that reconnecting may cure.
async fn with_retries<T, F, Fut>(
    endpoint: &str,
    options: &ClientOptions,
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if error::is_retryable(&status) => {
                back_off(options, &mut attempt, endpoint, status).await?;
            }
            Err(status) => return Err(error::final_error(endpoint, status, attempt + 1)),
        }
    }
}

/// After round `attempt` of calls failed with `status` (from `endpoint`), a failure that
/// reconnecting may cure: counts the round and waits the options' backoff, or, once
/// `max_attempts` rounds failed, gives the final error.
async fn back_off(
    options: &ClientOptions,
    attempt: &mut u32,
    endpoint: &str,
    status: tonic::Status,
) -> Result<(), ClientError> {
    *attempt += 1;
    if *attempt > options.max_attempts {
        return Err(error::final_error(endpoint, status, *attempt));
    }
    tracing::debug!(%endpoint, attempt = *attempt, %status, "call failed; retrying");
    tokio::time::sleep(options.backoff(*attempt)).await;
    Ok(())
}

/// An endless, ordered stream of batches. Dropping it closes every daemon's stream.
pub struct BatchStream {
    links: Vec<Link>,
    next_index: u64,
    /// Distance between consecutive indices of the stream.
    stride: u64,
    config_id: u64,
    config: StreamConfig,
    failed: Option<ClientError>,
    /// Buffers of compact batches converted here, back from batches the caller dropped.
    buffers: Arc<BufferPool>,
}

/// Spare buffers a stream keeps for the batches it converts (image and label of a few
/// batches), and their bound in bytes.
const SPARE_BUFFERS: usize = 8;
const SPARE_BYTES: usize = 1 << 30;

impl BatchStream {
    /// Index of the batch the next call to [`BatchStream::next`] returns.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The turn of the next batch: batch `k` comes from daemon `(k / stride) mod N`, so a
    /// stream of stride 1 serves batch `k` from daemon `k mod N`, and each share of a strided
    /// sequence is spread over every daemon too.
    fn turn(&self) -> u64 {
        self.next_index / self.stride
    }

    /// Distance between the indices of consecutive batches (1 unless opened with
    /// [`Client::stream_strided`]).
    pub fn index_stride(&self) -> u64 {
        self.stride
    }

    /// The configuration in force.
    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    /// The next batch, in index order. Errors are final for the current configuration (they
    /// repeat on later calls) until [`BatchStream::reconfigure`] is called.
    pub async fn next(&mut self) -> Result<Batch, ClientError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let n = self.links.len() as u64;
        let j = (self.turn() % n) as usize;
        let Some(link) = self.links.get_mut(j) else {
            return Err(ClientError::NoEndpoints);
        };
        loop {
            let event = link
                .events
                .recv()
                .await
                .ok_or_else(|| ClientError::Closed {
                    endpoint: link.endpoint.clone(),
                })?;
            match event {
                Event::Batch { config_id, batch } if config_id == self.config_id => {
                    if batch.index() != self.next_index {
                        let err = ClientError::Protocol {
                            endpoint: link.endpoint.clone(),
                            reason: format!(
                                "expected batch {}, received batch {}",
                                self.next_index,
                                batch.index()
                            ),
                        };
                        self.failed = Some(err.clone());
                        return Err(err);
                    }
                    self.next_index = self.next_index.saturating_add(self.stride);
                    link.send(Command::Credit);
                    // A compact batch is converted here, on the consumer's side.
                    return batch.into_batch(&self.buffers).map_err(|reason| {
                        let err = ClientError::Protocol {
                            endpoint: link.endpoint.clone(),
                            reason,
                        };
                        self.failed = Some(err.clone());
                        err
                    });
                }
                Event::Failed { config_id, error } if config_id == self.config_id => {
                    self.failed = Some(error.clone());
                    return Err(error);
                }
                // Left over from a previous configuration.
                Event::Batch { .. } | Event::Failed { .. } => {}
            }
        }
    }

    /// Applies `config` from the next batch handed out ([`BatchStream::next_index`]) on: every
    /// daemon is sent the new configuration with its first index, and batches of the previous
    /// configuration already received are dropped. Clears a previous error.
    pub fn reconfigure(&mut self, config: StreamConfig) -> Result<(), ClientError> {
        if config.dataset.is_empty() {
            return Err(ClientError::Config {
                field: "dataset",
                reason: "no dataset named".into(),
            });
        }
        self.config_id += 1;
        self.failed = None;
        let n = self.links.len() as u64;
        let turn = self.turn();
        for (j, link) in self.links.iter_mut().enumerate() {
            // The first turn >= the current one that daemon j serves (turn mod n == j), and the
            // index of the batch there.
            let offset = (j as u64 + n - turn % n) % n;
            let start = self
                .next_index
                .saturating_add(offset.saturating_mul(self.stride));
            link.send(Command::Configure(Box::new(config.to_wire(
                start,
                n.saturating_mul(self.stride),
                self.config_id,
            ))));
        }
        self.config = config;
        Ok(())
    }
}
