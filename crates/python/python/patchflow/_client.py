"""Client, streams and batches: the Python face of the Rust client.

A `Batch` holds the bytes the client received, or a read-only view of the daemon's
shared-memory slot when the daemon runs on this host; `Batch.image` and `Batch.label` are numpy
views of those bytes and `Batch.torch()` makes tensors of the same memory. The memory stays
valid as long as any of them lives, even after the stream is closed; the slot goes back to the
daemon when the last one is gone.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import _native
from ._errors import InvalidArgument

__all__ = ["Client", "Stream", "Batch", "Item"]

# numpy element types of the wire dtypes. bfloat16 has no numpy type: its arrays are uint16
# holding the bits, and `Batch.torch()` reinterprets them as torch.bfloat16.
_IMAGE_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
_LABEL_DTYPES = {"u8": np.dtype("u1"), "u16": np.dtype("<u2")}

# Keyword arguments of `Client.stream` that shape the configuration (sent to the daemons).
_CONFIG_KEYS = (
    "dataset",
    "patch",
    "batch",
    "policy",
    "fraction",
    "class_weights",
    "crops_per_case",
    "augment",
    "no_mirror_axes",
    "dtype",
    "seed",
    "cases",
)
# Keyword arguments that place the stream in the sequence or tune it (no new configuration).
_POSITION_KEYS = ("start_index", "index_stride", "prefetch")


@dataclass(frozen=True)
class Item:
    """Where one item of a batch was cut.

    `origin` is the voxel index `(z, y, x)` of the patch's first voxel in the case (negative or
    beyond the volume where the patch is padded); `class_value` the class the crop was centred
    on, if any; `augmentation` the parameters applied to it (None without augmentation).
    """

    case: str
    case_index: int
    origin: tuple[int, int, int]
    forced_foreground: bool
    class_value: int | None
    augmentation: dict[str, Any] | None


class Batch:
    """One batch: image `[B, C, Z, Y, X]` and label `[B, 1, Z, Y, X]` as read-only numpy views
    (no copy), its index in the stream's sequence and where each item was cut."""

    __slots__ = ("_native", "_image", "_label", "_items")

    def __init__(self, native: _native.NativeBatch) -> None:
        self._native = native
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None
        self._items: list[Item] | None = None

    @property
    def index(self) -> int:
        """The batch number in the sequence."""
        return self._native.index

    @property
    def patch(self) -> tuple[int, int, int]:
        """Patch size `(z, y, x)`."""
        return self._native.patch

    @property
    def batch_size(self) -> int:
        """Items in the batch (B)."""
        return self._native.batch_size

    @property
    def channels(self) -> int:
        """Image channels (C)."""
        return self._native.channels

    @property
    def dtype(self) -> str:
        """Image element type on the wire: `f32`, `f16` or `bf16`."""
        return self._native.dtype

    @property
    def label_dtype(self) -> str:
        """Label element type: `u8` or `u16`."""
        return self._native.label_dtype

    @property
    def ignore_label(self) -> int:
        """Label value of voxels where the patch reached beyond the volume."""
        return self._native.ignore_label

    @property
    def image(self) -> np.ndarray:
        """The image, `[B, C, Z, Y, X]`, read-only, sharing the batch's memory (bf16 images are
        uint16 arrays of the bits; `torch()` gives bfloat16 tensors)."""
        if self._image is None:
            z, y, x = self.patch
            shape = (self.batch_size, self.channels, z, y, x)
            self._image = _view(self._native.image_buffer(), _IMAGE_DTYPES[self.dtype], shape)
        return self._image

    @property
    def label(self) -> np.ndarray:
        """The label map, `[B, 1, Z, Y, X]`, read-only, sharing the batch's memory."""
        if self._label is None:
            z, y, x = self.patch
            shape = (self.batch_size, 1, z, y, x)
            self._label = _view(
                self._native.label_buffer(), _LABEL_DTYPES[self.label_dtype], shape
            )
        return self._label

    @property
    def items(self) -> list[Item]:
        """Per item: case, case_index, origin, forced_foreground, class_value, augmentation."""
        if self._items is None:
            self._items = [
                Item(
                    case=i["case"],
                    case_index=i["case_index"],
                    origin=tuple(i["origin"]),
                    forced_foreground=i["forced_foreground"],
                    class_value=i["class_value"],
                    augmentation=None if i["augmentation"] is None else json.loads(i["augmentation"]),
                )
                for i in self._native.items
            ]
        return self._items

    def torch(self) -> tuple[Any, Any]:
        """`(image, label)` as torch tensors sharing the batch's memory (no copy).

        The memory is read-only (for shared memory: the daemon's slot, mapped read-only):
        operate out of place, or copy first (`.clone()`, `.to(device)`, `.float()`); an
        in-place write is refused by numpy views and would fault on tensors.
        """
        import torch

        _quiet_torch_readonly_warning()
        image = torch.from_numpy(self.image)
        label = torch.from_numpy(self.label)
        if self.dtype == "bf16":
            image = image.view(torch.bfloat16)
        return image, label

    def __repr__(self) -> str:
        z, y, x = self.patch
        return (
            f"<patchflow.Batch index={self.index} image=[{self.batch_size}, {self.channels}, "
            f"{z}, {y}, {x}] {self.dtype} label={self.label_dtype}>"
        )


_FILTERED = False


def _quiet_torch_readonly_warning() -> None:
    """torch warns that tensors made from read-only arrays are not writable, which is the point
    here; the warning is silenced for this module's calls only, once (a `catch_warnings` per
    batch would cost more than the rest of `Batch.torch`)."""
    global _FILTERED
    if not _FILTERED:
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning,
                                module=r"patchflow\._client")
        _FILTERED = True


def _view(buffer: _native.NativeBuffer, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of `shape` over `buffer` (which the array keeps alive)."""
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


class Stream:
    """An endless, ordered stream of batches (an iterator; also a context manager).

    `next(stream)` waits for the next batch with the GIL released. `reconfigure(**kwargs)`
    takes any keyword argument of `Client.stream` and applies from the next batch on; with
    `start_index` or `index_stride` the stream moves to that place in the sequence.
    """

    def __init__(self, client: Client, config: dict[str, Any], start: int, stride: int, prefetch: int | None) -> None:
        self._client = client
        self._config = config
        self._prefetch = prefetch
        self._native: _native.NativeStream | None = client._native.stream(
            config, start=start, stride=stride, prefetch=prefetch
        )

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return Batch(self._require().next())

    def next(self) -> Batch:
        """The next batch (as `next(stream)`)."""
        return self.__next__()

    def _require(self) -> _native.NativeStream:
        if self._native is None:
            from ._errors import FailedPrecondition

            raise FailedPrecondition("the stream is closed")
        return self._native

    @property
    def next_index(self) -> int:
        """Index of the batch `next` returns."""
        return self._require().next_index

    @property
    def index_stride(self) -> int:
        """Distance between the indices of consecutive batches."""
        return self._require().index_stride

    @property
    def config(self) -> dict[str, Any]:
        """The configuration in force (the keyword arguments of `Client.stream`)."""
        return dict(self._config)

    @property
    def closed(self) -> bool:
        """Whether the stream was closed."""
        return self._native is None or self._native.closed

    def reconfigure(self, **kwargs: Any) -> None:
        """Applies any keyword argument of `Client.stream` from the next batch on (the others
        keep their values). `start_index`/`index_stride`/`prefetch` reopen the stream at that
        place of the sequence."""
        unknown = set(kwargs) - set(_CONFIG_KEYS) - set(_POSITION_KEYS)
        if unknown:
            raise InvalidArgument(f"reconfigure: unknown argument(s) {sorted(unknown)}")
        if isinstance(kwargs.get("cases"), str):
            raise InvalidArgument("cases: expected a list of case ids, got one string")
        config = _merge(self._config, {k: v for k, v in kwargs.items() if k in _CONFIG_KEYS})
        if config.get("cases") is not None:
            config["cases"] = list(config["cases"])
        native = self._require()
        if any(k in kwargs for k in _POSITION_KEYS):
            start = kwargs.get("start_index")
            stride = kwargs.get("index_stride")
            prefetch = kwargs.get("prefetch", self._prefetch)
            start = native.next_index if start is None else _index("start_index", start)
            stride = native.index_stride if stride is None else _stride(stride)
            fresh = self._client._native.stream(config, start=start, stride=stride, prefetch=prefetch)
            native.close()
            self._native, self._prefetch = fresh, prefetch
        elif config != self._config:
            native.reconfigure(config)
        self._config = config

    def close(self) -> None:
        """Ends the stream. Batches already handed out stay valid."""
        if self._native is not None:
            self._native.close()
            self._native = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"next_index={self.next_index}"
        c = self._config
        return f"<patchflow.Stream {c['dataset']!r} patch={c['patch']} batch={c['batch']} {state}>"


def _merge(config: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with `changes`; a new policy drops the previous policy's parameters unless they
    are given again."""
    out = dict(config)
    out.update(changes)
    policy_changed = "policy" in changes or "class_weights" in changes
    if policy_changed:
        if "fraction" not in changes:
            out["fraction"] = None
        if "class_weights" not in changes and changes.get("policy") in ("foreground", "uniform"):
            out["class_weights"] = None
    return out


def _index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{name}: {value!r} is not a batch index (an integer >= 0)")
    return value


def _stride(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"index_stride: {value!r} is not an integer >= 1")
    return value


class Client:
    """A connection to one or several patchflow daemons serving the same datasets.

    `endpoints`: `"unix:/run/patchflow.sock"`, `"http://host:port"`, `"https://host:port"` or
    `"host:port"` (one string or a list; batch `k` comes from daemon `k mod N`). The client
    connects on first use, and again in a forked child (DataLoader workers, multiprocessing),
    which never shares the parent's sockets. `shared_memory`: `"auto"` (for `unix:` and
    loopback daemons that offer it), `"on"` or `"off"`. `compact`: batches that travel inside
    the messages come in the compact wire form (plain crops of integer-stored cases in their
    stored type, normalised here; zstd labels): the same arrays to the bit, about half the bytes
    and daemon CPU. Turn it off only to measure the difference.
    """

    def __init__(
        self,
        endpoints: str | os.PathLike[str] | Sequence[str],
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_domain: str | None = None,
        shared_memory: str = "auto",
        prefetch: int = 4,
        held_batches: int = 4,
        max_attempts: int = 10,
        connect_timeout: float = 10.0,
        compact: bool = True,
    ) -> None:
        if isinstance(endpoints, (str, os.PathLike)):
            endpoints = [os.fspath(endpoints)]
        else:
            endpoints = [os.fspath(e) for e in endpoints]
        self._args = dict(
            token=token,
            token_file=None if token_file is None else os.fspath(token_file),
            tls_ca=None if tls_ca is None else os.fspath(tls_ca),
            tls_cert=None if tls_cert is None else os.fspath(tls_cert),
            tls_key=None if tls_key is None else os.fspath(tls_key),
            tls_domain=tls_domain,
            shared_memory=shared_memory,
            prefetch=prefetch,
            held_batches=held_batches,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            compact=compact,
        )
        self._endpoints = endpoints
        self._native = _native.NativeClient(endpoints, **self._args)

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled client (e.g. for a spawned worker) connects anew where it is unpickled.
        return (_rebuild_client, (self._endpoints, self._args))

    @property
    def endpoints(self) -> list[str]:
        """The endpoints, in the order batches are spread over them."""
        return list(self._endpoints)

    def connect(self) -> Client:
        """Connects now (otherwise the first call does); returns the client."""
        self._native.connect()
        return self

    def list_datasets(self) -> list[dict[str, Any]]:
        """The datasets of the first daemon: `name`, `num_cases`, `num_channels`,
        `set_aside` (damaged cases no batch is drawn from)."""
        return self._native.list_datasets()["datasets"]

    def limits(self) -> list[dict[str, int]]:
        """The limits each daemon announced (patch voxels, batch bytes, batch size, credits,
        message bytes, streams, shared-memory slots), in endpoint order."""
        return self._native.limits()

    def describe(self, dataset: str) -> dict[str, Any]:
        """The dataset as the first daemon describes it: `cases` (id, shape, spacing, voxels per
        class, normalisation), `channels`, `classes`, `label_names`, `ignore_label`,
        `set_aside`."""
        return self._native.describe(dataset)

    def stream(
        self,
        dataset: str,
        patch: int | Sequence[int],
        batch: int,
        *,
        policy: str = "foreground",
        fraction: float | None = None,
        class_weights: Mapping[int, float] | None = None,
        crops_per_case: int = 1,
        augment: str | Mapping[str, Any] | None = None,
        no_mirror_axes: Sequence[int] = (),
        dtype: str = "f32",
        seed: int = 0,
        cases: Sequence[str] | None = None,
        start_index: int | None = None,
        index_stride: int | None = None,
        prefetch: int | None = None,
    ) -> Stream:
        """Opens a stream of batches of `dataset`.

        * `patch` `(z, y, x)` (or one edge for a cube), `batch` items per batch;
        * `policy`: `"foreground"` (nnU-Net's oversampling: the last `round(batch × fraction)`
          items are centred on a foreground voxel; `fraction` defaults to 0.33), `"uniform"`,
          or per-class weights with `class_weights={class: weight, ...}`;
        * `crops_per_case`: crops cut from each drawn case;
        * `augment`: None (plain crops), `"nnunet"` (nnU-Net's default training augmentation)
          or a full spec dict; `no_mirror_axes` never mirrored (0 = z, 1 = y, 2 = x);
        * `dtype`: image element type `"f32"`, `"f16"` or `"bf16"`;
        * `seed`, `cases` (case ids to draw from; None: every case);
        * `start_index`, `index_stride`: the stream delivers batches `start_index`,
          `start_index + index_stride`, ... of the sequence (defaults 0 and 1): rank `r` of
          `n` data-parallel trainers takes `start_index=r, index_stride=n`;
        * `prefetch`: batches read ahead per daemon (default: the client's).

        Batch `k` depends only on the dataset, the configuration and `k`.
        """
        config: dict[str, Any] = dict(
            dataset=dataset,
            patch=patch,
            batch=batch,
            policy=policy,
            fraction=fraction,
            class_weights=None if class_weights is None else dict(class_weights),
            crops_per_case=crops_per_case,
            augment=augment,
            no_mirror_axes=tuple(no_mirror_axes),
            dtype=dtype,
            seed=seed,
            cases=None if cases is None else list(cases),
        )
        if isinstance(cases, str):
            raise InvalidArgument("cases: expected a list of case ids, got one string")
        start = 0 if start_index is None else _index("start_index", start_index)
        stride = 1 if index_stride is None else _stride(index_stride)
        return Stream(self, config, start, stride, prefetch)

    def __repr__(self) -> str:
        return f"<patchflow.Client {self._endpoints}>"


def _rebuild_client(endpoints: list[str], args: dict[str, Any]) -> Client:
    return Client(endpoints, **args)
