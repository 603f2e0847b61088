"""nnU-Net v2 trainers whose training batches come from patchflow daemons.

`nnUNetTrainerPatchflow` (constant patch, nnU-Net's own schedule) and the curriculum variants
`nnUNetTrainerPatchflow_PGPS`, `_PGPSplus`, `_PGPSperformance` and `_RPSS` (the authors' PGPS,
PGPS+, performance mode and random patch-size sampling) are nnU-Net's `nnUNetTrainer` with the
smallest surface changed:

* `get_dataloaders`: the training iterator is one live patchflow stream
  (`patchflow.torch.CurriculumLoader`) over the fold's training cases, with the daemon doing the
  sampling and nnU-Net's default augmentation; the validation loader is nnU-Net's own, at the
  plan's patch, over the fold's validation cases;
* `on_train_epoch_start`: places the stream at the epoch's first batch (`epoch × iterations`);
  the patch (and batch) of each step follows the schedule by reconfiguring the stream, so a
  stage change starts no process and rebuilds no loader;
* `on_train_epoch_end`: logs the time spent waiting for batches;
* `on_epoch_end`: saves `checkpoint_ZxYxX.pth` (the patch just finished) at every size change,
  besides nnU-Net's own checkpoints;
* `save_checkpoint`/`load_checkpoint`: the run's seed and schedule travel in the checkpoint's
  `init_args["patchflow"]`, so `--c` continues the same batch sequence;
* `on_train_end`: closes the stream.

Foreground oversampling is 0.5 in the curriculum modes (the authors' trainers), nnU-Net's 0.33
for the constant patch; validation, logging, plotting, checkpoints and the final validation are
nnU-Net's. Settings (daemon address, seed, ...) come from the environment: see `_settings`.

Known difference from nnU-Net: its `MaskImageTransform` zeroes, after the intensity
augmentations, the image wherever the segmentation is −1; the daemon serves voxels outside
nnU-Net's non-zero mask as label 0, so only the voxels beyond the volume (served as padding)
are zeroed here.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from .._client import Client
from .._schedule import Schedule, schedule
from ._loader import DaemonBatches, StageLoader, augmentation_for
from ._settings import Settings
from ._targets import TargetMaker

__all__ = [
    "nnUNetTrainerPatchflow",
    "nnUNetTrainerPatchflow_PGPS",
    "nnUNetTrainerPatchflow_PGPSplus",
    "nnUNetTrainerPatchflow_PGPSperformance",
    "nnUNetTrainerPatchflow_RPSS",
    "TRAINERS",
    "STATE_KEY",
]

# Key of the run's identity in the checkpoint's `init_args`.
STATE_KEY = "patchflow"
_STATE_VERSION = 1


class PatchflowTrainerError(RuntimeError):
    """The run cannot be fed by patchflow as configured; the message says what to change."""


def pools_per_axis(pool_op_kernel_sizes: List[List[int]]) -> tuple[int, int, int]:
    """Stride-2 poolings per axis of nnU-Net's network (`num_pool_per_axis`)."""
    counts = [0, 0, 0]
    for kernel in pool_op_kernel_sizes:
        for a, k in enumerate(kernel):
            if k > 1:
                counts[a] += 1
    return tuple(counts)


class nnUNetTrainerPatchflow(nnUNetTrainer):
    """nnU-Net's trainer fed by patchflow daemons, constant patch (the plan's)."""

    #: the schedule mode (`patchflow.modes()`)
    curriculum = "constant"

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.patchflow_settings = Settings.from_env()
        s = self.patchflow_settings
        if s.epochs is not None:
            self.num_epochs = s.epochs
        if s.iterations is not None:
            self.num_iterations_per_epoch = s.iterations
        if s.val_iterations is not None:
            self.num_val_iterations_per_epoch = s.val_iterations
        self.patchflow_seed = 0 if s.seed is None else s.seed
        self.patchflow_schedule = self._build_schedule()
        # The authors' trainers oversample 0.5 during the curriculum (validation included);
        # nnU-Net's 0.33 with the constant patch.
        self.oversample_foreground_percent = self.patchflow_schedule.foreground_oversample
        self.my_init_kwargs[STATE_KEY] = self._patchflow_state()

    # -- the run's identity -------------------------------------------------------------------

    def _build_schedule(self) -> Schedule:
        patch = [int(v) for v in self.configuration_manager.patch_size]
        if len(patch) != 3:
            raise PatchflowTrainerError(
                f"configuration {self.configuration_name!r} has a {len(patch)}D patch {patch}; patchflow "
                "serves 3D patches (train a 3d_fullres or 3d_lowres configuration)"
            )
        pools = pools_per_axis(self.configuration_manager.pool_op_kernel_sizes)
        return schedule(
            final_patch=patch,
            pools=pools,
            epochs=self.num_epochs,
            batch=int(self.configuration_manager.batch_size),
            mode=self.curriculum,
        )

    def _patchflow_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "curriculum": self.curriculum,
            "seed": self.patchflow_seed,
            "epochs": self.num_epochs,
            "iterations": self.num_iterations_per_epoch,
            "dataset": self._served_dataset(),
        }

    def _served_dataset(self) -> str:
        return self.patchflow_settings.dataset or self.plans_manager.dataset_name

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, then the run's seed and schedule from the checkpoint (`--c` continues the
        same batch sequence)."""
        super().load_checkpoint(filename_or_checkpoint)
        state = self.my_init_kwargs.get(STATE_KEY)
        if state is None:
            raise PatchflowTrainerError(
                f"the checkpoint has no init_args[{STATE_KEY!r}]: it was not written by a patchflow trainer"
            )
        mine = self._patchflow_state()
        for key in ("curriculum", "epochs", "iterations"):
            if state.get(key) != mine[key]:
                raise PatchflowTrainerError(
                    f"the checkpoint's run has {key} = {state.get(key)!r}, this one {mine[key]!r}; "
                    "a run continues with the settings it started with"
                )
        if state.get("seed") != self.patchflow_seed:
            self.print_to_log_file(
                f"patchflow: continuing the checkpoint's batch sequence, seed {state.get('seed')} "
                f"(PATCHFLOW_NNUNET_SEED {self.patchflow_seed} ignored)"
            )
        self.patchflow_seed = int(state["seed"])
        self.my_init_kwargs[STATE_KEY] = self._patchflow_state()

    # -- data -----------------------------------------------------------------------------

    def _client(self) -> Client:
        s = self.patchflow_settings
        if not s.endpoints:
            raise PatchflowTrainerError(
                "PATCHFLOW_SERVER is not set: give the daemon's endpoint (python -m patchflow.nnunet train "
                "... --server ENDPOINT, or export PATCHFLOW_SERVER=unix:/run/patchflow.sock)"
            )
        return Client(
            list(s.endpoints),
            token=s.token,
            token_file=s.token_file,
            tls_ca=s.tls_ca,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            tls_domain=s.tls_domain,
        )

    def _check_served(self, client: Client, dataset: str, cases: list[str]) -> None:
        names = [d["name"] for d in client.list_datasets()]
        if dataset not in names:
            raise PatchflowTrainerError(
                f"the daemon at {client.endpoints} serves {names}, not {dataset!r}: ingest "
                f"{self.preprocessed_dataset_folder} (patchflow ingest) and serve it, or set "
                "PATCHFLOW_NNUNET_DATASET to the daemon's name for it"
            )
        served = {c["id"] for c in client.describe(dataset)["cases"]}
        missing = sorted(set(cases) - served)
        if missing:
            raise PatchflowTrainerError(
                f"dataset {dataset!r} on the daemon lacks {len(missing)} training case(s) of fold "
                f"{self.fold}, e.g. {missing[:3]}: ingest the same preprocessed folder "
                f"({self.preprocessed_dataset_folder})"
            )

    def _mirror_axes(self, mirror_axes) -> tuple[int, ...]:
        no = set(self.patchflow_settings.no_mirror_axes)
        return tuple(a for a in (mirror_axes or ()) if a not in no)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's, with the axes the user never mirrors left out (training and inference)."""
        rotation, dummy_2d, initial_patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        mirror_axes = self._mirror_axes(mirror_axes)
        # None, not (), when nothing is mirrored: nnU-Net's predictor takes max() of the axes
        self.inference_allowed_mirroring_axes = mirror_axes or None
        return rotation, dummy_2d, initial_patch, mirror_axes

    def get_dataloaders(self):
        """The training batches from the daemon (`DaemonBatches`), nnU-Net's validation loader."""
        if self.is_cascaded:
            raise PatchflowTrainerError(
                f"configuration {self.configuration_name!r} is a cascade stage; patchflow does not serve "
                "the previous stage's segmentations"
            )
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch = [int(v) for v in self.configuration_manager.patch_size]
        ds_scales = self._get_deep_supervision_scales()
        self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        regions = lm.foreground_regions if lm.has_regions else None
        val_transforms = self.get_validation_transforms(
            ds_scales, is_cascaded=False, foreground_labels=lm.foreground_labels, regions=regions,
            ignore_label=lm.ignore_label,
        )
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_val = nnUNetDataLoader(
            dataset_val, self.batch_size, patch, patch, lm,
            oversample_foreground_percent=self.oversample_foreground_percent,
            sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling,
        )
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            val = SingleThreadedAugmenter(dl_val, None)
        else:
            val = NonDetMultiThreadedAugmenter(
                data_loader=dl_val, transform=None, num_processes=max(1, n_proc // 2),
                num_cached=max(3, n_proc // 4), seeds=None, pin_memory=self.device.type == "cuda",
                wait_time=0.002,
            )
        _ = next(val)

        client = self._client()
        dataset = self._served_dataset()
        cases = sorted(str(c) for c in dataset_tr.identifiers)
        self._check_served(client, dataset, cases)
        use_mask = self.configuration_manager.use_mask_for_norm or []
        targets = TargetMaker(
            ds_scales, regions=regions, ignore_label=lm.ignore_label,
            mask_channels=[i for i, m in enumerate(use_mask) if m],
        )
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.is_ddp else (0, 1)
        loader = StageLoader(
            client, dataset, self.patchflow_schedule,
            iters_per_epoch=self.num_iterations_per_epoch,
            augment="nnunet", augment_for=augmentation_for,
            seed=self.patchflow_seed, rank=0, world_size=1,
            no_mirror_axes=self.patchflow_settings.no_mirror_axes,
            cases=cases,
        )
        train = DaemonBatches(loader, targets, rank=rank, world_size=world, record=self.patchflow_settings.record)
        s = self.patchflow_schedule
        self.print_to_log_file(
            f"patchflow: training batches from {list(client.endpoints)} (dataset {dataset!r}, "
            f"{len(cases)} training cases, seed {self.patchflow_seed}), curriculum {s.mode}: "
            f"{len(s.stages)} stage(s), final patch {list(s.final_patch)}, foreground oversampling "
            f"{s.foreground_oversample}"
        )
        return train, val

    # -- the epoch loop ---------------------------------------------------------------------

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.dataloader_train.begin_epoch(self.current_epoch)
        s = self.patchflow_schedule
        if s.mode == "rpss":
            self.print_to_log_file(f"patchflow: patch sizes drawn per iteration from {[list(p) for p in s.sizes]}")
        else:
            stage = s.stage_for(self.current_epoch)
            patch, batch = s.patch_for(self.current_epoch, self.current_epoch * self.num_iterations_per_epoch,
                                       self.patchflow_seed)
            self.print_to_log_file(
                f"patchflow: patch {list(patch)}, batch {batch} (stage {stage.index + 1} of {len(s.stages)})"
            )

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        wait, batches, sizes = self.dataloader_train.take_wait()
        per = 1000.0 * wait / batches if batches else 0.0
        shapes = ", ".join(f"{list(p)}x{b}: {n}" for (p, b), n in sorted(sizes.items()))
        self.print_to_log_file(
            f"patchflow: data wait {wait:.3f} s over {batches} batches ({per:.2f} ms per batch); "
            f"patch x batch: {shapes}"
        )

    def _stage_patch(self, epoch: int) -> tuple[int, int, int] | None:
        s = self.patchflow_schedule
        if s.mode == "rpss":
            return None
        return tuple(s.patch_for(epoch, epoch * self.num_iterations_per_epoch, self.patchflow_seed)[0])

    def on_epoch_end(self):
        """nnU-Net's, after `checkpoint_ZxYxX.pth` when the next epoch trains another size."""
        epoch = self.current_epoch
        here, after = self._stage_patch(epoch), self._stage_patch(epoch + 1)
        if here is not None and here != after and epoch + 1 < self.num_epochs:
            name = "checkpoint_" + "x".join(str(v) for v in here) + ".pth"
            self.print_to_log_file(f"patchflow: the patch grows to {list(after)}; saving {name}")
            self.save_checkpoint(join(self.output_folder, name))
        super().on_epoch_end()

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_train, DaemonBatches):
            self.dataloader_train.close()


class nnUNetTrainerPatchflow_PGPS(nnUNetTrainerPatchflow):
    """PGPS (efficiency): the patch grows from the smallest size, batch as planned."""

    curriculum = "pgps"


class nnUNetTrainerPatchflow_PGPSplus(nnUNetTrainerPatchflow):
    """PGPS+: the patch grows, the batch shrinks from a larger start toward the plan's."""

    curriculum = "pgps-plus"


class nnUNetTrainerPatchflow_PGPSperformance(nnUNetTrainerPatchflow):
    """The journal's performance mode: voxels per batch held at the plan's."""

    curriculum = "pgps-performance"


class nnUNetTrainerPatchflow_RPSS(nnUNetTrainerPatchflow):
    """Random patch-size sampling: every iteration draws one of the PGPS sizes."""

    curriculum = "rpss"


#: curriculum mode -> trainer class
TRAINERS = {
    cls.curriculum: cls
    for cls in (
        nnUNetTrainerPatchflow,
        nnUNetTrainerPatchflow_PGPS,
        nnUNetTrainerPatchflow_PGPSplus,
        nnUNetTrainerPatchflow_PGPSperformance,
        nnUNetTrainerPatchflow_RPSS,
    )
}
