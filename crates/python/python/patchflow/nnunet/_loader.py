"""The iterators nnU-Net's training loop pulls batches from (`next(self.dataloader_train)`):
one live patchflow stream each, placed at the run's batch index, converted to nnU-Net's batch
contract (`{'data', 'target', 'keys'}`), with the time spent waiting for them measured.

Batch `k = epoch × iterations_per_epoch + i` of the run is batch `k` of the daemon's sequence for
the seed and the stage's configuration, whatever the number of DDP ranks: every rank reads the
whole batch `k` and trains on its share of the items, as nnU-Net splits its global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..torch import CurriculumLoader
from ._targets import TargetMaker, ddp_share

__all__ = ["StageLoader", "DaemonBatches", "augmentation_for", "ANISO_THRESHOLD"]

# nnunetv2.configuration.ANISO_THRESHOLD: a 3D patch whose largest edge exceeds 3 times its first
# edge gets nnU-Net's pseudo-2D augmentation.
ANISO_THRESHOLD = 3

_NNUNET_P = {
    "noise": 0.1,
    "blur": 0.2,
    "brightness": 0.15,
    "contrast": 0.15,
    "lowres": 0.25,
    "inverted_gamma": 0.1,
    "gamma": 0.3,
}


def augmentation_for(patch: Sequence[int]) -> str | dict[str, Any]:
    """nnU-Net's default training augmentation for a 3D `patch` `(z, y, x)`, as
    `configure_rotation_dummyDA_mirroring_and_inital_patch_size` decides it: the daemon's
    `"nnunet"` preset, or, when `max(patch) / patch[0]` exceeds 3 (`do_dummy_2d_data_aug`), the
    preset with nnU-Net's pseudo-2D settings: rotation in the `y`-`x` plane within ±180° and
    low-resolution simulation that leaves `z` alone.

    The PGPS trainers decide this per stage (they rebuild nnU-Net's loaders at each patch), so a
    small early patch of an anisotropic plan may be augmented in 3D."""
    if max(patch) / patch[0] <= ANISO_THRESHOLD:
        return "nnunet"
    spec: dict[str, Any] = {name: {"p": p} for name, p in _NNUNET_P.items()}
    spec["rotation"] = {"p": 0.2, "angles": [[-math.pi, math.pi], [0.0, 0.0], [0.0, 0.0]]}
    spec["scaling"] = {"p": 0.2}
    spec["lowres"]["axes"] = [False, True, True]
    spec["mirror"] = {"p_per_axis": 0.5}
    return spec


class StageLoader(CurriculumLoader):
    """A `CurriculumLoader` whose augmentation follows the patch of each step
    (`augmentation_for`); without augmentation it is the plain loader."""

    def __init__(self, *args: Any, augment_for: Callable[[tuple[int, int, int]], Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._augment_for = augment_for
        #: streams opened so far (1 for a run that only reconfigures its stream)
        self.streams_opened = 0

    def _stream_at(self, index: int, config: dict[str, Any]) -> Any:
        before = self._stream
        stream = super()._stream_at(index, config)
        if stream is not before:
            self.streams_opened += 1
        return stream

    def _config_for(self, epoch: int, index: int) -> dict[str, Any]:
        config = super()._config_for(epoch, index)
        if self._augment_for is not None:
            config["augment"] = self._augment_for(tuple(config["patch"]))
        return config


class DaemonBatches:
    """nnU-Net batches of one `CurriculumLoader` (iterate with `next()`).

    `begin_epoch(e)` places it at the first batch of epoch `e`; each `next()` then returns the
    epoch's next batch as `{'data': float32 [b, C, *patch], 'target': [one tensor per
    deep-supervision scale] (or one tensor), 'keys': case ids}`, `b` this rank's share.
    `wait_s` and `batches` count the time spent in `next()` and the batches since the last
    `take_wait()`; `sizes` the `(patch, batch)` of those batches.
    """

    def __init__(
        self,
        loader: CurriculumLoader,
        targets: TargetMaker,
        *,
        rank: int = 0,
        world_size: int = 1,
        record: str | None = None,
        name: str = "train",
    ) -> None:
        self.loader = loader
        self.targets = targets
        self.rank = rank
        self.world_size = world_size
        self.record = record
        self.name = name
        self._epoch: int | None = None
        self._it = None
        self._step = 0
        self.wait_s = 0.0
        self.batches = 0
        self.sizes: dict[tuple[tuple[int, int, int], int], int] = {}

    def begin_epoch(self, epoch: int) -> None:
        """The next batches are those of `epoch` (from where a loaded state stopped)."""
        self._epoch = epoch
        self._step = 0
        self._it = self.loader.batches(epoch)

    def __iter__(self) -> DaemonBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self._it is None:
            self.begin_epoch(self.loader.next_epoch)
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(
                f"patchflow: the {self.name} loader delivered the {self.loader.steps_per_epoch} batches of epoch "
                f"{self._epoch}; a new epoch starts with begin_epoch()"
            ) from None
        image, label = self.loader._deliver(batch)
        keys = [item.case for item in batch.items]
        if self.world_size > 1:
            lo, hi = ddp_share(batch.batch_size, self.world_size, self.rank)
            image, label, keys = image[lo:hi], label[lo:hi], keys[lo:hi]
        data, target = self.targets(image, label, batch.ignore_label)
        out = {"data": data, "target": target, "keys": np.array(keys)}
        self.wait_s += time.perf_counter() - start
        self.batches += 1
        size = (tuple(batch.patch), batch.batch_size)
        self.sizes[size] = self.sizes.get(size, 0) + 1
        if self.record is not None:
            self._record(batch, out)
        self._step += 1
        return out

    def take_wait(self) -> tuple[float, int, dict[tuple[tuple[int, int, int], int], int]]:
        """`(seconds in next(), batches, {(patch, batch): count})` since the last call; resets."""
        out = (self.wait_s, self.batches, self.sizes)
        self.wait_s, self.batches, self.sizes = 0.0, 0, {}
        return out

    def _record(self, batch: Any, out: dict[str, Any]) -> None:
        target = out["target"][0] if isinstance(out["target"], list) else out["target"]
        line = {
            "loader": self.name,
            "epoch": self._epoch,
            "step": self._step,
            "index": batch.index,
            "patch": list(batch.patch),
            "batch": batch.batch_size,
            "streams_opened": getattr(self.loader, "streams_opened", None),
            "keys": [str(k) for k in out["keys"]],
            "origins": [list(item.origin) for item in batch.items],
            "augmented": [item.augmentation is not None for item in batch.items],
            "data": _digest(out["data"]),
            "target": _digest(target),
            "target_shapes": [list(t.shape) for t in out["target"]]
            if isinstance(out["target"], list)
            else [list(out["target"].shape)],
        }
        with open(self.record, "a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        """Ends the stream."""
        self._it = None
        self.loader.close()


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (C order, on the CPU)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
