//! nnU-Net's outside-mask marker on the way out.
//!
//! A case ingested with nnU-Net's `use_mask_for_norm` stores a marker value in its label
//! ([`CaseMeta::outside_mask_label`], nnU-Net's −1) where the voxel lies outside the hole-filled
//! non-zero mask. nnU-Net trains on label 0 there (`RemoveLabelTansform(-1, 0)`) and on an image
//! that its z-score left untouched, 0. The store keeps source intensities with the normalisation
//! deferred, so a reader applying it everywhere would serve `-mean / std` instead of 0; this
//! module puts nnU-Net's values back:
//!
//! * plain crops: after the runs are converted, voxels whose label is the marker get label 0
//!   and 0 in every channel with a deferred z-score ([`OutsideMask::apply_served`]);
//! * augmented items, in nnU-Net's order: the source region gets image 0 at the marker in those
//!   channels *before* the spatial transforms ([`OutsideMask::zero_source`]), the marker moves
//!   with the labels through them (nearest neighbour, like any class), and becomes 0 at the end
//!   ([`OutsideMask::clear_label`]).
//!
//! Channels whose normalisation is already applied in the store (the identity map: resampled
//! cases, or nnU-Net's own preprocessed arrays) are left as stored: they already hold nnU-Net's
//! values, 0 outside the mask and whatever resampling blended into its border. CT and
//! unnormalised channels never use the mask in nnU-Net and are served as usual.
//!
//! Cases without a marker never reach this code: the unmasked path keeps no per-voxel branch.

use patchflow_store::CaseMeta;
use patchflow_volume::{DType, NormScheme};

/// What the sampler needs to honour one case's marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OutsideMask {
    /// The marker, as stored and as served before it is cleared (it fits the served label type:
    /// the dataset checks that at open time).
    pub label: u16,
    /// Channels served as 0 at the marker: those with a deferred z-score normalisation.
    pub zero_channels: Vec<usize>,
}

impl OutsideMask {
    /// The marker of a case, `None` when it has none.
    pub(crate) fn of(meta: &CaseMeta) -> Option<OutsideMask> {
        let label = meta.outside_mask_label?;
        let zero_channels = meta
            .channels
            .iter()
            .enumerate()
            .filter(|(_, c)| c.norm.scheme == NormScheme::ZScore && !c.norm.is_identity())
            .map(|(i, _)| i)
            .collect();
        Some(OutsideMask {
            label,
            zero_channels,
        })
    }

    /// Plain item: `image` holds `channels` blocks of `voxels` elements of `elem` bytes (any
    /// served image type: 0.0 is all-zero bytes in each), `label` `voxels` elements of the
    /// served `label_dtype`. Clears the marker to 0 and zeroes the deferred z-score channels
    /// there.
    pub(crate) fn apply_served(
        &self,
        image: &mut [u8],
        elem: usize,
        voxels: usize,
        label: &mut [u8],
        label_dtype: DType,
    ) {
        let block = voxels * elem;
        let mut zero = |i: usize| {
            for &c in &self.zero_channels {
                let start = c * block + i * elem;
                if let Some(bytes) = image.get_mut(start..start + elem) {
                    bytes.fill(0);
                }
            }
        };
        match label_dtype {
            DType::U16 => {
                let marker = self.label.to_le_bytes();
                for (i, l) in label.chunks_exact_mut(2).enumerate() {
                    if *l == marker {
                        l.fill(0);
                        zero(i);
                    }
                }
            }
            _ => {
                let Ok(marker) = u8::try_from(self.label) else {
                    return;
                };
                for (i, l) in label.iter_mut().enumerate() {
                    if *l == marker {
                        *l = 0;
                        zero(i);
                    }
                }
            }
        }
    }

    /// Augmented item before the transforms (or a whole case): `image` holds one `f32` block
    /// of `label.len()` voxels per channel; the deferred z-score channels become 0 where
    /// `label` is the marker.
    pub(crate) fn zero_source<L: MarkerLabel>(&self, image: &mut [f32], label: &[L]) {
        let Some(marker) = L::from_marker(self.label) else {
            return;
        };
        let n = label.len();
        for &c in &self.zero_channels {
            let Some(block) = image.get_mut(c * n..(c + 1) * n) else {
                continue;
            };
            for (v, &l) in block.iter_mut().zip(label) {
                if l == marker {
                    *v = 0.0;
                }
            }
        }
    }

    /// Augmented item, after the transforms: the marker becomes label 0.
    pub(crate) fn clear_label<L: MarkerLabel>(&self, label: &mut [L]) {
        let Some(marker) = L::from_marker(self.label) else {
            return;
        };
        for l in label {
            if *l == marker {
                *l = L::default();
            }
        }
    }
}

/// A served label element (`u8` or `u16`).
pub(crate) trait MarkerLabel: Copy + Default + PartialEq {
    /// The marker in this type, `None` when it does not fit.
    fn from_marker(marker: u16) -> Option<Self>;
}

impl MarkerLabel for u8 {
    fn from_marker(marker: u16) -> Option<u8> {
        u8::try_from(marker).ok()
    }
}

impl MarkerLabel for u16 {
    fn from_marker(marker: u16) -> Option<u16> {
        Some(marker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(zero_channels: Vec<usize>) -> OutsideMask {
        OutsideMask {
            label: 254,
            zero_channels,
        }
    }

    #[test]
    fn served_items_clear_the_marker_and_zero_only_the_listed_channels() {
        // Two channels of four f32 voxels, u8 labels with the marker at voxels 1 and 3.
        let values: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut image: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut label = vec![2u8, 254, 0, 254];
        mask(vec![1]).apply_served(&mut image, 4, 4, &mut label, DType::U8);
        let got: Vec<f32> = image
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got, vec![1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 7.0, 0.0]);
        assert_eq!(label, vec![2, 0, 0, 0]);

        // u16 labels and a two-byte image type.
        let mut image = vec![0xAAu8; 2 * 3];
        let mut label: Vec<u8> = [7u16, 254, 255]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        mask(vec![0]).apply_served(&mut image, 2, 3, &mut label, DType::U16);
        assert_eq!(image, vec![0xAA, 0xAA, 0, 0, 0xAA, 0xAA]);
        assert_eq!(label, vec![7, 0, 0, 0, 255, 0]);
    }

    #[test]
    fn sources_are_zeroed_before_and_labels_cleared_after() {
        let mut image = vec![1.0f32; 6];
        let label = [0u16, 254, 3];
        mask(vec![0, 1]).zero_source(&mut image, &label);
        assert_eq!(image, vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
        let mut out = vec![254u8, 255, 1];
        mask(vec![]).clear_label(&mut out);
        assert_eq!(out, vec![0, 255, 1]);
        // A marker that does not fit u8 labels changes nothing (the dataset refuses it anyway).
        let wide = OutsideMask {
            label: 300,
            zero_channels: vec![0],
        };
        let mut out = vec![44u8];
        wide.clear_label(&mut out);
        assert_eq!(out, vec![44]);
    }
}
