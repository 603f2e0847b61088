//! What a client asks a stream for.

use std::collections::BTreeMap;
use std::time::Duration;

use patchflow_proto::v1 as pb;

use crate::ClientError;
use crate::auth::{Secret, TlsOptions};
use crate::batch::ImageDtype;

/// How crops are placed (see the `SampleConfig` message).
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// nnU-Net oversampling: the last `round(batch * fraction)` items of a batch are centred on
    /// a foreground voxel.
    ForegroundOversample {
        /// Share of forced items in `[0, 1]`.
        fraction: f64,
    },
    /// Class drawn by weight among those present in the case, crop centred on one of its voxels.
    ClassWeights(BTreeMap<u16, f64>),
    /// Uniform crop origin.
    Uniform,
}

/// Configuration of a batch stream. Batch `k` depends only on the dataset, this configuration
/// and `k`, on every daemon and across reconnections.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamConfig {
    /// Dataset name.
    pub dataset: String,
    /// Patch size `[z, y, x]`.
    pub patch: [i64; 3],
    /// Items per batch.
    pub batch_size: u32,
    /// Crop placement.
    pub policy: Policy,
    /// Crops taken from each drawn case.
    pub crops_per_case: u32,
    /// Element type of image buffers.
    pub dtype: ImageDtype,
    /// Seed of the sequence.
    pub seed: u64,
    /// Restrict sampling to these case ids; empty = every case.
    pub cases: Vec<String>,
    /// Augmentation (`preset: "nnunet"` for nnU-Net's defaults); `None` = plain crops.
    pub augmentation: Option<pb::Augmentation>,
}

impl StreamConfig {
    /// A configuration with nnU-Net's defaults: foreground oversampling 0.33, one crop per
    /// case, `f32` images, seed 0, every case.
    pub fn new(dataset: impl Into<String>, patch: [i64; 3], batch_size: u32) -> StreamConfig {
        StreamConfig {
            dataset: dataset.into(),
            patch,
            batch_size,
            policy: Policy::ForegroundOversample { fraction: 0.33 },
            crops_per_case: 1,
            dtype: ImageDtype::F32,
            seed: 0,
            cases: Vec::new(),
            augmentation: None,
        }
    }

    /// The wire message for one daemon: batches `start, start + stride, ...`, tagged `config_id`.
    pub(crate) fn to_wire(&self, start: u64, stride: u64, config_id: u64) -> pb::SampleConfig {
        let policy = match &self.policy {
            Policy::ForegroundOversample { fraction } => {
                pb::sample_config::Policy::Foreground(pb::ForegroundOversample {
                    fraction: *fraction,
                })
            }
            Policy::ClassWeights(weights) => {
                pb::sample_config::Policy::ClassWeights(pb::ClassWeights {
                    weights: weights.iter().map(|(&c, &w)| (u32::from(c), w)).collect(),
                })
            }
            Policy::Uniform => pb::sample_config::Policy::Uniform(pb::Uniform {}),
        };
        pb::SampleConfig {
            dataset: self.dataset.clone(),
            patch_size: self.patch.to_vec(),
            batch_size: self.batch_size,
            policy: Some(policy),
            crops_per_case: self.crops_per_case,
            augmentation: self.augmentation.clone(),
            dtype: self.dtype as i32,
            seed: self.seed,
            cases: self.cases.clone(),
            start_index: Some(start),
            index_stride: stride,
            config_id,
        }
    }
}

/// Whether batches come through shared memory instead of inside the messages (see the proto's
/// `SharedMemoryRequest`): the daemon writes each batch into a file in its shared-memory folder
/// and the client maps it, so no voxel crosses the socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SharedMemory {
    /// For `unix:` and loopback endpoints whose daemon offers it. Where the daemon's files
    /// cannot be opened from this process (another user, another container), the stream falls
    /// back to messages and goes on where it was.
    #[default]
    Auto,
    /// Always; a daemon that does not offer it, or files that cannot be opened, fail the stream.
    On,
    /// Never.
    Off,
}

/// Client behaviour.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Batches requested ahead from each daemon (credits in flight); capped by the daemon's
    /// limit.
    pub prefetch: u32,
    /// How often a stream retries while every daemon is down before it fails (with the last
    /// status, usually `Unavailable`): each round waits the backoff and tries the next daemon
    /// in turn. Failures while another daemon is up move the failed daemon's batches there
    /// at once and count only as one attempt per daemon (a stream also fails after
    /// `max_attempts` × endpoints failures in a row without a batch). [`Client::connect`] and
    /// the unary calls retry an unreachable daemon this many times too.
    ///
    /// [`Client::connect`]: crate::Client::connect
    pub max_attempts: u32,
    /// Wait before the first retry; doubles with every failed attempt. Also the first wait
    /// before a daemon that failed is probed again (its batches move back when it answers).
    pub initial_backoff: Duration,
    /// Longest wait between attempts (and between probes of a failed daemon).
    pub max_backoff: Duration,
    /// Timeout of one connection attempt (and of one probe of a failed daemon).
    pub connect_timeout: Duration,
    /// A daemon that owes batches (credits granted) and sends nothing for this long is taken
    /// for failed: its batches move to another daemon as if its connection had broken. The
    /// longest wait for a batch while at least one daemon is up is thus about this timeout
    /// plus the time a healthy daemon needs for the batch (a daemon that dies outright is
    /// noticed at once, without waiting for it). Must exceed the time a daemon needs to
    /// produce one batch.
    pub batch_timeout: Duration,
    /// Largest batch accepted from a daemon (image + label bytes).
    pub max_batch_bytes: u64,
    /// Bearer token sent with every call (`authorization: Bearer <token>`), for daemons that
    /// require one.
    pub token: Option<Secret>,
    /// TLS settings for `https://` endpoints. When any field is set, endpoints given without a
    /// scheme use TLS too, and `http://` endpoints are refused.
    pub tls: TlsOptions,
    /// Shared-memory delivery for daemons on this host.
    pub shared_memory: SharedMemory,
    /// Batches the caller may hold at once (not yet dropped) on a shared-memory stream: each one
    /// keeps a slot, and the daemon is given `prefetch + held_batches` slots. A caller holding
    /// more stalls its stream until it drops some.
    pub held_batches: u32,
    /// Ask daemons for the compact wire form (proto `WireOptions`): items of plain crops whose
    /// cases are stored in a narrow integer type travel in it and are normalised here, label
    /// buffers travel zstd-compressed. The batches handed out are the same to the bit; the
    /// bytes on the network shrink (a CT patch requested as `f32` to a half or less, labels
    /// many times over) at the price of the conversion on this side. On by default; batches
    /// written into shared memory are never compact.
    pub compact: bool,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            prefetch: 4,
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            batch_timeout: Duration::from_secs(60),
            max_batch_bytes: 4 << 30,
            token: None,
            tls: TlsOptions::default(),
            shared_memory: SharedMemory::Auto,
            held_batches: 4,
            compact: true,
        }
    }
}

impl ClientOptions {
    /// Wait before attempt `attempt` (1-based) of a reconnection.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    pub(crate) fn check(&self) -> Result<(), ClientError> {
        if self.prefetch == 0 {
            return Err(ClientError::Config {
                field: "prefetch",
                reason: "must be at least 1".into(),
            });
        }
        if self.batch_timeout.is_zero() {
            return Err(ClientError::Config {
                field: "batch_timeout",
                reason: "must be above zero".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = ClientOptions {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..ClientOptions::default()
        };
        let waits: Vec<u128> = (1..=6).map(|a| o.backoff(a).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(o.backoff(200), Duration::from_secs(1));
    }

    #[test]
    fn wire_config_carries_every_field() {
        let mut c = StreamConfig::new("ds", [32, 64, 64], 2);
        c.policy = Policy::ClassWeights(BTreeMap::from([(0, 1.0), (3, 2.0)]));
        c.cases = vec!["a".into()];
        c.seed = 9;
        let w = c.to_wire(5, 3, 7);
        assert_eq!(w.patch_size, vec![32, 64, 64]);
        assert_eq!(w.start_index, Some(5));
        assert_eq!(w.index_stride, 3);
        assert_eq!(w.config_id, 7);
        assert_eq!(w.seed, 9);
        assert!(w.augmentation.is_none());
        match w.policy {
            Some(pb::sample_config::Policy::ClassWeights(cw)) => {
                assert_eq!(cw.weights.get(&3), Some(&2.0));
            }
            other => panic!("unexpected policy {other:?}"),
        }
    }
}
