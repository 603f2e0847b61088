"""`python -m patchflow.nnunet`: nnU-Net v2's training with a patchflow trainer.

    python -m patchflow.nnunet train DATASET CONFIGURATION FOLD --server ENDPOINT \\
        [--token-file F] --curriculum pgps|pgps-plus|pgps-performance|rpss|constant \\
        [-device cpu|cuda] [--c] [-p PLANS] [--npz]
    python -m patchflow.nnunet trainer-path

`train` writes the patchflow settings into the environment (`patchflow.nnunet._settings`),
adds the trainers' folder to `nnUNet_extTrainer` and calls nnU-Net's own `run_training` with the
class of the curriculum, so everything else (folders, checkpoints, `--c`, the final validation)
is nnU-Net's. `trainer-path` prints that folder, for `nnUNetv2_train -tr ...`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

from . import CLASS_NAMES, trainer_path
from ._settings import Settings, SettingsError


def _axes(text: str) -> tuple[int, ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part not in ("0", "1", "2"):
            raise argparse.ArgumentTypeError(f"{part!r} is not an axis 0, 1 or 2")
        out.append(int(part))
    return tuple(sorted(set(out)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m patchflow.nnunet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train nnU-Net with batches from patchflow daemons")
    t.add_argument("dataset_name_or_id", help="nnU-Net's dataset (e.g. 4 or Dataset004_Hippocampus)")
    t.add_argument("configuration", help="nnU-Net's configuration (3d_fullres, 3d_lowres)")
    t.add_argument("fold", help="fold 0-4 or 'all'")
    t.add_argument("--server", required=True, action="append",
                   help="daemon endpoint (unix:/path, host:port, https://host:port); repeat for several")
    t.add_argument("--token-file", help="file holding the daemons' bearer token")
    t.add_argument("--tls-ca", help="CA certificate of https daemons")
    t.add_argument("--curriculum", required=True, choices=list(CLASS_NAMES), help="patch-size schedule")
    t.add_argument("--dataset-name", help="the daemon's name for the store (default: nnU-Net's dataset name)")
    t.add_argument("--seed", type=int, help="the batch sequence (default 0; --c keeps the checkpoint's)")
    t.add_argument("--epochs", type=int, help="epochs (default nnU-Net's 1000)")
    t.add_argument("--iterations", type=int, help="training iterations per epoch (default 250)")
    t.add_argument("--val-iterations", type=int, help="validation iterations per epoch (default 50)")
    t.add_argument("--no-mirror-axes", type=_axes, default=(),
                   help="axes never mirrored, e.g. 2 or 0,2 (nnU-Net's array frame), in training and inference")
    t.add_argument("-device", default="cuda", choices=["cpu", "cuda"], help="as nnUNetv2_train")
    t.add_argument("--c", action="store_true", help="continue from the latest checkpoint (same batch sequence)")
    t.add_argument("-p", default="nnUNetPlans", help="plans identifier, as nnUNetv2_train")
    t.add_argument("--npz", action="store_true", help="save the final validation's softmax, as nnUNetv2_train")
    t.add_argument("--val-best", action="store_true", help="final validation with checkpoint_best, as nnUNetv2_train")
    t.add_argument("-pretrained_weights", help="as nnUNetv2_train")
    sub.add_parser("trainer-path", help="print the folder for nnUNet_extTrainer")
    return parser


def _train(args: argparse.Namespace) -> int:
    current = Settings.from_env()
    settings = Settings(
        endpoints=tuple(e for s in args.server for e in s.split(",") if e.strip()),
        token_file=args.token_file,
        tls_ca=args.tls_ca or current.tls_ca,
        tls_cert=current.tls_cert,
        tls_key=current.tls_key,
        tls_domain=current.tls_domain,
        dataset=args.dataset_name or current.dataset,
        seed=args.seed if args.seed is not None else current.seed,
        epochs=args.epochs or current.epochs,
        iterations=args.iterations or current.iterations,
        val_iterations=args.val_iterations or current.val_iterations,
        no_mirror_axes=args.no_mirror_axes or current.no_mirror_axes,
        record=current.record,
    )
    for name in ("PATCHFLOW_TOKEN_FILE", "PATCHFLOW_TOKEN") if args.token_file else ():
        os.environ.pop(name, None)
    os.environ.update(settings.to_env())
    Settings.from_env()  # the variables read back as given
    ext = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = trainer_path() if not ext else os.pathsep.join([trainer_path(), ext])

    import torch
    from nnunetv2.run.run_training import run_training

    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    run_training(
        args.dataset_name_or_id,
        args.configuration,
        args.fold,
        CLASS_NAMES[args.curriculum],
        args.p,
        pretrained_weights=args.pretrained_weights,
        export_validation_probabilities=args.npz,
        continue_training=args.c,
        val_with_best=args.val_best,
        device=torch.device(args.device),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "trainer-path":
        print(trainer_path())
        return 0
    try:
        return _train(args)
    except SettingsError as e:
        print(f"patchflow.nnunet: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
