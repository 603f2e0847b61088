//! Batches from one or several patchflow daemons, through `patchflow-client`.
//!
//! Batch `k` of a stream depends only on the dataset, the stream configuration and `k`, on
//! every daemon, so the remote source serves exactly the batches [`crate::InProcessSource`]
//! would for the same store and seed. Each PGPS stage change reconfigures the stream from the
//! next batch on; a resumed run opens the stream at its first batch index. In `rpss` mode the
//! patch changes every iteration, so every batch is a reconfiguration and the client's own
//! read-ahead is lost (the trainer's prefetch thread still overlaps one batch with the step);
//! sampling in process suits that ablation better.

use std::collections::BTreeMap;
use std::sync::Arc;

use patchflow_client::{
    Augmentation, Batch, Client, ClientError, ClientOptions, ImageDtype, LabelDtype, Policy,
    StreamConfig,
};
use patchflow_sampler::{AugmentSpec, OutputDType};
use tokio::runtime::Runtime;

use crate::TrainerError;
use crate::data::{
    BatchSource, CaseSummary, HostBatch, LabelKind, SourceInfo, StreamSetup, Volume, VolumeLoader,
};
use crate::plan::StepSpec;

/// Streams training batches from daemons.
///
/// Every source forked from one, and its volume loader, share one client and one runtime: the
/// client's connections run as tasks of the runtime they were opened on, so a runtime of its
/// own per fork would cut the others' streams when that fork ends. The runtime is the last
/// field, dropped after the streams it drives.
pub struct RemoteSource {
    client: Client,
    endpoints: Vec<String>,
    info: SourceInfo,
    setup: Option<StreamSetup>,
    stream: Option<patchflow_client::BatchStream>,
    runtime: Arc<Runtime>,
}

fn runtime(endpoints: &[String]) -> Result<Runtime, TrainerError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("patchflow-client")
        .enable_all()
        .build()
        .map_err(|e| {
            daemon_err(
                endpoints,
                format!("could not start the client runtime: {e}"),
            )
        })
}

/// A client error, with the daemons it concerns.
fn remote_err(endpoints: &[String], source: ClientError) -> TrainerError {
    TrainerError::Remote {
        endpoint: endpoints.join(", "),
        source,
    }
}

/// An answer the trainer cannot use, with the daemons it came from.
fn daemon_err(endpoints: &[String], reason: impl Into<String>) -> TrainerError {
    TrainerError::Daemon {
        endpoint: endpoints.join(", "),
        reason: reason.into(),
    }
}

fn wire_dtype(d: OutputDType) -> ImageDtype {
    match d {
        OutputDType::F32 => ImageDtype::F32,
        OutputDType::F16 => ImageDtype::F16,
        OutputDType::BF16 => ImageDtype::Bf16,
    }
}

fn host_dtype(d: ImageDtype) -> Option<OutputDType> {
    match d {
        ImageDtype::F32 => Some(OutputDType::F32),
        ImageDtype::F16 => Some(OutputDType::F16),
        ImageDtype::Bf16 => Some(OutputDType::BF16),
        ImageDtype::Unspecified => None,
    }
}

fn to_host(b: Batch) -> Result<HostBatch, TrainerError> {
    let dtype = host_dtype(b.dtype).ok_or_else(|| TrainerError::BadBatch {
        index: b.index,
        reason: "the image element type is unspecified".into(),
    })?;
    let label_kind = match b.label_dtype {
        LabelDtype::U8 => LabelKind::U8,
        LabelDtype::U16 => LabelKind::U16,
        LabelDtype::Unspecified => {
            return Err(TrainerError::BadBatch {
                index: b.index,
                reason: "the label element type is unspecified".into(),
            });
        }
    };
    Ok(HostBatch {
        index: b.index,
        patch: b.patch,
        batch: b.batch_size,
        channels: b.channels,
        dtype,
        image: b.image,
        label_kind,
        label: b.label,
    })
}

impl RemoteSource {
    /// Connects to `endpoints` (all serving `dataset`) with the default client options (no
    /// token, system TLS roots for `https://`) and describes the dataset.
    pub fn connect(endpoints: &[String], dataset: &str) -> Result<RemoteSource, TrainerError> {
        RemoteSource::connect_with(endpoints, dataset, ClientOptions::default())
    }

    /// Connects to `endpoints` (all serving `dataset`) with `options` (token, TLS, prefetch,
    /// reconnection) and describes the dataset.
    pub fn connect_with(
        endpoints: &[String],
        dataset: &str,
        options: ClientOptions,
    ) -> Result<RemoteSource, TrainerError> {
        if endpoints.is_empty() {
            return Err(TrainerError::config("server", "no daemon address given"));
        }
        let runtime = runtime(endpoints)?;
        let client = runtime
            .block_on(Client::connect(endpoints.iter().cloned(), options))
            .map_err(|e| remote_err(endpoints, e))?;
        let desc = runtime
            .block_on(client.describe(dataset))
            .map_err(|e| remote_err(endpoints, e))?;
        let ignore_label = u16::try_from(desc.ignore_label).map_err(|_| {
            daemon_err(
                endpoints,
                format!("ignore label {} does not fit u16", desc.ignore_label),
            )
        })?;
        let label_names: BTreeMap<u16, String> = desc
            .label_names
            .iter()
            .filter_map(|(&k, v)| u16::try_from(k).ok().map(|k| (k, v.clone())))
            .collect();
        let max_class = desc
            .classes
            .iter()
            .filter_map(|c| u16::try_from(c.value).ok())
            .chain(label_names.keys().copied())
            .filter(|&c| c != ignore_label)
            .max()
            .unwrap_or(0);
        let mut cases = Vec::with_capacity(desc.cases.len());
        for c in &desc.cases {
            let shape: [usize; 3] = match c.shape.as_slice() {
                &[z, y, x] => [z, y, x].map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
                other => {
                    return Err(daemon_err(
                        endpoints,
                        format!("case {} has shape {other:?}, not [z, y, x]", c.id),
                    ));
                }
            };
            let spacing: [f64; 3] = match c.spacing.as_slice() {
                &[z, y, x] => [z, y, x],
                other => {
                    return Err(daemon_err(
                        endpoints,
                        format!("case {} has spacing {other:?}, not [z, y, x]", c.id),
                    ));
                }
            };
            cases.push(CaseSummary {
                id: c.id.clone(),
                shape,
                spacing,
            });
        }
        let info = SourceInfo {
            dataset: desc.name.clone(),
            num_channels: desc.channels.len(),
            num_classes: usize::from(max_class) + 1,
            label_names,
            ignore_label,
            cases,
        };
        Ok(RemoteSource {
            runtime: Arc::new(runtime),
            client,
            endpoints: endpoints.to_vec(),
            info,
            setup: None,
            stream: None,
        })
    }

    fn config_for(&self, setup: &StreamSetup, step: &StepSpec) -> StreamConfig {
        let mut c = StreamConfig::new(
            self.info.dataset.clone(),
            step.patch.to_i64(),
            u32::try_from(step.batch).unwrap_or(u32::MAX),
        );
        c.policy = Policy::ForegroundOversample {
            fraction: setup.oversample,
        };
        c.crops_per_case = u32::try_from(step.crops_per_case.max(1)).unwrap_or(u32::MAX);
        c.dtype = wire_dtype(setup.dtype);
        c.seed = setup.seed;
        c.cases = setup.cases.clone();
        // The daemon augments each item as the in-process sampler does (same preset, same
        // parameters drawn from the seed, batch index and item).
        c.augmentation = setup.augment.then(|| Augmentation {
            preset: AugmentSpec::NNUNET_PRESET.to_string(),
            ..Augmentation::default()
        });
        c
    }
}

impl BatchSource for RemoteSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn start(&mut self, setup: &StreamSetup) -> Result<(), TrainerError> {
        if setup.cases.is_empty() {
            return Err(TrainerError::config(
                "cases",
                "no case to sample from (is every case held out for validation?)",
            ));
        }
        self.setup = Some(setup.clone());
        self.stream = None;
        Ok(())
    }

    fn fetch(&mut self, step: &StepSpec) -> Result<HostBatch, TrainerError> {
        let setup = self.setup.clone().ok_or_else(|| {
            TrainerError::Prefetch("fetch called before start on the remote source".into())
        })?;
        let config = self.config_for(&setup, step);
        let reuse = self
            .stream
            .as_ref()
            .is_some_and(|s| s.next_index() == step.index);
        if reuse {
            if let Some(s) = self.stream.as_mut().filter(|s| s.config() != &config) {
                s.reconfigure(config)
                    .map_err(|e| remote_err(&self.endpoints, e))?;
            }
        } else {
            let s = self
                .runtime
                .block_on(self.client.stream_from(config, step.index))
                .map_err(|e| remote_err(&self.endpoints, e))?;
            self.stream = Some(s);
        }
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| daemon_err(&self.endpoints, "no open stream"))?;
        let batch = self
            .runtime
            .block_on(stream.next())
            .map_err(|e| remote_err(&self.endpoints, e))?;
        to_host(batch)
    }

    fn volumes(&self) -> Result<Box<dyn VolumeLoader>, TrainerError> {
        Ok(Box::new(RemoteVolumes {
            runtime: Arc::clone(&self.runtime),
            client: self.client.clone(),
            endpoints: self.endpoints.clone(),
            info: self.info.clone(),
        }))
    }

    fn fork(&self) -> Result<Box<dyn BatchSource>, TrainerError> {
        Ok(Box::new(RemoteSource {
            runtime: Arc::clone(&self.runtime),
            client: self.client.clone(),
            endpoints: self.endpoints.clone(),
            info: self.info.clone(),
            setup: None,
            stream: None,
        }))
    }

    fn describe(&self) -> String {
        format!("daemons {}", self.endpoints.join(", "))
    }
}

/// Loads whole cases from daemons: a one-item batch whose patch is the case's grid, placed
/// uniformly (which, for a patch equal to the volume, is the volume itself).
pub struct RemoteVolumes {
    client: Client,
    endpoints: Vec<String>,
    info: SourceInfo,
    /// The runtime of the source it came from (see [`RemoteSource`]); dropped last.
    runtime: Arc<Runtime>,
}

impl VolumeLoader for RemoteVolumes {
    fn load(&mut self, id: &str) -> Result<Volume, TrainerError> {
        let case =
            self.info
                .cases
                .iter()
                .find(|c| c.id == id)
                .ok_or_else(|| TrainerError::Case {
                    case: id.to_string(),
                    reason: format!("not in dataset {}", self.info.dataset),
                })?;
        let mut config = StreamConfig::new(
            self.info.dataset.clone(),
            case.shape.map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
            1,
        );
        config.policy = Policy::Uniform;
        config.cases = vec![id.to_string()];
        config.dtype = ImageDtype::F32;
        let batch = self
            .runtime
            .block_on(async {
                let mut s = self.client.stream_from(config, 0).await?;
                s.next().await
            })
            .map_err(|e| remote_err(&self.endpoints, e))?;
        if batch.items.first().map(|i| i.origin) != Some([0, 0, 0]) || batch.patch != case.shape {
            return Err(TrainerError::Case {
                case: id.to_string(),
                reason: "the daemon did not return the whole volume".into(),
            });
        }
        let host = to_host(batch)?;
        let n: usize = case.shape.iter().product();
        if host.image.len() != n * host.channels * 4 || host.dtype != OutputDType::F32 {
            return Err(TrainerError::Case {
                case: id.to_string(),
                reason: format!(
                    "volume of {} image bytes in {:?}, expected {} in f32",
                    host.image.len(),
                    host.dtype,
                    n * host.channels * 4
                ),
            });
        }
        let image: Vec<f32> = host
            .image
            .chunks_exact(4)
            .map(|p| f32::from_le_bytes([p[0], p[1], p[2], p[3]]))
            .collect();
        let label: Vec<u16> = match host.label_kind {
            LabelKind::U8 => host.label.iter().map(|&v| u16::from(v)).collect(),
            LabelKind::U16 => host
                .label
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect(),
        };
        if label.len() != n {
            return Err(TrainerError::Case {
                case: id.to_string(),
                reason: format!("label of {} voxels, expected {n}", label.len()),
            });
        }
        Ok(Volume {
            id: id.to_string(),
            shape: case.shape,
            image,
            channels: host.channels,
            label,
            original: None,
        })
    }
}
