"""patchflow for PyTorch: stream training batches from patchflow daemons.

    import patchflow
    client = patchflow.Client("unix:/run/patchflow.sock")
    with client.stream("liver", patch=(128, 128, 128), batch=2) as stream:
        batch = next(stream)
        image, label = batch.torch()          # tensors sharing the batch's memory

    s = patchflow.schedule(final_patch=(128, 128, 128), pools=(5, 5, 5), epochs=1000, batch=2)
    loader = patchflow.torch.CurriculumLoader(client, "liver", s, iters_per_epoch=250)

`patchflow` needs numpy only; `patchflow.torch` needs torch.
"""

from __future__ import annotations

from . import _native
from ._client import Batch, Client, Item, Stream
from ._errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    Error,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from ._schedule import Schedule, Stage, modes, schedule

__version__: str = _native.__version__

__all__ = [
    "Client",
    "Stream",
    "Batch",
    "Item",
    "Schedule",
    "Stage",
    "schedule",
    "modes",
    "Error",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
]


def __getattr__(name: str):
    # `patchflow.torch` is imported on first use, so `import patchflow` works without torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'patchflow' has no attribute {name!r}")
