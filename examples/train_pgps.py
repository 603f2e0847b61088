#!/usr/bin/env python3
"""Train a small 3D U-Net in plain PyTorch with the PGPS curriculum, fed by a patchflow daemon.

A phantom dataset, its store and a daemon on a Unix socket, then this script (CPU, under a minute on 2 cores):

    patchflow phantom /tmp/pf/raw --cases 6 --shape 48,64,64
    patchflow ingest /tmp/pf/raw --out /tmp/pf/phantom
    patchflow serve /tmp/pf/phantom --unix /tmp/pf/patchflow.sock --no-tcp &
    python examples/train_pgps.py --endpoint unix:/tmp/pf/patchflow.sock --dataset phantom

The patch grows stage by stage (`patchflow.schedule`); `CurriculumLoader` reconfigures its live
stream at each stage, the daemon crops (and, with --augment, augments) in Rust, and batches
arrive as tensors sharing the daemon's shared-memory slot. The network is fully convolutional
(every patch edge is a multiple of 2^pools), so it takes every stage's patch. Under `torchrun` (gloo or NCCL),
each rank gets its share of the one-process sequence; `--checkpoint` saves and resumes the
model, the optimiser and the loader's position.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import patchflow
import patchflow.torch as pft


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3d(nn.Module):
    """A plain 3D U-Net (nnU-Net's layout, small): `levels` resolutions, stride-2 poolings."""

    def __init__(self, channels: int, classes: int, width: int = 8, levels: int = 3) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose3d(w_low, w, 2, stride=2))
            self.fuse.append(block(2 * w, w))
        self.head = nn.Conv3d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.down):
            x = down(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, skips[-2::-1]):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def dice_ce(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes, ignoring padded voxels."""
    valid = target != ignore
    target = torch.where(valid, target, torch.zeros_like(target))
    ce = (F.cross_entropy(logits, target, reduction="none") * valid).sum() / valid.sum().clamp(min=1)
    probs = logits.softmax(1) * valid.unsqueeze(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1) * valid.unsqueeze(1)
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)[1:]
    denom = (probs + onehot).sum(dims)[1:]
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True, action="append", help="daemon endpoint (repeatable)")
    p.add_argument("--dataset", default="phantom")
    p.add_argument("--final-patch", default="24,24,24", help="z,y,x of the last stage")
    p.add_argument("--pools", default="3,3,3", help="stride-2 poolings per axis (sets the smallest patch)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iters", type=int, default=8, help="iterations per epoch (all ranks)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mode", default="pgps", help=f"one of {patchflow.modes()} or pgps")
    p.add_argument("--augment", action="store_true", help="nnU-Net's default augmentation, in the daemon")
    p.add_argument("--width", type=int, default=4, help="features of the first level")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", help="save (and resume from) this file after every epoch")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ:  # torchrun
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, rank % max(1, torch.cuda.device_count())) if args.device == "cuda" else torch.device(args.device)

    client = patchflow.Client(args.endpoint)
    desc = client.describe(args.dataset)
    ignore = desc["ignore_label"]
    classes = 1 + max(c["value"] for c in desc["classes"] if c["value"] != ignore)
    pools = [int(v) for v in args.pools.split(",")]
    s = patchflow.schedule(
        final_patch=[int(v) for v in args.final_patch.split(",")],
        pools=pools,
        epochs=args.epochs,
        batch=args.batch,
        mode=args.mode,
    )
    if rank == 0:
        print(s.table(), end="")
    # PGPS trains with foreground oversampling 0.5 (the authors' setting).
    loader = pft.CurriculumLoader(
        client, args.dataset, s, iters_per_epoch=args.iters, augment="nnunet" if args.augment else None,
        seed=args.seed, device=device if device.type == "cuda" else None, fraction=0.5,
    )
    # One pooling fewer than the schedule's: the smallest PGPS patch (2^pools) then still leaves
    # 2 voxels per axis at the bottleneck, which instance normalisation needs.
    model = UNet3d(len(desc["channels"]), classes, width=args.width, levels=min(pools)).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    first_epoch = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        first_epoch = loader.next_epoch
        if rank == 0:
            print(f"resumed at epoch {first_epoch}")

    started = time.perf_counter()
    for epoch in range(first_epoch, s.epochs):
        lr = args.lr * (1 - epoch / s.epochs) ** 0.9  # nnU-Net's poly decay
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        losses, waited, t0 = [], 0.0, time.perf_counter()
        batches = loader.epoch(epoch)
        while True:
            w0 = time.perf_counter()
            try:
                image, label = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - w0
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)[:, 0].long()
            opt.zero_grad(set_to_none=True)
            loss = dice_ce(model(image), label, ignore)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
            opt.step()
            losses.append(loss.item())
        if rank == 0:
            patch = "x".join(map(str, s.stage_for(epoch).patch))
            print(f"epoch {epoch:3d}  patch {patch:>9}  loss {sum(losses) / len(losses):.4f}  "
                  f"data wait {waited:5.2f} s of {time.perf_counter() - t0:5.2f} s", flush=True)
        if args.checkpoint and rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "loader": loader.state_dict()},
                       args.checkpoint)
    loader.close()
    if rank == 0:
        print(f"trained {s.epochs - first_epoch} epochs in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
