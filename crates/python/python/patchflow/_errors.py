"""Exceptions of patchflow: one class per gRPC status code, all subclasses of `Error`.

The native client raises these with the daemon's message (or the client's, for failures that
happen before a daemon answers: a bad argument, an unreachable endpoint, an unreadable token
file). `InvalidArgument` is also a `ValueError` and `NotFound` a `LookupError`, so code that
catches the built-in kinds keeps working.
"""

from __future__ import annotations

__all__ = [
    "Error",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
]


class Error(Exception):
    """A patchflow failure. `code` is the gRPC code name (`"NOT_FOUND"`, ...), `endpoint` the
    daemon concerned (None when the failure is not one daemon's)."""

    code: str = "UNKNOWN"
    endpoint: str | None = None

    @property
    def message(self) -> str:
        """The message (the daemon's, where a daemon answered)."""
        return str(self.args[0]) if self.args else ""


class Cancelled(Error):
    """The call was cancelled."""

    code = "CANCELLED"


class Unknown(Error):
    """An error the daemon did not classify."""

    code = "UNKNOWN"


class InvalidArgument(Error, ValueError):
    """A bad argument: refused by the client before sending, or by the daemon."""

    code = "INVALID_ARGUMENT"


class DeadlineExceeded(Error):
    """A deadline passed."""

    code = "DEADLINE_EXCEEDED"


class NotFound(Error, LookupError):
    """An unknown dataset or case."""

    code = "NOT_FOUND"


class AlreadyExists(Error):
    """Something to create exists already."""

    code = "ALREADY_EXISTS"


class PermissionDenied(Error):
    """The caller may not do this."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(Error):
    """A daemon limit: patch voxels, batch bytes, streams, credits."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(Error):
    """The call does not fit the state: a closed stream, a stream used in a forked child,
    shared memory required but unusable."""

    code = "FAILED_PRECONDITION"


class Aborted(Error):
    """The daemon aborted the call."""

    code = "ABORTED"


class OutOfRange(Error):
    """A value outside the valid range."""

    code = "OUT_OF_RANGE"


class Unimplemented(Error):
    """The daemon does not implement the call."""

    code = "UNIMPLEMENTED"


class Internal(Error):
    """A broken invariant: a daemon that violated the protocol, or a bug."""

    code = "INTERNAL"


class Unavailable(Error):
    """No daemon answered (for every allowed attempt), or a stream's connection ended."""

    code = "UNAVAILABLE"


class DataLoss(Error):
    """Damaged stored data: the daemon names the case (and sets it aside)."""

    code = "DATA_LOSS"


class Unauthenticated(Error):
    """A missing or wrong token, or a TLS handshake refused over a certificate."""

    code = "UNAUTHENTICATED"
