"""The patchflow trainers, for nnU-Net's external trainer search (`nnUNet_extTrainer` pointing at
this folder makes `nnUNetv2_train -tr nnUNetTrainerPatchflow_PGPS` find them)."""

from patchflow.nnunet.trainers import (  # noqa: F401
    nnUNetTrainerPatchflow,
    nnUNetTrainerPatchflow_PGPS,
    nnUNetTrainerPatchflow_PGPSperformance,
    nnUNetTrainerPatchflow_PGPSplus,
    nnUNetTrainerPatchflow_RPSS,
)
