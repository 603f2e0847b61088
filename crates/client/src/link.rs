//! The connection to one daemon of a stream: a background task that keeps the daemon's Sample
//! stream open, grants credits as batches are consumed, reassembles batches and reconnects with
//! exponential backoff, resuming at the next index it has not delivered.

use patchflow_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

use crate::batch::{Assembler, Batch};
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
    /// A batch of configuration `config_id`.
    Batch { config_id: u64, batch: Batch },
    /// Configuration `config_id` cannot be served.
    Failed { config_id: u64, error: ClientError },
}

/// The consumer's handle on a link task.
pub(crate) struct Link {
    pub endpoint: String,
    pub events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl Link {
    /// Starts the task for one daemon; it waits for a configuration. `shared`: the number of
    /// shared-memory slots to ask for, or `None` for batches inside the messages.
    pub fn spawn(
        endpoint: String,
        client: Rpc,
        options: ClientOptions,
        window: u32,
        shared: Option<u32>,
    ) -> Link {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::unbounded_channel();
        let task = LinkTask {
            endpoint: endpoint.clone(),
            client,
            options,
            window,
            commands: command_rx,
            events: event_tx,
            config: None,
            outstanding: 0,
            failures: 0,
            shared,
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
    endpoint: String,
    client: Rpc,
    options: ClientOptions,
    window: u32,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    /// The configuration in force; its `start_index` is the next index to deliver.
    config: Option<pb::SampleConfig>,
    /// Batches the daemon owes: credits granted and not yet answered.
    outstanding: u32,
    /// Consecutive failed attempts.
    failures: u32,
    /// Shared-memory slots asked for; `None`: batches inside the messages.
    shared: Option<u32>,
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
            if self.failures > 0 {
                let delay = self.options.backoff(self.failures);
                tracing::info!(
                    endpoint = %self.endpoint,
                    attempt = self.failures,
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
                End::Reported | End::WithoutSharedMemory => {}
                End::Failed(status) => self.fail(status),
            }
        }
    }

    /// Applies a command while no stream is open.
    fn apply(&mut self, command: Command) {
        match command {
            Command::Configure(config) => {
                self.config = Some(*config);
                self.outstanding = self.window;
            }
            Command::Credit => self.outstanding = self.outstanding.saturating_add(1),
        }
    }

    /// Records a failure: retry later, or report it and wait for a new configuration.
    fn fail(&mut self, status: Status) {
        let config_id = self.config.as_ref().map_or(0, |c| c.config_id);
        if is_retryable(&status) && self.failures < self.options.max_attempts {
            self.failures += 1;
            tracing::warn!(endpoint = %self.endpoint, %status, "stream failed");
            return;
        }
        let error = final_error(&self.endpoint, status, self.failures + 1);
        self.report(config_id, error);
    }

    fn report(&mut self, config_id: u64, error: ClientError) {
        tracing::warn!(endpoint = %self.endpoint, %error, "stream failed for good");
        let _ = self.events.send(Event::Failed { config_id, error });
        self.config = None;
        self.failures = 0;
    }

    /// Opens one Sample stream and pumps it until it ends.
    async fn connection(&mut self) -> End {
        let Some(config) = self.config.clone() else {
            return End::Reported;
        };
        let (requests, request_rx) = mpsc::unbounded_channel();
        let _ = requests.send(pb::SampleRequest {
            config: Some(config),
            credits: self.outstanding,
            shared_memory: self.shared.map(|slots| pb::SharedMemoryRequest { slots }),
            released: Vec::new(),
        });
        let mut client = self.client.clone();
        let mut inbound = match client
            .sample(UnboundedReceiverStream::new(request_rx))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return End::Failed(status),
        };
        let mut assembler = Assembler::new(self.options.max_batch_bytes);
        let mut slots = SharedSlots::new(self.shared.unwrap_or(0), self.options.max_batch_bytes);
        let (releases, mut released) = mpsc::unbounded_channel::<u32>();
        loop {
            tokio::select! {
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
                    Some(Command::Credit) => {
                        self.outstanding = self.outstanding.saturating_add(1);
                        let _ = requests.send(pb::SampleRequest {
                            credits: 1,
                            ..pb::SampleRequest::default()
                        });
                    }
                    Some(Command::Configure(config)) => {
                        self.outstanding = self.window;
                        self.config = Some((*config).clone());
                        let _ = requests.send(pb::SampleRequest {
                            config: Some(*config),
                            credits: self.window,
                            ..pb::SampleRequest::default()
                        });
                    }
                },
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        // A batch completes from one shared-memory message or from its parts.
                        let received = if message.shared.is_some() {
                            match slots.batch(message, &releases) {
                                Ok(done) => Ok(Some(done)),
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
                        match received {
                            Ok(None) => {}
                            Ok(Some((config_id, batch))) => {
                                if let Err(reason) = self.deliver(config_id, batch) {
                                    return self.protocol_error(config_id, reason);
                                }
                            }
                            Err(reason) => {
                                let config_id = self.config.as_ref().map_or(0, |c| c.config_id);
                                return self.protocol_error(config_id, reason);
                            }
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

    /// Reports a protocol violation of the daemon for `config_id`.
    fn protocol_error(&mut self, config_id: u64, reason: String) -> End {
        let error = ClientError::Protocol {
            endpoint: self.endpoint.clone(),
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
            tracing::warn!(endpoint = %self.endpoint, "{explanation}; going on without shared memory");
            self.shared = None;
            return End::WithoutSharedMemory;
        }
        let config_id = self.config.as_ref().map_or(0, |c| c.config_id);
        let error = ClientError::SharedMemory {
            endpoint: self.endpoint.clone(),
            reason: explanation,
        };
        self.report(config_id, error);
        End::Reported
    }

    /// Hands a batch to the consumer if it belongs to the configuration in force.
    fn deliver(&mut self, config_id: u64, batch: Batch) -> Result<(), String> {
        let Some(config) = self.config.as_mut() else {
            return Ok(());
        };
        if config_id != config.config_id {
            // Sent before the daemon saw the new configuration.
            return Ok(());
        }
        let expected = config.start_index.unwrap_or(0);
        if batch.index != expected {
            return Err(format!(
                "expected batch {expected}, received batch {}",
                batch.index
            ));
        }
        config.start_index = Some(expected.saturating_add(config.index_stride.max(1)));
        self.outstanding = self.outstanding.saturating_sub(1);
        self.failures = 0;
        let _ = self.events.send(Event::Batch { config_id, batch });
        Ok(())
    }
}
