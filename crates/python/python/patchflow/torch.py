"""PyTorch side of patchflow: `CurriculumLoader` feeds a training loop with the PGPS curriculum.

The loader follows a `patchflow.Schedule` by reconfiguring one live stream: the patch (and, in
`pgps-performance`, the batch) changes at each stage without reconnecting, and the daemon
keeps reading ahead within a stage. Batch `k` of a run is the run's global iteration `k`
(`epoch × iters_per_epoch + i`), so:

* under `torch.distributed` (or with `rank`/`world_size`), rank `r` of `n` takes the batches
  `k ≡ r (mod n)` of each epoch (`start_index = r`, `index_stride = n`): the ranks together see
  exactly what one process would have seen, each doing `iters_per_epoch / n` steps per epoch;
* `state_dict()` / `load_state_dict()` resume exactly where a checkpoint stopped.

Use it with `num_workers=0` semantics (no DataLoader around it): the daemon does the work that
DataLoader workers would, in Rust.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch

from ._client import Batch, Client, Stream
from ._errors import InvalidArgument
from ._schedule import Schedule

__all__ = ["CurriculumLoader", "to_tensors"]

# Version of the `state_dict` layout.
_STATE_VERSION = 1


def to_tensors(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(image, label)` of `batch` as tensors sharing its memory (`Batch.torch()`)."""
    return batch.torch()


class _DeviceCopier:
    """Copies batches from their (shared-memory) views into pinned host buffers and on to the
    GPU without blocking the host: each pinned buffer is reused only after the copy out of it
    finished (an event recorded on the current stream), and the returned GPU tensors are
    ordered with the caller's work on that stream."""

    def __init__(self, device: torch.device, buffers: int = 2) -> None:
        self.device = device
        self.buffers = buffers
        # (shape, dtype) -> list of (pinned tensor, event or None); used round-robin.
        self._pool: dict[tuple[tuple[int, ...], torch.dtype], list[list[Any]]] = {}
        self._turn: dict[tuple[tuple[int, ...], torch.dtype], int] = {}

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        key = (tuple(host.shape), host.dtype)
        pool = self._pool.setdefault(key, [])
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        if len(pool) < self.buffers:
            pool.append([torch.empty(host.shape, dtype=host.dtype, pin_memory=True), None])
        slot = pool[turn % len(pool)]
        pinned, event = slot
        if event is not None:
            event.synchronize()
        pinned.copy_(host)
        out = pinned.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        slot[1] = event
        return out


class CurriculumLoader:
    """Batches of `dataset` following `schedule`, as torch tensors.

        loader = CurriculumLoader(client, "liver", s, iters_per_epoch=250, augment="nnunet")
        for epoch in range(start_epoch, s.epochs):
            for image, label in loader.epoch(epoch):
                ...

    * `client`: a `patchflow.Client` (or endpoints for one);
    * `iters_per_epoch`: batches per epoch of the whole run (all ranks together); each rank
      yields `iters_per_epoch / world_size` of them;
    * `seed`: the sequence (and the `rpss` draws);
    * `rank`, `world_size`: this process's share; by default taken from an initialised
      `torch.distributed` process group, else 0 and 1;
    * `device`: copy each batch through pinned buffers to this device asynchronously (labels
      stay uint8/uint16 there); None: CPU tensors sharing the batch's read-only memory;
    * `pin_memory`: without `device`, return pinned copies (for your own `.to(non_blocking=True)`);
    * the other keyword arguments go to every stream configuration: `augment`, `policy`,
      `fraction` (default: the schedule's `foreground_oversample`, 0.5 in every curriculum mode
      and 0.33 for `constant`, as the authors' trainers and nnU-Net), `class_weights`, `no_mirror_axes`,
      `dtype`, `cases`, `prefetch`.

    `last_batch` holds the `patchflow.Batch` behind the tensors last yielded (index, items).
    """

    def __init__(
        self,
        client: Client | str | Sequence[str],
        dataset: str,
        schedule: Schedule,
        *,
        iters_per_epoch: int = 250,
        augment: str | Mapping[str, Any] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
        pin_memory: bool = False,
        policy: str = "foreground",
        fraction: float | None = None,
        class_weights: Mapping[int, float] | None = None,
        no_mirror_axes: Sequence[int] = (),
        dtype: str = "f32",
        cases: Sequence[str] | None = None,
        prefetch: int | None = None,
    ) -> None:
        if not isinstance(client, Client):
            client = Client(client)
        if not isinstance(schedule, Schedule):
            raise InvalidArgument(f"schedule: expected a patchflow.Schedule, got {type(schedule).__name__}")
        if isinstance(iters_per_epoch, bool) or not isinstance(iters_per_epoch, int) or iters_per_epoch < 1:
            raise InvalidArgument(f"iters_per_epoch: {iters_per_epoch!r} is not an integer >= 1")
        rank, world_size = _share(rank, world_size)
        if iters_per_epoch % world_size:
            raise InvalidArgument(
                f"iters_per_epoch: {iters_per_epoch} batches per epoch cannot be split evenly over "
                f"{world_size} ranks (every rank must take as many steps)"
            )
        self.client = client
        self.dataset = dataset
        self.schedule = schedule
        self.iters_per_epoch = iters_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = None if device is None else torch.device(device)
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but no CUDA device is available; not pinning", stacklevel=2)
            pin_memory = False
        self.pin_memory = pin_memory
        self._base: dict[str, Any] = dict(
            dataset=dataset,
            policy=policy,
            fraction=schedule.foreground_oversample if fraction is None and policy == "foreground" else fraction,
            class_weights=None if class_weights is None else dict(class_weights),
            augment=augment,
            no_mirror_axes=tuple(no_mirror_axes),
            dtype=dtype,
            seed=seed,
            cases=None if cases is None else list(cases),
        )
        self._prefetch = prefetch
        self._stream: Stream | None = None
        self._copier = (
            _DeviceCopier(self.device) if self.device is not None and self.device.type == "cuda" else None
        )
        # Where the run stands: the next (epoch, step of this rank in that epoch).
        self._epoch = 0
        self._step = 0
        self.last_batch: Batch | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch."""
        return self.iters_per_epoch // self.world_size

    @property
    def next_epoch(self) -> int:
        """The epoch to train next (after `load_state_dict`: where the checkpoint stopped)."""
        return self._epoch + 1 if self._step >= self.steps_per_epoch else self._epoch

    def _index(self, epoch: int, step: int) -> int:
        """Global batch index of this rank's `step` in `epoch`."""
        return epoch * self.iters_per_epoch + step * self.world_size + self.rank

    def _config_for(self, epoch: int, index: int) -> dict[str, Any]:
        patch, batch = self.schedule.patch_for(epoch, index, self.seed)
        return dict(self._base, patch=patch, batch=batch, crops_per_case=self.schedule.crops_per_case_for(epoch))

    def _stream_at(self, index: int, config: dict[str, Any]) -> Stream:
        """The live stream, placed at `index` with `config` (reconfigured if needed; reopened only
        when it is elsewhere in the sequence)."""
        s = self._stream
        if s is None or s.closed or s.next_index != index or s.index_stride != self.world_size:
            if s is not None:
                s.close()
            s = self.client.stream(
                start_index=index, index_stride=self.world_size, prefetch=self._prefetch, **config
            )
            self._stream = s
        elif s.config != config:
            s.reconfigure(**{k: v for k, v in config.items() if s.config.get(k) != v})
        return s

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's `patchflow.Batch`es of `epoch` (from where a loaded checkpoint stopped)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidArgument(f"epoch: {epoch!r} is not an integer >= 0")
        first = self._step if epoch == self._epoch else 0
        if epoch < self._epoch:
            first = 0
        for step in range(first, self.steps_per_epoch):
            index = self._index(epoch, step)
            stream = self._stream_at(index, self._config_for(epoch, index))
            batch = next(stream)
            if batch.index != index:
                raise RuntimeError(f"patchflow: expected batch {index}, the stream delivered {batch.index}")
            self._epoch, self._step = epoch, step + 1
            self.last_batch = batch
            yield batch

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `(image, label)` tensors of `epoch`: image `[B, C, Z, Y, X]` (float32,
        float16 or bfloat16), label `[B, 1, Z, Y, X]` (uint8, or uint16 beyond 254 classes)."""
        for batch in self.batches(epoch):
            yield self._deliver(batch)

    def _deliver(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = batch.torch()
        if self._copier is not None:
            return self._copier(image), self._copier(label)
        if self.device is not None and self.device.type != "cpu":
            return image.to(self.device), label.to(self.device)
        if self.pin_memory:
            return image.pin_memory(), label.pin_memory()
        return image, label

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the run stands (next epoch and step of this rank), with what fixes the
        sequence, for a checkpoint."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "dataset": self.dataset,
            "seed": self.seed,
            "iters_per_epoch": self.iters_per_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "schedule": self.schedule.to_json(),
            "config": {k: v for k, v in self._base.items() if k != "class_weights"}
            | {"class_weights": None if self._base["class_weights"] is None else sorted(self._base["class_weights"].items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from `state` (`state_dict()` of a loader of the same run): the next batch
        is the one the checkpointed loader would have yielded next."""
        if state.get("version") != _STATE_VERSION:
            raise InvalidArgument(f"state_dict: version {state.get('version')!r}, expected {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("dataset", "seed", "iters_per_epoch", "world_size", "rank", "schedule", "config"):
            if _normalise(state.get(key)) != _normalise(mine[key]):
                raise InvalidArgument(
                    f"state_dict: {key} is {state.get(key)!r} in the checkpoint and {mine[key]!r} here; "
                    "a loader resumes only the run it was saved from"
                )
        epoch, step = state.get("epoch"), state.get("step")
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0 and 0 <= step <= self.steps_per_epoch):
            raise InvalidArgument(f"state_dict: epoch {epoch!r}, step {step!r} are not a position of this run")
        self._epoch, self._step = epoch, step

    def close(self) -> None:
        """Ends the stream (batches already yielded stay valid)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> CurriculumLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (a state_dict may have gone through JSON or torch.save)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


def _share(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's (rank, world size): as given, else the initialised process group's."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise InvalidArgument("rank and world_size: give both or neither")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgument(f"world_size: {world_size!r} is not an integer >= 1")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidArgument(f"rank: {rank!r} is not in 0..{world_size - 1}")
    return rank, world_size
