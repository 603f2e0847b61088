"""nnU-Net's batch contract from a served batch: what nnU-Net v2.8.1's training and validation
transforms do after augmentation, done once per batch (on the trainer's device) instead of once
per item in worker processes.

nnU-Net's pipeline ends, for every item, with (``nnUNetTrainer.get_training_transforms`` /
``get_validation_transforms``):

1. ``MaskImageTransform`` (training, channels with ``use_mask_for_norm``): image 0 where the
   segmentation is -1, i.e. outside nnU-Net's non-zero mask and beyond the volume;
2. ``RemoveLabelTansform(-1, 0)``: -1 becomes background;
3. ``ConvertSegmentationToRegionsTransform`` (region-based datasets, the ignore label appended as
   the last region);
4. ``DownsampleSegForDSTransform``: one target per deep-supervision scale, nearest-exact.

The daemon serves nnU-Net's -1 inside the volume already as label 0 (and the image there as
nnU-Net's preprocessing left it), and the voxels beyond the volume as its ignore value: those are
nnU-Net's padding -1, so they become 0 here (for every dataset, ignore label or not: nnU-Net maps
-1 to 0 before it looks at regions or the ignore label) and, in training, get image 0 in the
masked channels. The result is int16 (or bool for regions), as nnU-Net's loader returns it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.functional import interpolate

__all__ = ["TargetMaker", "ddp_share"]


class TargetMaker:
    """Turns a served `(image, label)` into nnU-Net's `(data, target)`.

    * `ds_scales`: nnU-Net's deep-supervision scales (`_get_deep_supervision_scales()`), or None
      when deep supervision is off (the target is then one tensor, as in nnU-Net);
    * `regions`: the label manager's foreground regions for region-based training, else None;
    * `ignore_label`: nnU-Net's ignore label (appended as the last region), or None;
    * `mask_channels`: channels whose image is set to 0 where the patch reached beyond the
      volume (nnU-Net's `MaskImageTransform`, training only).
    """

    def __init__(
        self,
        ds_scales: Sequence[Sequence[float]] | None,
        regions: Sequence[int | Sequence[int]] | None = None,
        ignore_label: int | None = None,
        mask_channels: Sequence[int] = (),
    ) -> None:
        self.ds_scales = None if ds_scales is None else [[float(v) for v in s] for s in ds_scales]
        if regions is not None:
            regions = [list(r) if isinstance(r, (list, tuple)) else [int(r)] for r in regions]
            if ignore_label is not None:
                regions.append([int(ignore_label)])
        self.regions = regions
        self.mask_channels = list(mask_channels)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, padding: int
    ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """`image` `[B, C, Z, Y, X]` float32 and `label` `[B, 1, Z, Y, X]` uint8/uint16 as served
        (they may be read-only views: neither is written); `padding` the served ignore value."""
        if label.dtype == torch.uint16:
            label = label.to(torch.int32)
        pad = label == padding
        seg = label.to(torch.int16).masked_fill(pad, 0)
        data = image
        if self.mask_channels and bool(pad.any()):
            data = image.clone()
            for c in self.mask_channels:
                data[:, c : c + 1].masked_fill_(pad, 0.0)
        if self.regions is not None:
            seg = self._regions(seg)
        return data, self._downsample(seg)

    def _regions(self, seg: torch.Tensor) -> torch.Tensor:
        out = torch.empty((seg.shape[0], len(self.regions), *seg.shape[2:]), dtype=torch.bool, device=seg.device)
        for i, labels in enumerate(self.regions):
            if len(labels) == 1:
                out[:, i] = seg[:, 0] == labels[0]
            else:
                out[:, i] = torch.isin(seg[:, 0], torch.tensor(labels, dtype=seg.dtype, device=seg.device))
        return out

    def _downsample(self, seg: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.ds_scales is None:
            return seg
        out = []
        seg_float = None
        for s in self.ds_scales:
            if all(v == 1 for v in s):
                out.append(seg)
                continue
            shape = [round(i * j) for i, j in zip(seg.shape[2:], s)]
            if seg_float is None:
                seg_float = seg.float()
            out.append(interpolate(seg_float, shape, mode="nearest-exact").to(seg.dtype))
        return out


def ddp_share(batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """Items `[lo, hi)` of a global batch that rank `rank` trains on: nnU-Net's split
    (`nnUNetTrainer._set_batch_size_and_oversample`: the first `batch mod world_size` ranks take
    one item more). Its foreground share follows, since the forced items are the last ones."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size}")
    if batch < world_size:
        raise ValueError(
            f"a batch of {batch} cannot be split over {world_size} ranks (nnU-Net needs at least one item per GPU)"
        )
    sizes = [batch // world_size] * world_size
    sizes = [s + 1 if s * world_size + i < batch else s for i, s in enumerate(sizes)]
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]
