"""The settings of a patchflow-fed nnU-Net run, carried in environment variables.

nnU-Net builds its trainer as `cls(plans, configuration, fold, dataset_json, device)` (and again
in every DDP process, and at inference), so the daemon's address and the run's seed cannot be
constructor arguments: `python -m patchflow.nnunet train` writes them into the environment, and
a plain `nnUNetv2_train -tr nnUNetTrainerPatchflow_PGPS` reads the same variables:

    PATCHFLOW_SERVER              daemon endpoint(s), comma-separated (required)
    PATCHFLOW_TOKEN_FILE          file holding the daemons' bearer token
    PATCHFLOW_TOKEN               the token itself (not with PATCHFLOW_TOKEN_FILE)
    PATCHFLOW_TLS_CA, PATCHFLOW_TLS_CERT, PATCHFLOW_TLS_KEY, PATCHFLOW_TLS_DOMAIN
    PATCHFLOW_NNUNET_DATASET      the daemon's name for the store (default: nnU-Net's dataset
                                  name, e.g. Dataset001_BrainTumour)
    PATCHFLOW_NNUNET_SEED         the batch sequence (default 0; a resumed run keeps its own)
    PATCHFLOW_NNUNET_EPOCHS, PATCHFLOW_NNUNET_ITERATIONS, PATCHFLOW_NNUNET_VAL_ITERATIONS
                                  override nnU-Net's 1000 epochs, 250 and 50 iterations
    PATCHFLOW_NNUNET_NO_MIRROR_AXES
                                  axes never mirrored, e.g. "2" or "0,2" (nnU-Net's array
                                  frame, the plan's patch axes); also left out at inference
    PATCHFLOW_NNUNET_RECORD       append one JSON line per training batch to this file
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} is below {minimum}")
    return value


def _path(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    return raw or None


@dataclass(frozen=True)
class Settings:
    """What the trainer needs besides nnU-Net's own arguments (see the module docs)."""

    endpoints: tuple[str, ...] = ()
    token_file: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_domain: str | None = None
    dataset: str | None = None
    seed: int | None = None
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    no_mirror_axes: tuple[int, ...] = ()
    record: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings in `env` (default: `os.environ`)."""
        env = os.environ if env is None else env
        endpoints = tuple(e.strip() for e in env.get("PATCHFLOW_SERVER", "").split(",") if e.strip())
        axes: list[int] = []
        raw_axes = env.get("PATCHFLOW_NNUNET_NO_MIRROR_AXES", "").strip()
        for part in filter(None, (p.strip() for p in raw_axes.replace(" ", ",").split(","))):
            if part not in ("0", "1", "2"):
                raise SettingsError(
                    f"PATCHFLOW_NNUNET_NO_MIRROR_AXES={raw_axes!r}: {part!r} is not an axis 0, 1 or 2"
                )
            if int(part) not in axes:
                axes.append(int(part))
        token_file, token = _path(env, "PATCHFLOW_TOKEN_FILE"), env.get("PATCHFLOW_TOKEN") or None
        if token_file and token:
            raise SettingsError("give the token either in PATCHFLOW_TOKEN_FILE or in PATCHFLOW_TOKEN, not both")
        return cls(
            endpoints=endpoints,
            token_file=token_file,
            token=token,
            tls_ca=_path(env, "PATCHFLOW_TLS_CA"),
            tls_cert=_path(env, "PATCHFLOW_TLS_CERT"),
            tls_key=_path(env, "PATCHFLOW_TLS_KEY"),
            tls_domain=_path(env, "PATCHFLOW_TLS_DOMAIN"),
            dataset=_path(env, "PATCHFLOW_NNUNET_DATASET"),
            seed=_int(env, "PATCHFLOW_NNUNET_SEED", 0),
            epochs=_int(env, "PATCHFLOW_NNUNET_EPOCHS", 1),
            iterations=_int(env, "PATCHFLOW_NNUNET_ITERATIONS", 1),
            val_iterations=_int(env, "PATCHFLOW_NNUNET_VAL_ITERATIONS", 1),
            no_mirror_axes=tuple(sorted(axes)),
            record=_path(env, "PATCHFLOW_NNUNET_RECORD"),
        )

    def to_env(self) -> dict[str, str]:
        """The variables that give these settings (unset ones left out)."""
        out: dict[str, str] = {}
        if self.endpoints:
            out["PATCHFLOW_SERVER"] = ",".join(self.endpoints)
        for name, value in (
            ("PATCHFLOW_TOKEN_FILE", self.token_file),
            ("PATCHFLOW_TOKEN", self.token),
            ("PATCHFLOW_TLS_CA", self.tls_ca),
            ("PATCHFLOW_TLS_CERT", self.tls_cert),
            ("PATCHFLOW_TLS_KEY", self.tls_key),
            ("PATCHFLOW_TLS_DOMAIN", self.tls_domain),
            ("PATCHFLOW_NNUNET_DATASET", self.dataset),
            ("PATCHFLOW_NNUNET_SEED", self.seed),
            ("PATCHFLOW_NNUNET_EPOCHS", self.epochs),
            ("PATCHFLOW_NNUNET_ITERATIONS", self.iterations),
            ("PATCHFLOW_NNUNET_VAL_ITERATIONS", self.val_iterations),
            ("PATCHFLOW_NNUNET_RECORD", self.record),
        ):
            if value is not None:
                out[name] = str(value)
        if self.no_mirror_axes:
            out["PATCHFLOW_NNUNET_NO_MIRROR_AXES"] = ",".join(map(str, self.no_mirror_axes))
        return out
