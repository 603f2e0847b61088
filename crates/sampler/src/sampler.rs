//! Batch assembly: validation, placement of every item, and the parallel fill of the batch
//! buffers straight from the store's chunks.

use std::sync::Arc;

use patchflow_store::ArrayId;
use patchflow_volume::DType;
use patchflow_volume::convert::{inside, sized};
use rayon::prelude::*;

use crate::SamplerError;
use crate::augmented::{ItemTask, ScratchPool};
use crate::convert::{ImageRuns, LabelRuns, StoredRuns};
use crate::dataset::{CaseRef, Dataset};
use crate::placement::{cases_per_batch, is_forced, slot_of_item};
use crate::plan::{CaseView, place_item, present_weights};
use crate::request::{Batch, BatchRequest, ItemMeta, Limits, Policy};
use crate::rng::StreamKind;
use crate::visit::visit_into;

/// Assembles batches from a [`Dataset`].
///
/// Batch `index` of a stream depends only on `(dataset, request, index)`: every decision draws
/// from a random stream keyed by `(seed, index, slot or item)`, and the voxels of an item do not
/// depend on which thread converts them.
///
/// A batch draws `ceil(batch / crops_per_case)` cases uniformly with replacement from the
/// request's case list (all cases by default), as nnU-Net does; item `i` comes from draw
/// `i / crops_per_case`. Each item then draws its class, voxel and origin from its own stream.
///
/// With augmentation ([`BatchRequest::augment`]), each item reads the larger source region its
/// rotation and scaling need, normalised to `f32`, applies the drawn transforms and converts the
/// result to the served type; the working buffers are pooled and reused across batches.
#[derive(Clone, Debug)]
pub struct Sampler {
    dataset: Arc<Dataset>,
    pool: Arc<ScratchPool>,
}

/// One unit of parallel work: one image channel or the label of one item.
pub(crate) struct FillTask<'a> {
    pub item: usize,
    pub array: ArrayId,
    pub out: &'a mut [u8],
    /// Image channels copied in their stored element type, not normalised (see
    /// [`Sampler::sample_compact_into`]).
    pub stored: bool,
}

impl Sampler {
    /// A sampler over `dataset`.
    pub fn new(dataset: Arc<Dataset>) -> Sampler {
        Sampler {
            dataset,
            pool: Arc::default(),
        }
    }

    /// The dataset sampled from.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Checks `req` against the dataset and against `limits`.
    ///
    /// Errors are [`SamplerError::InvalidRequest`] (naming the field; for the augmentation
    /// `"augment"`, with the offending sub-field and its limits in the reason) or
    /// [`SamplerError::LimitExceeded`] (naming the measure and the limit). With augmentation, the
    /// largest source region an item can need (all channels as `f32` plus labels) must also fit
    /// `max_batch_bytes`: each worker holds one. A request that passes can be served by
    /// [`Sampler::sample`] for every batch index, barring I/O errors.
    pub fn validate(&self, req: &BatchRequest, limits: &Limits) -> Result<(), SamplerError> {
        self.check_shape(req)?;
        if req.batch > limits.max_batch {
            return Err(SamplerError::LimitExceeded {
                what: "batch",
                value: req.batch as u64,
                limit: limits.max_batch as u64,
            });
        }
        let voxels = req.patch.voxels();
        if voxels > limits.max_patch_voxels {
            return Err(SamplerError::LimitExceeded {
                what: "patch voxels",
                value: voxels,
                limit: limits.max_patch_voxels,
            });
        }
        let bytes = self.batch_bytes(req);
        if bytes > limits.max_batch_bytes {
            return Err(SamplerError::LimitExceeded {
                what: "batch bytes",
                value: bytes,
                limit: limits.max_batch_bytes,
            });
        }
        if let Some(spec) = &req.augment {
            // Each worker holds one item's source region; it must fit the batch byte budget.
            let region = box_voxels(spec.max_source_shape(req.patch.axes()));
            let per_voxel =
                self.dataset.num_channels() as u64 * 4 + self.dataset.label_dtype().size() as u64;
            let bytes = region.saturating_mul(per_voxel);
            if bytes > limits.max_batch_bytes {
                return Err(SamplerError::LimitExceeded {
                    what: "augmentation source region bytes",
                    value: bytes,
                    limit: limits.max_batch_bytes,
                });
            }
        }
        self.check_policy(req)
    }

    /// Bytes of image plus label of one batch of `req` (saturating at `u64::MAX`).
    pub fn batch_bytes(&self, req: &BatchRequest) -> u64 {
        let voxels = u128::from(req.patch.voxels());
        let per_item = voxels
            * (self.dataset.num_channels() as u128 * req.dtype.size() as u128
                + self.dataset.label_dtype().size() as u128);
        u64::try_from(per_item * req.batch as u128).unwrap_or(u64::MAX)
    }

    /// Assembles batch number `index` of a stream with `req`.
    ///
    /// Deterministic: the result depends only on (dataset, `req`, `index`), never on the thread
    /// count. Items are placed and filled in parallel on the current rayon pool (callers install
    /// their own pool). Limits are not checked here; servers call [`Sampler::validate`] first.
    pub fn sample(&self, req: &BatchRequest, index: u64) -> Result<Batch, SamplerError> {
        self.sample_into(req, index, Vec::new(), Vec::new())
    }

    /// [`Sampler::sample`] into the given buffers (their contents are discarded; their
    /// allocations are reused when large enough). Servers that recycle the buffers of sent
    /// batches avoid a fresh allocation — and its page faults — for every batch.
    pub fn sample_into(
        &self,
        req: &BatchRequest,
        index: u64,
        image: Vec<u8>,
        label: Vec<u8>,
    ) -> Result<Batch, SamplerError> {
        let (image_bytes, label_bytes) = self.buffer_sizes(req)?;
        // Plain crops write every byte of their buffers (runs cover the box exactly, padding
        // included), so recycled buffers keep their old bytes until overwritten instead of
        // being cleared first: a 128³ batch is 21 MB of memset saved.
        let clear = req.augment.is_some();
        let mut image = sized(image, image_bytes, clear);
        let mut label = sized(label, label_bytes, clear);
        let items = self.fill_batch(req, index, &mut image, &mut label)?;
        Ok(Batch {
            index,
            patch: req.patch,
            dtype: req.dtype,
            label_dtype: self.dataset.label_dtype(),
            image,
            label,
            items,
        })
    }

    /// Sizes in bytes of the image and label buffers of a batch of `req`.
    pub fn buffer_sizes(&self, req: &BatchRequest) -> Result<(usize, usize), SamplerError> {
        let ds = &*self.dataset;
        let voxels = usize::try_from(req.patch.voxels()).map_err(|_| too_large(self, req))?;
        let image = voxels
            .checked_mul(req.dtype.size())
            .and_then(|b| b.checked_mul(ds.num_channels()))
            .and_then(|b| b.checked_mul(req.batch))
            .ok_or_else(|| too_large(self, req))?;
        let label = voxels
            .checked_mul(ds.label_dtype().size())
            .and_then(|b| b.checked_mul(req.batch))
            .ok_or_else(|| too_large(self, req))?;
        Ok((image, label))
    }

    /// [`Sampler::sample`] into memory the caller owns (a shared-memory region, say): `image`
    /// and `label` must be exactly [`Sampler::buffer_sizes`] long; whatever they held is
    /// overwritten. Returns the placement of each item.
    pub fn sample_to(
        &self,
        req: &BatchRequest,
        index: u64,
        image: &mut [u8],
        label: &mut [u8],
    ) -> Result<Vec<ItemMeta>, SamplerError> {
        let (image_bytes, label_bytes) = self.buffer_sizes(req)?;
        if image.len() != image_bytes || label.len() != label_bytes {
            return Err(SamplerError::invalid(
                "output buffers",
                format!(
                    "{} + {} bytes given for a batch of {image_bytes} + {label_bytes}",
                    image.len(),
                    label.len()
                ),
            ));
        }
        if req.augment.is_some() {
            image.fill(0);
            label.fill(0);
        }
        self.fill_batch(req, index, image, label)
    }

    /// Plans batch `index` and cuts its items into buffers of the right sizes. Plain crops write
    /// every byte (padding included); augmented items expect zeroed buffers.
    fn fill_batch(
        &self,
        req: &BatchRequest,
        index: u64,
        image: &mut [u8],
        label: &mut [u8],
    ) -> Result<Vec<ItemMeta>, SamplerError> {
        let items = self.plan(req, index)?;
        let ds = &*self.dataset;
        let voxels = usize::try_from(req.patch.voxels()).map_err(|_| too_large(self, req))?;
        let channels = ds.num_channels();
        let image_channel_bytes = voxels * req.dtype.size();
        let label_item_bytes = voxels * ds.label_dtype().size();
        if req.augment.is_some() {
            let item_image_bytes = image_channel_bytes * channels;
            let mut images: Vec<&mut [u8]> = if item_image_bytes == 0 {
                (0..req.batch).map(|_| <&mut [u8]>::default()).collect()
            } else {
                image.chunks_mut(item_image_bytes).collect()
            };
            let tasks: Vec<ItemTask<'_>> = images
                .drain(..)
                .zip(label.chunks_mut(label_item_bytes.max(1)))
                .zip(&items)
                .map(|((image, label), meta)| ItemTask { meta, image, label })
                .collect();
            tasks
                .into_par_iter()
                .try_for_each(|task| self.fill_augmented(req, task))?;
            tracing::trace!(index, items = items.len(), "augmented batch assembled");
            return Ok(items);
        }
        let mut tasks: Vec<FillTask<'_>> = Vec::with_capacity(req.batch * (channels + 1));
        if image_channel_bytes > 0 {
            for (k, out) in image.chunks_mut(image_channel_bytes).enumerate() {
                tasks.push(FillTask {
                    item: k / channels.max(1),
                    array: ArrayId::Image(k % channels.max(1)),
                    out,
                    stored: false,
                });
            }
        }
        if label_item_bytes > 0 {
            for (item, out) in label.chunks_mut(label_item_bytes).enumerate() {
                tasks.push(FillTask {
                    item,
                    array: ArrayId::Label,
                    out,
                    stored: false,
                });
            }
        }
        tasks
            .into_par_iter()
            .try_for_each(|task| self.fill(req, &items, task))?;
        if ds.any_outside_mask() {
            self.clear_outside_mask(req, &items, image, label, voxels);
        }
        tracing::trace!(
            index,
            items = items.len(),
            image_bytes = image.len(),
            label_bytes = label.len(),
            "batch assembled"
        );
        Ok(items)
    }

    /// The placement of batch `index` without reading voxels (except the single label voxels
    /// that a weighted background crop probes), with each item's drawn augmentation.
    pub fn plan(&self, req: &BatchRequest, index: u64) -> Result<Vec<ItemMeta>, SamplerError> {
        self.check_shape(req)?;
        let ds = &*self.dataset;
        let slots = cases_per_batch(req.batch, req.crops_per_case);
        let pool_len = req.cases.as_ref().map_or(ds.cases().len(), Vec::len);
        let chosen: Vec<usize> = (0..slots)
            .map(|slot| {
                let k = crate::rng::stream(req.seed, index, StreamKind::Case, slot as u64)
                    .index(pool_len);
                match &req.cases {
                    Some(list) => list.get(k).copied().unwrap_or(0),
                    None => k,
                }
            })
            .collect();
        let fraction = match req.policy {
            Policy::ForegroundOversample { fraction } => fraction,
            _ => 0.0,
        };
        (0..req.batch)
            .into_par_iter()
            .map(|item| {
                let case = chosen
                    .get(slot_of_item(item, req.crops_per_case))
                    .copied()
                    .unwrap_or(0);
                let view = self.case(case)?;
                let mut rng = crate::rng::stream(req.seed, index, StreamKind::Item, item as u64);
                let forced = is_forced(item, req.batch, fraction);
                let p = place_item(&view, req.patch.axes(), &req.policy, forced, &mut rng)?;
                let augment = req.augment.as_ref().map(|spec| {
                    let key = crate::rng::key(req.seed, index, StreamKind::Augment, item as u64);
                    patchflow_augment::draw(spec, key, req.patch.axes(), ds.num_channels())
                });
                Ok(ItemMeta {
                    case,
                    case_id: view.id().to_string(),
                    origin: p.origin,
                    forced_foreground: p.forced_foreground,
                    class: p.class,
                    augment,
                })
            })
            .collect()
    }

    /// The dataset's cases with their precomputed facts.
    pub(crate) fn case(&self, case: usize) -> Result<CaseRef<'_>, SamplerError> {
        self.dataset.view(case).ok_or_else(|| {
            SamplerError::invalid(
                "cases",
                format!(
                    "case index {case} is out of range (the dataset has {} cases)",
                    self.dataset.cases().len()
                ),
            )
        })
    }

    /// Serves the voxels of plain items outside nnU-Net's non-zero mask as label 0 and image 0
    /// (see the `outside` module); items of cases without a marker are not touched.
    fn clear_outside_mask(
        &self,
        req: &BatchRequest,
        items: &[ItemMeta],
        image: &mut [u8],
        label: &mut [u8],
        voxels: usize,
    ) {
        let ds = &*self.dataset;
        let elem = req.dtype.size();
        let item_image = voxels * elem * ds.num_channels();
        let item_label = voxels * ds.label_dtype().size();
        if item_image == 0 || item_label == 0 {
            return;
        }
        image
            .par_chunks_mut(item_image)
            .zip(label.par_chunks_mut(item_label))
            .zip(items.par_iter())
            .for_each(|((image, label), meta)| self.clear_item_outside(req, meta, image, label));
    }

    /// [`Sampler::clear_outside_mask`] for one plain item: `image` its `C * Z * Y * X` served
    /// elements, `label` its labels.
    pub(crate) fn clear_item_outside(
        &self,
        req: &BatchRequest,
        meta: &ItemMeta,
        image: &mut [u8],
        label: &mut [u8],
    ) {
        let ds = &*self.dataset;
        if let Some(outside) = ds.view(meta.case).and_then(|v| v.info.outside.as_ref()) {
            let voxels = usize::try_from(req.patch.voxels()).unwrap_or(0);
            outside.apply_served(image, req.dtype.size(), voxels, label, ds.label_dtype());
        }
    }

    /// Fills one augmented item with a pooled scratch.
    fn fill_augmented(&self, req: &BatchRequest, task: ItemTask<'_>) -> Result<(), SamplerError> {
        let view = self.case(task.meta.case)?;
        let mut scratch = self.pool.take();
        let result = crate::augmented::fill_item(&self.dataset, view, req, task, &mut scratch);
        self.pool.give(scratch);
        result
    }

    /// Fills one channel or label of one item through `visit_box`: each stored run is converted
    /// straight into the batch buffer.
    pub(crate) fn fill(
        &self,
        req: &BatchRequest,
        items: &[ItemMeta],
        task: FillTask<'_>,
    ) -> Result<(), SamplerError> {
        let meta = items.get(task.item).ok_or_else(|| {
            SamplerError::invalid("batch", format!("item {} has no placement", task.item))
        })?;
        let view = self.case(meta.case)?;
        let reader = view.reader;
        let (origin, patch, out) = (meta.origin, req.patch.axes(), task.out);
        let result = match task.array {
            ArrayId::Image(c) => {
                let Some(&(stored, norm)) = view.info.channels.get(c) else {
                    return Err(SamplerError::Case {
                        case: meta.case_id.clone(),
                        reason: format!("no image channel {c}"),
                    });
                };
                if task.stored {
                    // Only the part inside the volume travels (see the compact module).
                    let (start, lens) = inside_box(origin, patch, view.shape());
                    let runs = StoredRuns {
                        size: stored.size(),
                    };
                    return visit_into(reader, task.array, start, lens, out, &runs)?.map_err(
                        |reason| SamplerError::Case {
                            case: meta.case_id.clone(),
                            reason: format!("reading {}: {reason}", task.array),
                        },
                    );
                }
                macro_rules! image {
                    ($t:ty) => {
                        visit_into(
                            reader,
                            task.array,
                            origin,
                            patch,
                            out,
                            &ImageRuns::<$t>::new(norm, req.dtype),
                        )
                    };
                }
                match stored {
                    DType::U8 => image!(u8),
                    DType::I8 => image!(i8),
                    DType::U16 => image!(u16),
                    DType::I16 => image!(i16),
                    DType::U32 => image!(u32),
                    DType::I32 => image!(i32),
                    DType::F32 => image!(f32),
                    DType::F64 => image!(f64),
                }
            }
            ArrayId::Label => {
                let runs = LabelRuns {
                    stored: view.info.label_dtype,
                    out: self.dataset.label_dtype(),
                    remap: view.info.label_remap,
                };
                if task.stored {
                    let (start, lens) = inside_box(origin, patch, view.shape());
                    visit_into(reader, task.array, start, lens, out, &runs)
                } else {
                    visit_into(reader, task.array, origin, patch, out, &runs)
                }
            }
        };
        result?.map_err(|reason| SamplerError::Case {
            case: meta.case_id.clone(),
            reason: format!("reading {}: {reason}", task.array),
        })
    }

    /// Structural checks that need no limits: counts, the policy's numbers, case indices (the
    /// patch was validated when it was made).
    fn check_shape(&self, req: &BatchRequest) -> Result<(), SamplerError> {
        if req.batch == 0 {
            return Err(SamplerError::invalid("batch", "batch must be at least 1"));
        }
        if req.crops_per_case == 0 {
            return Err(SamplerError::invalid(
                "crops_per_case",
                "crops_per_case must be at least 1",
            ));
        }
        match &req.policy {
            Policy::Uniform => {}
            Policy::ForegroundOversample { fraction } => {
                if !(0.0..=1.0).contains(fraction) {
                    return Err(SamplerError::invalid(
                        "policy.fraction",
                        format!("foreground fraction {fraction} is outside [0, 1]"),
                    ));
                }
            }
            Policy::ClassWeights { weights } => {
                if weights.is_empty() {
                    return Err(SamplerError::invalid(
                        "policy.weights",
                        "class weights are empty",
                    ));
                }
                for (class, w) in weights {
                    if !w.is_finite() || *w < 0.0 {
                        return Err(SamplerError::invalid(
                            "policy.weights",
                            format!(
                                "weight of class {class} is {w}; weights must be finite and >= 0"
                            ),
                        ));
                    }
                }
                if !weights.values().any(|&w| w > 0.0) {
                    return Err(SamplerError::invalid(
                        "policy.weights",
                        "every class weight is 0",
                    ));
                }
            }
        }
        if let Some(spec) = &req.augment {
            spec.validate()
                .map_err(|e| SamplerError::invalid("augment", e.to_string()))?;
        }
        let n = self.dataset.cases().len();
        if let Some(list) = &req.cases {
            if list.is_empty() {
                return Err(SamplerError::invalid("cases", "the case list is empty"));
            }
            if let Some(&bad) = list.iter().find(|&&c| c >= n) {
                return Err(SamplerError::invalid(
                    "cases",
                    format!("case index {bad} is out of range (the dataset has {n} cases)"),
                ));
            }
        }
        Ok(())
    }

    /// Checks of the policy against the dataset's classes: weighted classes must exist, and every
    /// case the request may draw must hold at least one positively weighted class.
    fn check_policy(&self, req: &BatchRequest) -> Result<(), SamplerError> {
        let Policy::ClassWeights { weights } = &req.policy else {
            return Ok(());
        };
        let ds = &*self.dataset;
        let known = ds.classes();
        for &class in weights.keys() {
            let exists = if class == 0 {
                ds.has_background()
            } else {
                known.binary_search(&class).is_ok()
            };
            if !exists {
                return Err(SamplerError::invalid(
                    "policy.weights",
                    format!("class {class} is not present in any case (classes: 0 and {known:?})"),
                ));
            }
        }
        let all: Vec<usize>;
        let pool: &[usize] = match &req.cases {
            Some(list) => list,
            None => {
                all = (0..ds.cases().len()).collect();
                &all
            }
        };
        for &case in pool {
            let view = self.case(case)?;
            if present_weights(&view, weights).is_empty() {
                return Err(SamplerError::invalid(
                    "policy.weights",
                    format!(
                        "case {} ({case}) holds none of the classes with a positive weight",
                        view.id()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Origin and size of the part of a patch at `origin` inside a volume of `shape`.
fn inside_box(origin: [i64; 3], patch: [usize; 3], shape: [usize; 3]) -> ([i64; 3], [usize; 3]) {
    let region = inside(origin, patch, shape);
    let start = std::array::from_fn(|a| origin[a] + region[a].start as i64);
    (start, region.map(|r| r.len()))
}

/// `shape[0] * shape[1] * shape[2]`, saturating (for augmentation source regions, which may
/// exceed a patch).
fn box_voxels(shape: [usize; 3]) -> u64 {
    shape
        .iter()
        .fold(1u64, |acc, &p| acc.saturating_mul(p as u64))
}

/// A batch whose size does not fit in this machine's address space.
pub(crate) fn too_large(sampler: &Sampler, req: &BatchRequest) -> SamplerError {
    SamplerError::LimitExceeded {
        what: "batch bytes",
        value: sampler.batch_bytes(req),
        limit: isize::MAX as u64,
    }
}
