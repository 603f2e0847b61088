//! Batches in their compact wire form: plain crops whose image stays in the case's stored
//! integer type, for a receiver that normalises it itself.
//!
//! A batch sent over a network costs its bytes: a 128³ patch is 8 MiB as `f32` but 4 MiB as
//! the `i16` a CT is stored in (2 MiB as `u8`). An item qualifies when the request has no
//! augmentation, its case has no outside-mask marker, and every channel of the case is stored
//! in one integer type narrower than the requested output. Such an item's channels are copied as
//! stored, and only the part of the patch inside the volume
//! ([`patchflow_volume::convert::inside`] of the item's origin and the case's shape), its label
//! too: padding does not travel. The receiver applies the case's normalisation with
//! [`patchflow_volume::convert::convert_box`], the code the sampler itself converts with, and so
//! gets the bits [`Sampler::sample`] would have served; it fills the rest of the label with the
//! ignore label. Other items are served as usual.
//!
//! It owns the choice of form and the compact fill; it must not encode messages (the server
//! does).

use patchflow_store::ArrayId;
use patchflow_volume::convert::{STORED_TYPES, inside, region_voxels, sized};
use patchflow_volume::{DType, Normalization};
use rayon::prelude::*;

use crate::SamplerError;
use crate::request::{Batch, BatchRequest};
use crate::sampler::{FillTask, Sampler, too_large};

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
    /// The batch. The first [`CompactBatch::image_len`] bytes of its image hold the items one
    /// after the other, item `i` taking, when it is stored, `C` times the voxels of its region
    /// inside the volume in `stored[i].dtype` (channel after channel, each region row-major),
    /// and `C * Z * Y * X` elements of `batch.dtype` otherwise. The first
    /// [`CompactBatch::label_len`] bytes of its label likewise: a stored item's region only (the
    /// rest of the patch is the ignore label), a served item's whole patch.
    pub batch: Batch,
    /// Per item: how it is stored, `None` when it is served.
    pub stored: Vec<Option<StoredItem>>,
    /// Bytes of `batch.image` the items take (a prefix: the buffer may be longer).
    pub image_len: usize,
    /// Bytes of `batch.label` the items take (a prefix).
    pub label_len: usize,
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
        if !STORED_TYPES.contains(&first)
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
            let (image_len, label_len) = (batch.image.len(), batch.label.len());
            return Ok(CompactBatch {
                batch,
                stored,
                image_len,
                label_len,
            });
        }
        let items = self.plan(req, index)?;
        let stored: Vec<Option<StoredItem>> = items
            .iter()
            .map(|m| self.stored_form(req, m.case))
            .collect();
        let ds = self.dataset();
        let voxels = usize::try_from(req.patch.voxels()).map_err(|_| too_large(self, req))?;
        let channels = ds.num_channels();
        let label_size = ds.label_dtype().size();
        // Per item: (image bytes, label bytes). A stored item carries its region inside the
        // volume only, in both buffers.
        let sizes: Vec<(usize, usize)> = stored
            .iter()
            .zip(&items)
            .map(|(form, meta)| match form {
                Some(s) => {
                    let inside = region_voxels(&inside(meta.origin, req.patch.axes(), s.shape));
                    (inside * s.dtype.size() * channels, inside * label_size)
                }
                None => (voxels * req.dtype.size() * channels, voxels * label_size),
            })
            .collect();
        let image_len = sizes.iter().map(|s| s.0).sum::<usize>();
        let label_len = sizes.iter().map(|s| s.1).sum::<usize>();
        // The buffers keep the served sizes (which bound the compact ones), so that recycled
        // buffers are never extended, and cleared, batch after batch; the compact bytes are a
        // prefix, every byte of which is written by a run or a pad.
        let (served_image, served_label) = self.buffer_sizes(req)?;
        let mut image = sized(image, served_image.max(image_len), false);
        let mut label = sized(label, served_label.max(label_len), false);
        let mut tasks: Vec<FillTask<'_>> = Vec::with_capacity(req.batch * (channels + 1));
        let (mut images, mut labels): (&mut [u8], &mut [u8]) =
            (&mut image[..image_len], &mut label[..label_len]);
        for (item, (form, &(image_len, label_len))) in stored.iter().zip(&sizes).enumerate() {
            let (this, tail) = std::mem::take(&mut images).split_at_mut(image_len);
            images = tail;
            let channel_bytes = this.len() / channels.max(1);
            if channel_bytes > 0 {
                for (c, out) in this.chunks_mut(channel_bytes).enumerate() {
                    tasks.push(FillTask {
                        item,
                        array: ArrayId::Image(c),
                        out,
                        stored: form.is_some(),
                    });
                }
            }
            let (out, tail) = std::mem::take(&mut labels).split_at_mut(label_len);
            labels = tail;
            if !out.is_empty() {
                tasks.push(FillTask {
                    item,
                    array: ArrayId::Label,
                    out,
                    stored: form.is_some(),
                });
            }
        }
        tasks
            .into_par_iter()
            .try_for_each(|task| self.fill(req, &items, task))?;
        if ds.any_outside_mask() {
            // Only served items can have a marker (stored ones never do).
            let (mut image_at, mut label_at) = (0, 0);
            for (item, (form, &(image_len, label_len))) in stored.iter().zip(&sizes).enumerate() {
                if form.is_none() {
                    self.clear_item_outside(
                        req,
                        &items[item],
                        &mut image[image_at..image_at + image_len],
                        &mut label[label_at..label_at + label_len],
                    );
                }
                image_at += image_len;
                label_at += label_len;
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
            image_len,
            label_len,
        })
    }
}
