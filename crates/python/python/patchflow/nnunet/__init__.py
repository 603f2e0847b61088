"""nnU-Net v2 trained with the PGPS curriculum from patchflow daemons.

    python -m patchflow.nnunet train DATASET CONFIGURATION FOLD --server ENDPOINT \\
        --curriculum pgps|pgps-plus|pgps-performance|rpss|constant

runs nnU-Net's own training (`nnunetv2.run.run_training.run_training`) with one of the trainer
classes of `patchflow.nnunet.trainers`:

    constant          nnUNetTrainerPatchflow
    pgps              nnUNetTrainerPatchflow_PGPS
    pgps-plus         nnUNetTrainerPatchflow_PGPSplus
    pgps-performance  nnUNetTrainerPatchflow_PGPSperformance
    rpss              nnUNetTrainerPatchflow_RPSS

`nnUNetv2_train -tr nnUNetTrainerPatchflow_PGPS` finds them too when `nnUNet_extTrainer` names
`trainer_path()` (`export nnUNet_extTrainer=$(python -m patchflow.nnunet trainer-path)`), with
the daemon's address in `PATCHFLOW_SERVER` (see `patchflow.nnunet._settings`).

Importing this package does not import nnU-Net; the trainer classes are loaded on first use.
"""

from __future__ import annotations

import os

__all__ = [
    "CLASS_NAMES",
    "trainer_path",
    "nnUNetTrainerPatchflow",
    "nnUNetTrainerPatchflow_PGPS",
    "nnUNetTrainerPatchflow_PGPSplus",
    "nnUNetTrainerPatchflow_PGPSperformance",
    "nnUNetTrainerPatchflow_RPSS",
]

#: curriculum mode -> trainer class name
CLASS_NAMES = {
    "constant": "nnUNetTrainerPatchflow",
    "pgps": "nnUNetTrainerPatchflow_PGPS",
    "pgps-plus": "nnUNetTrainerPatchflow_PGPSplus",
    "pgps-performance": "nnUNetTrainerPatchflow_PGPSperformance",
    "rpss": "nnUNetTrainerPatchflow_RPSS",
}


def trainer_path() -> str:
    """The folder to put in `nnUNet_extTrainer` so that `nnUNetv2_train -tr NAME` finds the
    patchflow trainers (it holds one module that imports them)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_path")


def __getattr__(name: str):
    if name in CLASS_NAMES.values():
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'patchflow.nnunet' has no attribute {name!r}")
