//! Where training batches and validation volumes come from, and the prefetch thread that turns
//! batches into tensors ahead of the training loop.
//!
//! A [`BatchSource`] serves batch `k` of a run for a [`StepSpec`] (patch, batch size, crops per
//! case); batch `k` depends only on the dataset, the [`StreamSetup`] and `k`, so a resumed run
//! sees exactly the batches an uninterrupted one would. Two sources exist:
//! [`InProcessSource`] samples a local store with `patchflow-sampler`, and
//! [`crate::remote::RemoteSource`] streams from one or several daemons. [`Prefetcher`] runs a
//! source on its own thread, a bounded number of batches ahead, converts them to (pinned, on
//! CUDA) tensors and hands them over in order; the time the training loop spends waiting on it
//! is the data wait the trainer reports.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, bounded};
use patchflow_augment::AugmentSpec;
use patchflow_sampler::{BatchRequest, Dataset, OutputDType, Policy, Sampler};
use patchflow_store::{ArrayId, CaseReader, ChunkCache};
use patchflow_volume::{DType, Geometry};
use tch::{Device, Kind, Tensor};

use crate::TrainerError;
use crate::error::TorchContext;
use crate::plan::{StepPlan, StepSpec};

/// A case as the trainer sees it before loading it.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseSummary {
    /// Identifier.
    pub id: String,
    /// Preprocessed grid `[z, y, x]`.
    pub shape: [usize; 3],
    /// Preprocessed spacing `[z, y, x]` in mm.
    pub spacing: [f64; 3],
}

/// What the trainer needs to know about a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceInfo {
    /// Dataset name.
    pub dataset: String,
    /// Image channels.
    pub num_channels: usize,
    /// Output classes of the network, background included: the largest class value + 1.
    pub num_classes: usize,
    /// Class names.
    pub label_names: BTreeMap<u16, String>,
    /// Label value of padding, excluded from the loss and the Dice.
    pub ignore_label: u16,
    /// Cases ordered by id.
    pub cases: Vec<CaseSummary>,
}

impl SourceInfo {
    /// The per-axis median of the cases' spacings (the planner's spacing).
    pub fn median_spacing(&self) -> [f64; 3] {
        let mut out = [1.0; 3];
        for (a, o) in out.iter_mut().enumerate() {
            let mut v: Vec<f64> = self.cases.iter().map(|c| c.spacing[a]).collect();
            v.sort_by(f64::total_cmp);
            if !v.is_empty() {
                let n = v.len();
                *o = if n % 2 == 1 {
                    v[n / 2]
                } else {
                    0.5 * (v[n / 2 - 1] + v[n / 2])
                };
            }
        }
        out
    }
}

/// Settings of a batch stream (the run's training stream, or its validation stream), fixed
/// for the run.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSetup {
    /// Seed of the stream.
    pub seed: u64,
    /// Share of foreground-centred crops (nnU-Net 0.33, PGPS 0.5).
    pub oversample: f64,
    /// Case ids to sample from (the training split, or the validation split).
    pub cases: Vec<String>,
    /// Element type of served images.
    pub dtype: OutputDType,
    /// Apply nnU-Net's default training augmentation to every item.
    pub augment: bool,
}

/// Element type of a label buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelKind {
    /// One byte per voxel.
    U8,
    /// Two bytes per voxel, little-endian.
    U16,
}

/// One batch as bytes: image `[B, C, Z, Y, X]`, label `[B, 1, Z, Y, X]`, little-endian.
#[derive(Clone, Debug)]
pub struct HostBatch {
    /// Batch index.
    pub index: u64,
    /// Patch `[z, y, x]`.
    pub patch: [usize; 3],
    /// Items.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Element type of `image`.
    pub dtype: OutputDType,
    /// Image bytes.
    pub image: Bytes,
    /// Element type of `label`.
    pub label_kind: LabelKind,
    /// Label bytes.
    pub label: Bytes,
}

impl HostBatch {
    /// Checks the buffers against the step asked for and the dataset's channel count.
    pub fn check(&self, step: &StepSpec, channels: usize) -> Result<(), TrainerError> {
        let bad = |reason: String| TrainerError::BadBatch {
            index: self.index,
            reason,
        };
        if self.index != step.index {
            return Err(bad(format!("asked for batch {}", step.index)));
        }
        if self.patch != step.patch.axes() || self.batch != step.batch || self.channels != channels
        {
            return Err(bad(format!(
                "got patch {:?}, batch {}, {} channel(s); asked for patch {:?}, batch {}, {} \
                 channel(s)",
                self.patch,
                self.batch,
                self.channels,
                step.patch.axes(),
                step.batch,
                channels
            )));
        }
        let voxels: usize = self.patch.iter().product();
        let isize = self.dtype.size();
        let lsize = match self.label_kind {
            LabelKind::U8 => 1,
            LabelKind::U16 => 2,
        };
        let want_image = voxels * self.batch * self.channels * isize;
        let want_label = voxels * self.batch * lsize;
        if self.image.len() != want_image || self.label.len() != want_label {
            return Err(bad(format!(
                "image {} bytes, label {} bytes; expected {want_image} and {want_label}",
                self.image.len(),
                self.label.len()
            )));
        }
        Ok(())
    }

    /// The batch as CPU tensors: image in its served kind, label as `uint8` (or `int32` for
    /// `u16` labels). Copies each buffer once.
    pub fn to_tensors(&self) -> Result<(Tensor, Tensor), TrainerError> {
        let [z, y, x] = self.patch.map(|v| v as i64);
        let (b, c) = (self.batch as i64, self.channels as i64);
        let kind = match self.dtype {
            OutputDType::F32 => Kind::Float,
            OutputDType::F16 => Kind::Half,
            OutputDType::BF16 => Kind::BFloat16,
        };
        let image = Tensor::f_from_data_size(&self.image, &[b, c, z, y, x], kind)
            .ctx("image batch to tensor")?;
        let label = match self.label_kind {
            LabelKind::U8 => Tensor::f_from_data_size(&self.label, &[b, 1, z, y, x], Kind::Uint8)
                .ctx("label batch to tensor")?,
            LabelKind::U16 => {
                let widened: Vec<i32> = self
                    .label
                    .chunks_exact(2)
                    .map(|p| i32::from(u16::from_le_bytes([p[0], p[1]])))
                    .collect();
                Tensor::f_from_slice(&widened)
                    .and_then(|t| t.f_reshape([b, 1, z, y, x]))
                    .ctx("label batch to tensor")?
            }
        };
        Ok((image, label))
    }
}

/// Where a preprocessed case came from, for writing predictions on the original grid.
#[derive(Clone, Debug, PartialEq)]
pub struct OriginalGrid {
    /// The source image's grid (shape, spacing, affine).
    pub geometry: Geometry,
    /// `[start, end)` per axis `[z, y, x]` of the crop in source voxels.
    pub crop_box: [[usize; 2]; 3],
}

/// A whole preprocessed case, for validation.
#[derive(Clone, Debug)]
pub struct Volume {
    /// Case id.
    pub id: String,
    /// Grid `[z, y, x]`.
    pub shape: [usize; 3],
    /// Normalised image, `[C, Z, Y, X]` float32.
    pub image: Vec<f32>,
    /// Channels.
    pub channels: usize,
    /// Label map `[Z, Y, X]`.
    pub label: Vec<u16>,
    /// The source grid, when known (local stores).
    pub original: Option<OriginalGrid>,
}

/// Loads whole validation cases.
pub trait VolumeLoader: Send {
    /// Loads case `id`.
    fn load(&mut self, id: &str) -> Result<Volume, TrainerError>;
}

/// A source of training batches.
pub trait BatchSource: Send {
    /// The dataset.
    fn info(&self) -> &SourceInfo;

    /// Fixes the stream settings; called once before the first [`BatchSource::fetch`].
    fn start(&mut self, setup: &StreamSetup) -> Result<(), TrainerError>;

    /// Batch `step.index` for `step`. Called with consecutive indices.
    fn fetch(&mut self, step: &StepSpec) -> Result<HostBatch, TrainerError>;

    /// A loader of whole cases for validation, independent of the batch stream.
    fn volumes(&self) -> Result<Box<dyn VolumeLoader>, TrainerError>;

    /// Another, independent source of the same dataset (for a second stream: the validation
    /// batches); it must be started on its own.
    fn fork(&self) -> Result<Box<dyn BatchSource>, TrainerError>;

    /// A short description for logs ("store /x", "daemons a, b").
    fn describe(&self) -> String;
}

/// Samples a local store in the training process.
pub struct InProcessSource {
    sampler: Sampler,
    info: SourceInfo,
    setup: Option<(StreamSetup, Vec<usize>)>,
}

impl InProcessSource {
    /// Opens the store folder `dir` as dataset `name`, with a chunk cache of `cache_bytes`.
    pub fn open(dir: &Path, name: &str, cache_bytes: u64) -> Result<InProcessSource, TrainerError> {
        let dataset = Arc::new(Dataset::open(name, dir, ChunkCache::new(cache_bytes))?);
        let info = info_of(&dataset);
        Ok(InProcessSource {
            sampler: Sampler::new(dataset),
            info,
            setup: None,
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        self.sampler.dataset()
    }
}

/// Summarises an opened dataset.
pub(crate) fn info_of(ds: &Dataset) -> SourceInfo {
    let max_class = ds
        .classes()
        .into_iter()
        .chain(
            ds.label_names()
                .keys()
                .copied()
                .filter(|&c| c != ds.ignore_label()),
        )
        .max()
        .unwrap_or(0);
    SourceInfo {
        dataset: ds.name().to_string(),
        num_channels: ds.num_channels(),
        num_classes: usize::from(max_class) + 1,
        label_names: ds.label_names().clone(),
        ignore_label: ds.ignore_label(),
        cases: ds
            .cases()
            .iter()
            .map(|c| CaseSummary {
                id: c.meta().id.clone(),
                shape: c.meta().shape,
                spacing: c.meta().spacing,
            })
            .collect(),
    }
}

impl BatchSource for InProcessSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn start(&mut self, setup: &StreamSetup) -> Result<(), TrainerError> {
        let ds = self.sampler.dataset();
        let indices = setup
            .cases
            .iter()
            .map(|id| {
                ds.case_index(id).ok_or_else(|| {
                    TrainerError::config(
                        "cases",
                        format!("case {id:?} is not in dataset {}", ds.name()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if indices.is_empty() {
            return Err(TrainerError::config(
                "cases",
                "no case to sample from (is every case held out for validation?)",
            ));
        }
        self.setup = Some((setup.clone(), indices));
        Ok(())
    }

    fn fetch(&mut self, step: &StepSpec) -> Result<HostBatch, TrainerError> {
        let (setup, cases) = self.setup.as_ref().ok_or_else(|| {
            TrainerError::Prefetch("fetch called before start on the in-process source".into())
        })?;
        let req = BatchRequest {
            patch: step.patch,
            batch: step.batch,
            policy: Policy::ForegroundOversample {
                fraction: setup.oversample,
            },
            crops_per_case: step.crops_per_case.max(1),
            dtype: setup.dtype,
            seed: setup.seed,
            cases: Some(cases.clone()),
            augment: setup.augment.then(AugmentSpec::nnunet_default),
        };
        let b = self.sampler.sample(&req, step.index)?;
        let label_kind = match b.label_dtype {
            DType::U16 => LabelKind::U16,
            _ => LabelKind::U8,
        };
        Ok(HostBatch {
            index: b.index,
            patch: b.patch.axes(),
            batch: b.items.len(),
            channels: self.info.num_channels,
            dtype: b.dtype,
            image: Bytes::from(b.image),
            label_kind,
            label: Bytes::from(b.label),
        })
    }

    fn volumes(&self) -> Result<Box<dyn VolumeLoader>, TrainerError> {
        Ok(Box::new(StoreVolumes {
            dataset: Arc::clone(self.sampler.dataset()),
        }))
    }

    fn fork(&self) -> Result<Box<dyn BatchSource>, TrainerError> {
        Ok(Box::new(InProcessSource {
            sampler: Sampler::new(Arc::clone(self.sampler.dataset())),
            info: self.info.clone(),
            setup: None,
        }))
    }

    fn describe(&self) -> String {
        format!("store {}", self.sampler.dataset().dir().display())
    }
}

/// Loads whole cases from a local store.
pub struct StoreVolumes {
    dataset: Arc<Dataset>,
}

impl StoreVolumes {
    /// Loads from `dataset`.
    pub fn new(dataset: Arc<Dataset>) -> StoreVolumes {
        StoreVolumes { dataset }
    }
}

/// Reads one channel of a case, normalised, into `out` (`product(shape)` floats).
fn read_channel(reader: &CaseReader, c: usize, out: &mut [f32]) -> Result<(), TrainerError> {
    let meta = reader.meta();
    let norm = meta
        .channels
        .get(c)
        .map(|m| m.norm)
        .ok_or_else(|| TrainerError::Case {
            case: meta.id.clone(),
            reason: format!("no image channel {c}"),
        })?;
    let shape = meta.shape;
    let array = ArrayId::Image(c);
    macro_rules! read_as {
        ($t:ty) => {{
            let mut tmp: Vec<$t> = vec![<$t>::default(); out.len()];
            reader.read_box(array, [0, 0, 0], shape, <$t>::default(), &mut tmp)?;
            for (o, v) in out.iter_mut().zip(&tmp) {
                *o = norm.apply(*v as f32);
            }
        }};
    }
    match reader.dtype(array)? {
        DType::U8 => read_as!(u8),
        DType::I8 => read_as!(i8),
        DType::U16 => read_as!(u16),
        DType::I16 => read_as!(i16),
        DType::U32 => read_as!(u32),
        DType::I32 => read_as!(i32),
        DType::F32 => read_as!(f32),
        DType::F64 => read_as!(f64),
    }
    Ok(())
}

/// Reads the label map of a case as `u16`, mapping the case's own ignore label to `ignore`.
fn read_label(reader: &CaseReader, ignore: u16) -> Result<Vec<u16>, TrainerError> {
    let meta = reader.meta();
    let n: usize = meta.shape.iter().product();
    let mut out = vec![0u16; n];
    match reader.dtype(ArrayId::Label)? {
        DType::U8 => {
            let mut tmp = vec![0u8; n];
            reader.read_box(ArrayId::Label, [0, 0, 0], meta.shape, 0u8, &mut tmp)?;
            for (o, v) in out.iter_mut().zip(&tmp) {
                *o = u16::from(*v);
            }
        }
        DType::U16 => {
            reader.read_box(ArrayId::Label, [0, 0, 0], meta.shape, 0u16, &mut out)?;
        }
        other => {
            return Err(TrainerError::Case {
                case: meta.id.clone(),
                reason: format!("labels are stored as {other}, expected u8 or u16"),
            });
        }
    }
    if let Some(own) = meta.ignore_label.filter(|&own| own != ignore) {
        for v in &mut out {
            if *v == own {
                *v = ignore;
            }
        }
    }
    Ok(out)
}

impl VolumeLoader for StoreVolumes {
    fn load(&mut self, id: &str) -> Result<Volume, TrainerError> {
        let idx = self
            .dataset
            .case_index(id)
            .ok_or_else(|| TrainerError::Case {
                case: id.to_string(),
                reason: format!("not in dataset {}", self.dataset.name()),
            })?;
        let reader = self
            .dataset
            .cases()
            .get(idx)
            .ok_or_else(|| TrainerError::Case {
                case: id.to_string(),
                reason: "case index out of range".into(),
            })?;
        let meta = reader.meta();
        let n: usize = meta.shape.iter().product();
        let channels = self.dataset.num_channels();
        let mut image = vec![0f32; n * channels];
        for (c, out) in image.chunks_mut(n.max(1)).enumerate().take(channels) {
            read_channel(reader, c, out)?;
        }
        let mut label = read_label(reader, self.dataset.ignore_label())?;
        self.dataset.clear_outside_mask(idx, &mut image, &mut label);
        Ok(Volume {
            id: id.to_string(),
            shape: meta.shape,
            image,
            channels,
            label,
            original: Some(OriginalGrid {
                geometry: meta.original.clone(),
                crop_box: meta.crop_box,
            }),
        })
    }
}

/// A batch source whose validation cases come from a local store instead (e.g. daemons for
/// training batches, a mounted copy of the store for validation and NIfTI export, which needs
/// each case's original grid).
pub struct WithStoreVolumes<S> {
    inner: S,
    dataset: Arc<Dataset>,
}

impl<S: BatchSource> WithStoreVolumes<S> {
    /// Wraps `inner`; validation cases are read from the store folder `dir`.
    pub fn open(
        inner: S,
        dir: &Path,
        name: &str,
        cache_bytes: u64,
    ) -> Result<WithStoreVolumes<S>, TrainerError> {
        let dataset = Arc::new(Dataset::open(name, dir, ChunkCache::new(cache_bytes))?);
        Ok(WithStoreVolumes { inner, dataset })
    }
}

impl<S: BatchSource> BatchSource for WithStoreVolumes<S> {
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }

    fn start(&mut self, setup: &StreamSetup) -> Result<(), TrainerError> {
        self.inner.start(setup)
    }

    fn fetch(&mut self, step: &StepSpec) -> Result<HostBatch, TrainerError> {
        self.inner.fetch(step)
    }

    fn volumes(&self) -> Result<Box<dyn VolumeLoader>, TrainerError> {
        Ok(Box::new(StoreVolumes::new(Arc::clone(&self.dataset))))
    }

    fn fork(&self) -> Result<Box<dyn BatchSource>, TrainerError> {
        // Batches only: whole cases keep coming from the wrapped store.
        self.inner.fork()
    }

    fn describe(&self) -> String {
        format!(
            "{}; validation from store {}",
            self.inner.describe(),
            self.dataset.dir().display()
        )
    }
}

/// A batch ready for the training loop.
pub struct TensorBatch {
    /// Batch index (global iteration).
    pub index: u64,
    /// The step it was asked for.
    pub step: StepSpec,
    /// Image `[B, C, Z, Y, X]` on the CPU (pinned when the trainer runs on CUDA).
    pub image: Tensor,
    /// Label `[B, 1, Z, Y, X]` on the CPU.
    pub label: Tensor,
    /// Time the source took to produce it.
    pub produce: Duration,
}

/// A copy of `t` in page-locked memory, so that its copy to the CUDA `device` can run
/// asynchronously.
///
/// `Tensor::pin_memory` with a device argument (tch always passes one) makes libtorch print a
/// deprecation warning, twice per call and so twice per batch. This calls the backend operation
/// `pin_memory` itself ends in (`_pin_memory`, same arguments, no warning), and only if that
/// fails the public one.
fn pinned(t: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
    t.f_internal_pin_memory(device)
        .or_else(|_| t.f_pin_memory(device))
}

/// Runs a [`BatchSource`] on its own thread, `depth` batches ahead of the training loop.
pub struct Prefetcher {
    rx: Option<Receiver<Result<TensorBatch, TrainerError>>>,
    handle: Option<JoinHandle<Box<dyn BatchSource>>>,
}

impl Prefetcher {
    /// Starts producing batches `first..end`; `plan.step(k)` is the step of batch `k`. Tensors
    /// are pinned for transfer to `device` when it is a CUDA device.
    pub fn spawn(
        mut source: Box<dyn BatchSource>,
        plan: StepPlan,
        first: u64,
        end: u64,
        depth: usize,
        device: Device,
    ) -> Result<Prefetcher, TrainerError> {
        let (tx, rx) = bounded(depth.max(1));
        let channels = source.info().num_channels;
        let handle = std::thread::Builder::new()
            .name("batch-prefetch".into())
            .spawn(move || {
                for k in first..end {
                    let step = plan.step(k);
                    let t0 = Instant::now();
                    let result = source
                        .fetch(&step)
                        .and_then(|b| {
                            b.check(&step, channels)?;
                            b.to_tensors()
                        })
                        .and_then(|(image, label)| {
                            if device.is_cuda() {
                                let image =
                                    pinned(&image, device).ctx("pinning the image batch")?;
                                let label =
                                    pinned(&label, device).ctx("pinning the label batch")?;
                                Ok((image, label))
                            } else {
                                Ok((image, label))
                            }
                        })
                        .map(|(image, label)| TensorBatch {
                            index: k,
                            step,
                            image,
                            label,
                            produce: t0.elapsed(),
                        });
                    let failed = result.is_err();
                    if tx.send(result).is_err() || failed {
                        break;
                    }
                }
                source
            })
            .map_err(|e| TrainerError::Prefetch(format!("could not start the thread: {e}")))?;
        Ok(Prefetcher {
            rx: Some(rx),
            handle: Some(handle),
        })
    }

    /// The next batch, waiting for it if needed.
    pub fn recv(&mut self) -> Result<TensorBatch, TrainerError> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| TrainerError::Prefetch("the prefetcher was stopped".into()))?;
        rx.recv()
            .map_err(|_| TrainerError::Prefetch("the batch stream ended early".into()))?
    }

    /// Stops the thread and returns the source.
    pub fn stop(mut self) -> Result<Box<dyn BatchSource>, TrainerError> {
        // Dropping the receiver makes the thread's next send fail; it then returns.
        self.rx = None;
        let handle = self
            .handle
            .take()
            .ok_or_else(|| TrainerError::Prefetch("the prefetcher was already stopped".into()))?;
        handle
            .join()
            .map_err(|_| TrainerError::Prefetch("the prefetch thread panicked".into()))
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
