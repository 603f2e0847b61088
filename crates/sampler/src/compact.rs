//! Batches in their compact wire form: plain crops whose image stays in the case's stored
//! integer type, for a receiver that normalises it itself.
//!
//! A batch sent over a network costs its bytes: a 128³ patch is 8 MiB as `f32` but 4 MiB as
//! the `i16` a CT is stored in (2 MiB as `u8`). An item qualifies when the request has no
//! augmentation, its case has no outside-mask marker, and every channel of the case is stored
//! in one integer type narrower than the requested output. Such an item's channels are copied as
//! stored (the bytes where the patch leaves the volume are 0 and carry no meaning); the receiver
//! applies the case's normalisation with [`patchflow_volume::convert::convert_box`], the code the
//! sampler itself converts with, and so gets the bits [`Sampler::sample`] would have served.
//! Other items are served as usual. Labels are always served as usual.
//!
//! It owns the choice of form and the compact fill; it must not encode messages (the server
//! does).

use patchflow_store::ArrayId;
use patchflow_volume::{DType, Normalization};
use rayon::prelude::*;

use crate::SamplerError;
use crate::request::{Batch, BatchRequest};
use crate::sampler::{FillTask, Sampler, sized, too_large};

/// How one item of a compact batch is stored: its channels as the case stores them, to be
/// normalised by the receiver.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredItem {
    /// Element type of every channel of the item.
    pub dtype: DType,
    /// Normalisation of each channel, in channel order.
    pub norms: Vec<Normalization>,
    /// Voxel grid of the case, `[z, y, x]`: with the item's origin it says which voxels of the
    /// patch are padding.
    pub shape: [usize; 3],
}

/// A batch whose items are either served (as [`Sampler::sample`] gives them) or stored.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactBatch {
    /// The batch. Its image holds the items one after the other, item `i` taking
    /// `C * Z * Y * X` elements of `stored[i].dtype` when it is stored and of `batch.dtype`
    /// otherwise; its label is as served.
    pub batch: Batch,
    /// Per item: how it is stored, `None` when it is served.
    pub stored: Vec<Option<StoredItem>>,
}

impl Sampler {
    /// The form an item of `case` takes in a compact batch of `req` (see the module's
    /// documentation); `None` when it is served as usual.
    pub fn stored_form(&self, req: &BatchRequest, case: usize) -> Option<StoredItem> {
        if req.augment.is_some() {
            return None;
        }
        let view = self.case(case).ok()?;
        if view.info.outside.is_some() {
            return None;
        }
        let (first, _) = *view.info.channels.first()?;
        let integer = matches!(first, DType::U8 | DType::I8 | DType::U16 | DType::I16);
        if !integer
            || first.size() >= req.dtype.size()
            || view.info.channels.iter().any(|&(d, _)| d != first)
        {
            return None;
        }
        Some(StoredItem {
            dtype: first,
            norms: view.info.channels.iter().map(|&(_, n)| n).collect(),
            shape: view.reader.meta().shape,
        })
    }

    /// Batch `index` of `req` in compact form, into the given buffers (reused when large
    /// enough). The same items, placement and labels as [`Sampler::sample`]; the image of every
    /// qualifying item in its stored type.
    pub fn sample_compact_into(
        &self,
        req: &BatchRequest,
        index: u64,
        image: Vec<u8>,
        label: Vec<u8>,
    ) -> Result<CompactBatch, SamplerError> {
        if req.augment.is_some() {
            // Augmented items are never stored: the batch is the served one.
            let batch = self.sample_into(req, index, image, label)?;
            let stored = vec![None; batch.items.len()];
            return Ok(CompactBatch { batch, stored });
        }
        let items = self.plan(req, index)?;
        let stored: Vec<Option<StoredItem>> = items
            .iter()
            .map(|m| self.stored_form(req, m.case))
            .collect();
        let ds = self.dataset();
        let voxels = usize::try_from(req.patch.voxels()).map_err(|_| too_large(self, req))?;
        let channels = ds.num_channels();
        let item_bytes = |form: &Option<StoredItem>| {
            let elem = form.as_ref().map_or(req.dtype.size(), |s| s.dtype.size());
            voxels * elem * channels
        };
        let image_bytes = stored.iter().map(item_bytes).sum::<usize>();
        let label_item = voxels * ds.label_dtype().size();
        // Every byte is written by a run or a pad, as for plain crops.
        let mut image = sized(image, image_bytes, false);
        let mut label = sized(label, label_item * req.batch, false);
        let mut tasks: Vec<FillTask<'_>> = Vec::with_capacity(req.batch * (channels + 1));
        let mut rest: &mut [u8] = &mut image;
        for (item, form) in stored.iter().enumerate() {
            let (this, tail) = rest.split_at_mut(item_bytes(form));
            rest = tail;
            let channel_bytes = this.len() / channels.max(1);
            if channel_bytes == 0 {
                continue;
            }
            for (c, out) in this.chunks_mut(channel_bytes).enumerate() {
                tasks.push(FillTask {
                    item,
                    array: ArrayId::Image(c),
                    out,
                    stored: form.is_some(),
                });
            }
        }
        if label_item > 0 {
            for (item, out) in label.chunks_mut(label_item).enumerate() {
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
            // Only served items can have a marker (stored ones never do).
            let mut offset = 0;
            for (item, form) in stored.iter().enumerate() {
                let len = item_bytes(form);
                if form.is_none() {
                    let label = &mut label[item * label_item..(item + 1) * label_item];
                    self.clear_item_outside(
                        req,
                        &items[item],
                        &mut image[offset..offset + len],
                        label,
                    );
                }
                offset += len;
            }
        }
        Ok(CompactBatch {
            batch: Batch {
                index,
                patch: req.patch,
                dtype: req.dtype,
                label_dtype: ds.label_dtype(),
                image,
                label,
                items,
            },
            stored,
        })
    }
}
