"""The PGPS patch-size schedule, computed by the Rust curriculum crate (the one the Rust
trainer and `patchflow schedule` use), so a Python training loop follows exactly the same
curriculum."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from . import _native
from ._errors import InvalidArgument

__all__ = ["Schedule", "Stage", "schedule", "modes"]


@dataclass(frozen=True)
class Stage:
    """A patch size and batch size held for a run of epochs (in `rpss`, a candidate size drawn
    for the whole run)."""

    index: int
    patch: tuple[int, int, int]
    batch: int
    first_epoch: int
    epochs: int
    crops_per_case: int

    @property
    def last_epoch(self) -> int:
        """Last epoch (inclusive) of the stage."""
        return max(self.first_epoch + self.epochs - 1, 0)


def modes() -> list[str]:
    """Every schedule mode the curriculum crate knows, in its order (`pgps-efficiency` is also
    accepted for `pgps`)."""
    return list(_native.modes())


def _triplet(name: str, value: int | Sequence[int]) -> list[int]:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name}: {value!r} is not a number or (z, y, x)")
    if isinstance(value, int):
        return [value] * 3
    try:
        values = [int(v) for v in value]
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name}: {value!r} is not a number or (z, y, x)") from None
    if len(values) != 3:
        raise InvalidArgument(f"{name}: {value!r} has {len(values)} values, expected (z, y, x)")
    if any(v < 0 for v in values):
        raise InvalidArgument(f"{name}: {value!r} has a negative value")
    return values


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{name}: {value!r} is not an integer >= 0")
    return value


class Schedule:
    """A patch-size curriculum for one training run (build it with `patchflow.schedule`)."""

    __slots__ = ("_native", "_stages")

    def __init__(self, native: _native.NativeSchedule) -> None:
        self._native = native
        self._stages = tuple(
            Stage(index=i, patch=tuple(s["patch"]), batch=s["batch"], first_epoch=s["first_epoch"],
                  epochs=s["epochs"], crops_per_case=s["crops_per_case"])
            for i, s in enumerate(native.stages)
        )

    @property
    def mode(self) -> str:
        """The mode's name (`pgps`, ... as `modes()` lists them)."""
        return self._native.mode

    @property
    def final_patch(self) -> tuple[int, int, int]:
        """The planned patch, used by the last stage, validation and inference."""
        return self._native.final_patch

    @property
    def pools(self) -> tuple[int, int, int]:
        """Stride-2 poolings per axis of the network."""
        return self._native.pools

    @property
    def epochs(self) -> int:
        """Epochs of the run."""
        return self._native.epochs

    @property
    def planned_batch(self) -> int:
        """The planned (nnU-Net) batch size."""
        return self._native.planned_batch

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages, in order."""
        return self._stages

    @property
    def foreground_oversample(self) -> float:
        """The share of foreground-centred crops the mode trains with: 0.5 in every curriculum
        mode (the authors' trainers), nnU-Net's 0.33 for `constant`."""
        return self._native.foreground_oversample

    @property
    def sizes(self) -> list[tuple[int, int, int]]:
        """The distinct patch sizes of the PGPS growth, smallest first."""
        return list(self._native.sizes)

    @property
    def relative_cost(self) -> float:
        """Expected voxels processed relative to the constant baseline (final patch, planned
        batch, same epochs)."""
        return self._native.relative_cost

    def stage_for(self, epoch: int) -> Stage:
        """The stage in force at `epoch` (0-based; later epochs stay in the last stage; in
        `rpss`, the full-size candidate)."""
        return self._stages[self._native.stage_index_for(_count("epoch", epoch))]

    def patch_for(self, epoch: int, iteration: int, seed: int = 0) -> tuple[tuple[int, int, int], int]:
        """`(patch, batch)` to train with at `epoch` and `iteration`, the run's global,
        0-based iteration (`epoch × iterations_per_epoch + i`). `rpss` draws from
        `(seed, iteration)`; the other modes depend on `epoch` only."""
        return self._native.patch_for(_count("epoch", epoch), _count("iteration", iteration), _count("seed", seed))

    def crops_per_case_for(self, epoch: int) -> int:
        """Crops per case at `epoch` (1 in `rpss` and `constant`)."""
        if self.mode == "rpss":
            return 1
        return self.stage_for(epoch).crops_per_case

    def to_json(self) -> dict[str, Any]:
        """The schedule as `patchflow schedule --json` prints it."""
        return json.loads(self._native.to_json())

    @classmethod
    def from_json(cls, value: str | Mapping[str, Any]) -> Schedule:
        """The schedule `to_json` (or `patchflow schedule --json`) describes; its stages must be
        those its parameters give."""
        text = value if isinstance(value, str) else json.dumps(dict(value))
        return cls(_native.NativeSchedule.from_json(text))

    def table(self) -> str:
        """The table `patchflow schedule` prints."""
        return self._native.render_table()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self._native.to_json())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Schedule.from_json, (self._native.to_json(),))

    def __repr__(self) -> str:
        return (
            f"<patchflow.Schedule {self.mode} final={self.final_patch} pools={self.pools} "
            f"epochs={self.epochs} batch={self.planned_batch} stages={len(self._stages)}>"
        )


def schedule(
    final_patch: int | Sequence[int],
    pools: int | Sequence[int],
    epochs: int,
    batch: int,
    mode: str = "pgps",
) -> Schedule:
    """The patch-size curriculum of a run: `final_patch` `(z, y, x)` (nnU-Net's planned patch),
    the network's stride-2 `pools` per axis, `epochs`, the planned `batch`, and `mode` (one of
    `modes()`)."""
    native = _native.NativeSchedule(
        _triplet("final_patch", final_patch),
        _triplet("pools", pools),
        _count("epochs", epochs),
        _count("batch", batch),
        str(mode),
    )
    return Schedule(native)
