//! One lane of a stream: a background task that delivers one residue class of the stream's
//! indices (those its home daemon is given), keeps a Sample stream open for it, grants credits as
//! batches are consumed, reassembles batches and survives failures, resuming at the next index it
//! has not delivered.
//!
//! Failover: batch `k` depends only on the dataset, the configuration and `k`, so any daemon can
//! produce a lane's batches. When the lane's daemon fails (the stream breaks with a status that
//! reconnecting may cure, or owes batches and sends nothing for
//! [`crate::ClientOptions::batch_timeout`]), the lane opens the same configuration, start index
//! and stride on the next daemon that is not known to be down, at once; its home daemon is then
//! probed with backoff, and the lane moves back when it answers. When every daemon is down the
//! lane retries them in turn with backoff and gives up after
//! [`crate::ClientOptions::max_attempts`] rounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use patchflow_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use crate::batch::{Assembler, Delivery};
use crate::error::{final_error, is_retryable};
use crate::shared::{MapError, SharedSlots};
use crate::{ClientError, ClientOptions, Rpc};

/// What the consumer tells a link.
pub(crate) enum Command {
    /// Use this configuration from now on (start index, stride and id included).
    Configure(Box<pb::SampleConfig>),
    /// One batch was consumed: ask for one more.
    Credit,
}

/// What a link delivers.
pub(crate) enum Event {
    /// A batch of configuration `config_id` (converted by the consumer when compact).
    Batch { config_id: u64, batch: Delivery },
    /// Configuration `config_id` cannot be served.
    Failed { config_id: u64, error: ClientError },
}

/// A daemon as a lane uses it.
#[derive(Clone)]
pub(crate) struct Target {
    pub endpoint: String,
    pub client: Rpc,
    /// Credits in flight on one stream.
    pub window: u32,
    /// Shared-memory slots to ask for, or `None` for batches inside the messages.
    pub shared: Option<u32>,
}

/// Which daemons are known to be down, shared by every lane of a client: a lane that sees a
/// daemon fail marks it, one that receives a batch from it (or whose probe it answers) clears
/// the mark. Lanes moving off a failed daemon skip the marked ones.
pub(crate) struct Health {
    down: Vec<AtomicBool>,
}

impl Health {
    pub fn new(daemons: usize) -> Health {
        Health {
            down: (0..daemons).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    pub fn is_down(&self, daemon: usize) -> bool {
        self.down[daemon].load(Ordering::Relaxed)
    }

    /// The first daemon not known to be down, in the order `first, first + 1, ...`.
    fn first_up(&self, first: usize) -> Option<usize> {
        let n = self.down.len();
        (0..n).map(|i| (first + i) % n).find(|&d| !self.is_down(d))
    }

    pub fn set_down(&self, daemon: usize, down: bool) {
        self.down[daemon].store(down, Ordering::Relaxed);
    }
}

/// The consumer's handle on a lane task.
pub(crate) struct Link {
    /// The home daemon's endpoint.
    pub endpoint: String,
    pub events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl Link {
    /// Starts the task of lane `home` (whose home daemon is `targets[home]`); it waits for a
    /// configuration.
    pub fn spawn(
        home: usize,
        targets: Arc<[Target]>,
        health: Arc<Health>,
        options: ClientOptions,
    ) -> Link {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let endpoint = targets[home].endpoint.clone();
        let shared = targets.iter().map(|t| t.shared).collect();
        // A home daemon known to be down is probed; the lane starts elsewhere.
        let current = health.first_up(home).unwrap_or(home);
        let task = LinkTask {
            targets,
            health,
            home,
            current,
            home_probes: 0,
            shared,
            options,
            commands: command_rx,
            events: event_tx,
            config: None,
            outstanding: 0,
            failures: 0,
            rounds: 0,
            delay: None,
        };
        Link {
            endpoint,
            events,
            commands,
            task: tokio::spawn(task.run()),
        }
    }

    /// Sends a command (ignored if the task is gone; the next receive reports that).
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Ends the daemon's stream: dropping the call resets it, and the daemon frees it.
        self.task.abort();
    }
}

struct LinkTask {
    /// Every daemon of the client, in endpoint order.
    targets: Arc<[Target]>,
    health: Arc<Health>,
    /// The daemon this lane's indices are given to when it is up.
    home: usize,
    /// The daemon serving the lane now.
    current: usize,
    /// Probes of the home daemon since it last delivered a batch (failed ones, and successful
    /// ones after which it failed again before a batch): the wait before the next probe
    /// doubles with each, so a daemon that answers probes but fails streams is not hammered.
    home_probes: u32,
    /// Per daemon: shared-memory slots asked for; `None`: batches inside the messages (also
    /// once a daemon's files turned out unusable).
    shared: Vec<Option<u32>>,
    options: ClientOptions,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    /// The configuration in force; its `start_index` is the next index to deliver.
    config: Option<pb::SampleConfig>,
    /// Batches the daemon owes: credits granted and not yet answered.
    outstanding: u32,
    /// Failed connections since the last batch delivered.
    failures: u32,
    /// Failures since the last batch delivered after which no daemon was left that was not
    /// known to be down (each one is followed by a backoff wait).
    rounds: u32,
    /// Wait before the next connection.
    delay: Option<Duration>,
}

/// How a connection ended.
enum End {
    /// The consumer is gone.
    Closed,
    /// The connection failed with this status.
    Failed(Status),
    /// The configuration failed for good (already reported).
    Reported,
    /// Shared memory turned out unusable: open the stream again without it.
    WithoutSharedMemory,
    /// The home daemon answers again: the lane moves back to it.
    Home,
}

impl LinkTask {
    async fn run(mut self) {
        loop {
            if self.config.is_none() {
                match self.commands.recv().await {
                    None => return,
                    Some(command) => {
                        self.apply(command);
                        continue;
                    }
                }
            }
            if let Some(delay) = self.delay.take() {
                tracing::info!(
                    endpoint = %self.endpoint(),
                    attempt = self.rounds,
                    delay_ms = delay.as_millis() as u64,
                    "reconnecting"
                );
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        command = self.commands.recv() => match command {
                            None => return,
                            Some(command) => self.apply(command),
                        },
                    }
                }
                if self.config.is_none() {
                    continue;
                }
            }
            match self.connection().await {
                End::Closed => return,
                End::Reported | End::WithoutSharedMemory | End::Home => {}
                End::Failed(status) => self.fail(status),
            }
        }
    }

    /// The endpoint of the daemon serving the lane now.
    fn endpoint(&self) -> &str {
        &self.targets[self.current].endpoint
    }

    /// Applies a command while no stream is open.
    fn apply(&mut self, command: Command) {
        match command {
            Command::Configure(config) => {
                self.config = Some(*config);
                // Capped by the serving daemon's window when the stream opens.
                self.outstanding = u32::MAX;
            }
            Command::Credit => self.outstanding = self.outstanding.saturating_add(1),
        }
    }

    /// Records a failure of the current daemon: a status that reconnecting may cure moves the
    /// lane to the next daemon not known to be down, at once, or, when every daemon is down, to
    /// the next one in turn after a backoff wait; after `max_attempts` such rounds (or
    /// `max_attempts` failures per daemon) the failure is reported. Any other status is
    /// reported at once, and the lane waits for a new configuration.
    fn fail(&mut self, status: Status) {
        let config_id = self.config.as_ref().map_or(0, |c| c.config_id);
        self.failures = self.failures.saturating_add(1);
        if !is_retryable(&status) {
            let error = final_error(self.endpoint(), status, self.failures);
            self.report(config_id, error);
            return;
        }
        let n = self.targets.len();
        self.health.set_down(self.current, true);
        let healthy = self.health.first_up(self.home);
        let next = match healthy {
            Some(d) => d,
            None => {
                self.rounds = self.rounds.saturating_add(1);
                (self.current + 1) % n
            }
        };
        let limit = u32::try_from(n)
            .unwrap_or(u32::MAX)
            .saturating_mul(self.options.max_attempts);
        if self.rounds > self.options.max_attempts || self.failures > limit.max(1) {
            let error = final_error(self.endpoint(), status, self.failures);
            self.report(config_id, error);
            return;
        }
        tracing::warn!(
            endpoint = %self.endpoint(),
            next = %self.targets[next].endpoint,
            %status,
            "stream failed"
        );
        if healthy.is_none() {
            self.delay = Some(self.options.backoff(self.rounds));
        }
        self.current = next;
    }

    fn report(&mut self, config_id: u64, error: ClientError) {
        tracing::warn!(endpoint = %self.endpoint(), %error, "stream failed for good");
        let _ = self.events.send(Event::Failed { config_id, error });
        self.config = None;
        self.failures = 0;
        self.rounds = 0;
        self.delay = None;
        self.current = self.home;
    }

    /// Asks the home daemon whether it answers (its listing, within the connection timeout).
    async fn probe_home(target: Target, timeout: Duration) -> bool {
        let mut client = target.client;
        matches!(
            tokio::time::timeout(timeout, client.list_datasets(pb::ListDatasetsRequest {})).await,
            Ok(Ok(_))
        )
    }

    /// Opens one Sample stream and pumps it until it ends.
    async fn connection(&mut self) -> End {
        let Some(config) = self.config.clone() else {
            return End::Reported;
        };
        let target = self.targets[self.current].clone();
        let shared = self.shared[self.current];
        // Credits in flight: the window of the daemon serving the lane now.
        self.outstanding = self.outstanding.min(target.window);
        let (requests, request_rx) = mpsc::unbounded_channel();
        let _ = requests.send(pb::SampleRequest {
            config: Some(config),
            credits: self.outstanding,
            shared_memory: shared.map(|slots| pb::SharedMemoryRequest { slots }),
            released: Vec::new(),
            wire: self.options.compact.then_some(pb::WireOptions {
                stored_image: true,
                zstd_labels: true,
            }),
        });
        let mut client = target.client.clone();
        let timeout = self.options.batch_timeout;
        let opened = tokio::time::timeout(
            timeout,
            client.sample(UnboundedReceiverStream::new(request_rx)),
        );
        let mut inbound = match opened.await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return End::Failed(status),
            Err(_) => return End::Failed(stalled(timeout, self.outstanding)),
        };
        let mut assembler = Assembler::new(self.options.max_batch_bytes);
        let mut slots = SharedSlots::new(shared.unwrap_or(0), self.options.max_batch_bytes);
        let (releases, mut released) = mpsc::unbounded_channel::<u32>();
        // No message for `batch_timeout` while batches are owed: the daemon is stuck.
        let stall = tokio::time::sleep(timeout);
        tokio::pin!(stall);
        // Away from home: probe the home daemon with backoff.
        let away = self.current != self.home;
        let probe_wait =
            tokio::time::sleep(self.options.backoff(self.home_probes.saturating_add(1)));
        tokio::pin!(probe_wait);
        let mut probe = None;
        loop {
            let probing = probe.is_some();
            tokio::select! {
                _ = &mut stall, if self.outstanding > 0 => {
                    return End::Failed(stalled(timeout, self.outstanding));
                }
                _ = &mut probe_wait, if away && !probing => {
                    let target = self.targets[self.home].clone();
                    probe = Some(Box::pin(Self::probe_home(target, self.options.connect_timeout)));
                }
                answered = async { probe.as_mut().expect("armed").await }, if probing => {
                    probe = None;
                    self.home_probes = self.home_probes.saturating_add(1);
                    if answered {
                        tracing::info!(
                            endpoint = %self.targets[self.home].endpoint,
                            "daemon answers again; moving its batches back"
                        );
                        self.health.set_down(self.home, false);
                        self.current = self.home;
                        return End::Home;
                    }
                    probe_wait
                        .as_mut()
                        .reset(Instant::now() + self.options.backoff(self.home_probes.saturating_add(1)));
                }
                Some(slot) = released.recv() => {
                    let mut slots = vec![slot];
                    while let Ok(slot) = released.try_recv() {
                        slots.push(slot);
                    }
                    let _ = requests.send(pb::SampleRequest {
                        released: slots,
                        ..pb::SampleRequest::default()
                    });
                }
                command = self.commands.recv() => match command {
                    None => return End::Closed,
                    Some(command) => {
                        if self.on_command(command, &requests, target.window) {
                            stall.as_mut().reset(Instant::now() + timeout);
                        }
                    }
                },
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        stall.as_mut().reset(Instant::now() + timeout);
                        // A batch completes from one shared-memory message or from its parts.
                        let received = if message.shared.is_some() {
                            match slots.batch(message, &releases) {
                                Ok((config_id, batch)) => Ok(Some((config_id, Delivery::Ready(batch)))),
                                Err(MapError::Protocol(reason)) => Err(reason),
                                Err(MapError::Unusable { path, reason }) => {
                                    return self
                                        .after_unusable_slot(&mut inbound, &requests, &path, &reason)
                                        .await;
                                }
                            }
                        } else {
                            assembler.push(message)
                        };
                        if let Some(end) = self.on_received(received) {
                            return end;
                        }
                    }
                    Ok(None) => {
                        return End::Failed(Status::unavailable("the daemon closed the stream"));
                    }
                    Err(status) => return End::Failed(status),
                },
            }
        }
    }

    /// Passes a consumer's command on to the open stream; true when the daemon now owes batches
    /// it did not owe before (the stall timer starts again).
    fn on_command(
        &mut self,
        command: Command,
        requests: &mpsc::UnboundedSender<pb::SampleRequest>,
        window: u32,
    ) -> bool {
        match command {
            Command::Credit => {
                let was_idle = self.outstanding == 0;
                self.outstanding = self.outstanding.saturating_add(1);
                let _ = requests.send(pb::SampleRequest {
                    credits: 1,
                    ..pb::SampleRequest::default()
                });
                was_idle
            }
            Command::Configure(config) => {
                self.outstanding = window;
                self.config = Some((*config).clone());
                let _ = requests.send(pb::SampleRequest {
                    config: Some(*config),
                    credits: window,
                    ..pb::SampleRequest::default()
                });
                true
            }
        }
    }

    /// Hands a completed batch on; a protocol violation ends the connection.
    fn on_received(&mut self, received: Result<Option<(u64, Delivery)>, String>) -> Option<End> {
        match received {
            Ok(None) => None,
            Ok(Some((config_id, batch))) => match self.deliver(config_id, batch) {
                Ok(()) => None,
                Err(reason) => Some(self.protocol_error(config_id, reason)),
            },
            Err(reason) => {
                let config_id = self.config.as_ref().map_or(0, |c| c.config_id);
                Some(self.protocol_error(config_id, reason))
            }
        }
    }

    /// Reports a protocol violation of the daemon for `config_id`.
    fn protocol_error(&mut self, config_id: u64, reason: String) -> End {
        let error = ClientError::Protocol {
            endpoint: self.endpoint().to_owned(),
            reason,
        };
        self.report(config_id, error);
        End::Reported
    }

    /// A slot that could not be mapped means either that the stream is ending (the daemon
    /// removes a stream's files with it, while batches already on their way still name them)
    /// or that this process cannot use the daemon's files at all. An ending stream sends at
    /// most the batches it owed when the failure was seen, then its status; a live one keeps
    /// producing as long as it gets credits. So each unreadable batch is replaced by a credit,
    /// and a message beyond the ones owed proves the stream alive.
    async fn after_unusable_slot(
        &mut self,
        inbound: &mut tonic::Streaming<pb::SampleResponse>,
        requests: &mpsc::UnboundedSender<pb::SampleRequest>,
        path: &str,
        reason: &str,
    ) -> End {
        let owed = self.outstanding.max(1);
        let mut seen = 0u32;
        loop {
            let _ = requests.send(pb::SampleRequest {
                credits: 1,
                ..pb::SampleRequest::default()
            });
            match inbound.message().await {
                Ok(Some(_)) => {
                    seen += 1;
                    if seen >= owed {
                        return self.shared_memory_unusable(path, reason);
                    }
                }
                Ok(None) => {
                    return End::Failed(Status::unavailable("the daemon closed the stream"));
                }
                Err(status) => return End::Failed(status),
            }
        }
    }

    /// A slot file this process cannot use: in [`crate::SharedMemory::Auto`] mode the stream
    /// goes on without shared memory (from the first batch not delivered); otherwise it fails.
    fn shared_memory_unusable(&mut self, path: &str, reason: &str) -> End {
        let explanation = format!(
            "cannot map the daemon's shared-memory file {path}: {reason} (a daemon on another \
             host, user or container; connect with shared memory off)"
        );
        if self.options.shared_memory == crate::SharedMemory::Auto {
            tracing::warn!(endpoint = %self.endpoint(), "{explanation}; going on without shared memory");
            self.shared[self.current] = None;
            return End::WithoutSharedMemory;
        }
        let config_id = self.config.as_ref().map_or(0, |c| c.config_id);
        let error = ClientError::SharedMemory {
            endpoint: self.endpoint().to_owned(),
            reason: explanation,
        };
        self.report(config_id, error);
        End::Reported
    }

    /// Hands a batch to the consumer if it belongs to the configuration in force.
    fn deliver(&mut self, config_id: u64, batch: Delivery) -> Result<(), String> {
        let Some(config) = self.config.as_mut() else {
            return Ok(());
        };
        if config_id != config.config_id {
            // Sent before the daemon saw the new configuration.
            return Ok(());
        }
        let expected = config.start_index.unwrap_or(0);
        if batch.index() != expected {
            return Err(format!(
                "expected batch {expected}, received batch {}",
                batch.index()
            ));
        }
        config.start_index = Some(expected.saturating_add(config.index_stride.max(1)));
        self.outstanding = self.outstanding.saturating_sub(1);
        self.failures = 0;
        self.rounds = 0;
        if self.current == self.home {
            self.home_probes = 0;
        }
        self.health.set_down(self.current, false);
        let _ = self.events.send(Event::Batch { config_id, batch });
        Ok(())
    }
}

/// The failure of a daemon that owes batches and sent nothing for `timeout`.
fn stalled(timeout: Duration, owed: u32) -> Status {
    Status::unavailable(format!(
        "no message for {:.1} s while {owed} batches are owed (ClientOptions::batch_timeout)",
        timeout.as_secs_f64()
    ))
}
