#!/usr/bin/env python3
"""nnU-Net v2's trainer fed by its own loader against the same trainer fed by a patchflow daemon.

    python benches/compare/nnunet_trainer.py --patchflow target/release/patchflow \\
        [--work target/compare/nnunet_trainer] [--cases 6] [--shape 64,96,96] \\
        [--seconds 30] [--epochs 2] [--iterations 10] [-device cpu|cuda] [--loaders nnunet,patchflow]

1. Data: the project's phantom in nnU-Net's raw layout (tests/nnunet/nnunet_fixture.py: two
   MR-like channels), `nnUNetv2_plan_and_preprocess -c 3d_fullres` (nnU-Net's own plan on this
   machine), `patchflow ingest` of the preprocessed folder, `patchflow serve --workers 2`.
2. Per loader, in a fresh process (`child` below), nnU-Net's trainer as `nnUNetv2_train` builds
   it at the plan's patch and batch, with augmentation:
   - `nnunet`: `nnUNetTrainer` with `nnUNet_n_proc_DA=2` (its NonDetMultiThreadedAugmenter);
   - `patchflow`: `patchflow.nnunet`'s `nnUNetTrainerPatchflow` (constant patch, the daemon's
     nnU-Net augmentation, 2 daemon workers).
   Measured: batches per second delivered into the trainer (`next(trainer.dataloader_train)`
   only, `--seconds`, after a warm-up), then a short training run (`--epochs` × `--iterations`,
   nnU-Net's `run_training` loop with its validation, 2 validation iterations) with the time per
   epoch (nnU-Net's logged timestamps) and the data wait per iteration (time blocked in
   `next()`).
3. Writes `RESULT.json` per loader under `--work` and prints a Markdown table.

Everything lives under `--work` (git-ignored target/ by default); delete it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATASET = "Dataset903_PhantomBench"


def sh(cmd, env=None, log=None):
    print("+", " ".join(map(str, cmd)), flush=True)
    out = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if log is not None:
        Path(log).write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def prepare(args, env) -> Path:
    work = args.work
    raw, pre = work / "raw", work / "pre"
    store = work / "stores" / DATASET
    if store.is_dir() and (pre / DATASET / "nnUNetPlans.json").is_file():
        return store
    phantom = work / "phantom"
    sh([args.patchflow, "--quiet", "phantom", phantom, "--cases", str(args.cases), "--shape", args.shape])
    sh([sys.executable, ROOT / "tests/nnunet/nnunet_fixture.py", "raw", phantom, raw / DATASET])
    shutil.rmtree(phantom)
    sh([sys.executable, "-c",
        "import sys\n"
        "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry\n"
        "sys.argv = ['nnUNetv2_plan_and_preprocess', '-d', '903', '-c', '3d_fullres', '-np', '2', '-npfp', '2']\n"
        "plan_and_preprocess_entry()"], env=env, log=work / "preprocess.log")
    sh([args.patchflow, "--quiet", "ingest", pre / DATASET / "nnUNetPlans_3d_fullres", "--out", store])
    return store


def child(loader: str, seconds: float, epochs: int, iterations: int, device: str, out: str) -> None:
    """One loader's measurements, in this process (nnU-Net's environment already set)."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, join
    from nnunetv2.paths import nnUNet_preprocessed

    if loader == "nnunet":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as Base
    else:
        from patchflow.nnunet.trainers import nnUNetTrainerPatchflow as Base

    class Timed:
        """Counts the time spent blocked in next() of the wrapped iterator."""

        def __init__(self, inner):
            self.inner, self.wait, self.calls = inner, 0.0, 0

        def __iter__(self):
            return self

        def __next__(self):
            t = time.perf_counter()
            b = next(self.inner)
            self.wait += time.perf_counter() - t
            self.calls += 1
            return b

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Bench(Base):
        """The trainer with its training iterator timed (the patchflow trainer also logs its own
        wait; both are read the same way here)."""

        def get_dataloaders(self):
            tr, val = super().get_dataloaders()
            return Timed(tr), val

        def on_train_epoch_end(self, outputs):
            t = self.dataloader_train
            self.epoch_waits.append((t.wait, t.calls))
            t.wait, t.calls = 0.0, 0
            super().on_train_epoch_end(outputs)

        def on_train_end(self):
            # nnU-Net shuts its augmenters down (and patchflow its stream) only when unwrapped
            self.dataloader_train = self.dataloader_train.inner
            super().on_train_end()

    base = join(nnUNet_preprocessed, DATASET)
    plans = load_json(join(base, "nnUNetPlans.json"))
    plans["continue_training"] = False
    ds = load_json(join(base, "dataset.json"))
    trainer = Bench(plans, "3d_fullres", 0, ds, torch.device(device))
    trainer.epoch_waits = []
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 2
    if loader == "patchflow":
        trainer.patchflow_schedule = trainer._build_schedule()
        trainer.my_init_kwargs["patchflow"] = trainer._patchflow_state()
    trainer.on_train_start()
    patch, batch = list(trainer.configuration_manager.patch_size), trainer.batch_size
    # 1. Batches per second into the trainer (data only).
    dl = trainer.dataloader_train
    if loader == "patchflow":
        dl.inner.begin_epoch(0)

    def pull():
        # the patchflow iterator delivers an epoch's batches, then wants the next epoch
        if loader == "patchflow" and dl.inner._step >= dl.inner.loader.steps_per_epoch:
            dl.inner.begin_epoch(dl.inner._epoch + 1)
        next(dl)

    for _ in range(5):
        pull()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pull()
        n += 1
    data_bps = n / (time.perf_counter() - t0)
    dl.wait, dl.calls = 0.0, 0
    if loader == "patchflow":
        dl.inner.take_wait()
    # 2. nnU-Net's training loop (run_training without a second on_train_start; the patchflow
    # trainer places its stream at epoch 0 again).
    trainer.on_train_start = lambda: None
    trainer.run_training()
    log = trainer.logger.local_logger.my_fantastic_logging
    epoch_s = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    waits = [w / c for w, c in trainer.epoch_waits if c]
    result = {
        "loader": loader,
        "patch": patch,
        "batch": batch,
        "device": device,
        "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
        "data_batches_per_s": data_bps,
        "data_batches": n,
        "epochs": epochs,
        "iterations": iterations,
        "epoch_s": epoch_s,
        "wait_per_iteration_s": waits,
        "mean_epoch_s": float(np.mean(epoch_s)),
        "mean_wait_per_iteration_s": float(np.mean(waits)),
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    os._exit(0)  # nnU-Net's augmenter processes are gone; skip slow interpreter teardown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patchflow", type=Path, default=ROOT / "target/release/patchflow")
    p.add_argument("--work", type=Path, default=ROOT / "target/compare/nnunet_trainer")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--shape", default="64,96,96")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--loaders", default="nnunet,patchflow")
    p.add_argument("--prepare-only", action="store_true", help="make the data and stop")
    p.add_argument("--child", nargs=2, metavar=("LOADER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.seconds, args.epochs, args.iterations, args.device, args.child[1])
        return
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(args.work / "raw"),
        nnUNet_preprocessed=str(args.work / "pre"),
        nnUNet_results=str(args.work / "results"),
        OMP_NUM_THREADS="1",
        nnUNet_compile="false",
    )
    store = prepare(args, env)
    if args.prepare_only:
        return
    sock = args.work / "d.sock"
    sock.unlink(missing_ok=True)
    daemon = subprocess.Popen(
        [str(args.patchflow), "--quiet", "serve", str(store), "--no-tcp", "--unix", str(sock), "--workers", "2"],
        stdin=subprocess.DEVNULL,
    )
    results = {}
    try:
        for loader in args.loaders.split(","):
            shutil.rmtree(args.work / "results", ignore_errors=True)
            out = args.work / f"{loader}.json"
            child_env = env | {"nnUNet_n_proc_DA": "2", "PATCHFLOW_SERVER": f"unix:{sock}"}
            sh([sys.executable, __file__, "--child", loader, out, "--seconds", str(args.seconds), "--epochs",
                str(args.epochs), "--iterations", str(args.iterations), "-device", args.device],
               env=child_env, log=args.work / f"{loader}.log")
            results[loader] = json.loads(out.read_text())
    finally:
        daemon.terminate()
        daemon.wait()
    print()
    print("| loader | patch × batch | batches/s into the trainer (data only) | time per epoch | data wait per iteration |")
    print("| --- | --- | --- | --- | --- |")
    for loader, r in results.items():
        print(f"| {loader} | {r['patch']} × {r['batch']} | {r['data_batches_per_s']:.2f} | "
              f"{r['mean_epoch_s']:.1f} s ({r['iterations']} it.) | {1000 * r['mean_wait_per_iteration_s']:.0f} ms |")
    if "nnunet" in results and "patchflow" in results:
        a, b = results["patchflow"], results["nnunet"]
        print(f"\npatchflow / nnU-Net: batches/s {a['data_batches_per_s'] / b['data_batches_per_s']:.1f}×, "
              f"epoch time {a['mean_epoch_s'] / b['mean_epoch_s']:.2f}×, data wait "
              f"{a['mean_wait_per_iteration_s'] / max(b['mean_wait_per_iteration_s'], 1e-9):.3f}×")


if __name__ == "__main__":
    main()
