#!/usr/bin/env python3
"""Patch throughput of the Python peer loaders on one core, on nnU-Net-preprocessed data.

    python loaders.py LOADER --preprocessed DIR --dataset NAME --out DIR
                      [--patches 128,64,32] [--modes crop,aug] [--seconds 20]
                      [--small-seconds 8] [--batch 2] [--foreground 0.33] [--work DIR]

LOADER is one of
  nnunet   nnU-Net v2's own nnUNetDataLoader on its preprocessed (blosc2) folder; crop-only, and
           with nnUNetTrainer.get_training_transforms (3d, default rotation/scaling/mirroring,
           deep supervision off) on its enlarged initial patch, as nnUNetTrainer builds it.
  monai    MONAI RandCropByPosNegLabeld (pos:neg = 0.33:0.67) on arrays cached in memory
           (padded to the patch, fg/bg indices precomputed by FgBgToIndicesd, as MONAI's
           CacheDataset recipe does); augmentation: MONAI's equivalents of nnU-Net's defaults.
  torchio  tio.Queue with tio.LabelSampler (probabilities 0.67 background / 0.33 foreground of a
           binary foreground map), num_workers=0; augmentation: TorchIO's nearest equivalents,
           applied to each patch.
  memmap   the floor: copy a patch of the f32 image and u8 label at random origins from .npy
           memory maps (nnU-Net's preprocessed arrays, converted once).

Every loader reads the same voxels (nnU-Net's preprocessed arrays). Each (mode, patch) runs a
warm-up, then draws batches for --seconds of wall time; patches per CPU second of this process
(time.process_time: every thread) and per wall second are written to OUT/LOADER-MODE-DATASET-P.json.
Run it under `taskset -c 0` with OMP/MKL threads 1 (run.sh does).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

# One thread everywhere, before torch/numpy libraries start their pools.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "BLOSC_NTHREADS"):
    os.environ.setdefault(var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)


# ---------------------------------------------------------------------------------------------
# measurement


def endless(loader):
    """A function returning the loader's next batch, starting a new epoch when one ends."""
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return next_batch


def measure(next_batch, batch, seconds, warmup_batches=2):
    """Draws batches for `seconds` of wall time after a warm-up; returns counts and times."""
    for _ in range(warmup_batches):
        next_batch()
    n = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while True:
        next_batch()
        n += batch
        wall = time.perf_counter() - w0
        if wall >= seconds and n >= 2 * batch:
            break
    cpu = time.process_time() - c0
    return {
        "patches": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "patches_per_s": n / wall,
        "patches_per_cpu_s": n / cpu if cpu > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# data shared by monai / torchio / memmap: nnU-Net's preprocessed arrays


def load_preprocessed(pre):
    """[(case, image f32 [1,z,y,x], label u8 [1,z,y,x])] from an nnU-Net 3d_fullres folder."""
    import blosc2

    blosc2.set_nthreads(1)
    folder = os.path.join(pre, "nnUNetPlans_3d_fullres")
    cases = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
    if not cases:
        raise SystemExit(f"loaders: no preprocessed cases in {folder}")
    out = []
    for c in cases:
        img = np.ascontiguousarray(blosc2.open(os.path.join(folder, c + ".b2nd"), mode="r")[:], dtype=np.float32)
        seg = blosc2.open(os.path.join(folder, c + "_seg.b2nd"), mode="r")[:]
        # nnU-Net marks voxels outside the non-zero crop with -1; they are background here.
        seg = np.where(seg < 0, 0, seg).astype(np.uint8)
        out.append((c, img, seg))
    return out


def pad_to(arr, patch):
    """Zero-pad [c,z,y,x] symmetrically so that every spatial axis holds the patch."""
    pads = [(0, 0)]
    for s, p in zip(arr.shape[1:], patch):
        extra = max(0, p - s)
        pads.append((extra // 2, extra - extra // 2))
    if all(a == 0 and b == 0 for a, b in pads):
        return arr
    return np.pad(arr, pads)


# ---------------------------------------------------------------------------------------------
# nnU-Net v2


def nnunet_factory(args):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = args.preprocessed
    folder = os.path.join(pre, "nnUNetPlans_3d_fullres")
    dataset = infer_dataset_class(folder)(folder)
    plans = PlansManager(os.path.join(pre, "nnUNetPlans.json"))
    config = plans.get_configuration("3d_fullres")
    labels = plans.get_label_manager(load_json(os.path.join(pre, "dataset.json")))

    def make(mode, patch):
        patch = tuple(patch)
        if mode == "crop":
            dl = nnUNetDataLoader(dataset, args.batch, patch, patch, labels,
                                  oversample_foreground_percent=args.foreground, transforms=None)
            return lambda: next(dl), {"loader_patch": list(patch)}
        # As nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size for 3d.
        do_dummy_2d = (max(patch) / patch[0]) > ANISO_THRESHOLD
        rot = (-np.pi, np.pi) if do_dummy_2d else (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
        mirror_axes = (0, 1, 2)
        initial = get_patch_size(patch, rot, rot, rot, (0.85, 1.25))
        if do_dummy_2d:
            initial[0] = patch[0]
        transforms = nnUNetTrainer.get_training_transforms(
            patch, rot, None, mirror_axes, do_dummy_2d,
            use_mask_for_norm=config.use_mask_for_norm, is_cascaded=False,
            foreground_labels=labels.foreground_labels,
            regions=labels.foreground_regions if labels.has_regions else None,
            ignore_label=labels.ignore_label)
        dl = nnUNetDataLoader(dataset, args.batch, tuple(int(i) for i in initial), patch, labels,
                              oversample_foreground_percent=args.foreground, transforms=transforms)
        return lambda: next(dl), {"loader_patch": [int(i) for i in initial]}

    return make


# ---------------------------------------------------------------------------------------------
# MONAI


def monai_factory(args):
    import monai
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import (Compose, FgBgToIndicesd, RandAdjustContrastd, RandCropByPosNegLabeld, RandFlipd,
                                  RandGaussianNoised, RandGaussianSmoothd, RandRotated, RandScaleIntensityd,
                                  RandScaleIntensityFixedMeand, RandSimulateLowResolutiond, RandZoomd, SpatialPadd)

    monai.utils.set_determinism(seed=0)
    cases = load_preprocessed(args.preprocessed)
    keys = ["image", "label"]

    def make(mode, patch):
        patch = list(patch)
        pos = args.foreground
        steps = [
            SpatialPadd(keys=keys, spatial_size=patch),
            FgBgToIndicesd(keys="label", image_key=None),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=1.0 - pos,
                                   num_samples=1, fg_indices_key="label_fg_indices",
                                   bg_indices_key="label_bg_indices"),
        ]
        if mode == "aug":
            a30 = np.pi / 6
            steps += [
                RandRotated(keys=keys, range_x=a30, range_y=a30, range_z=a30, prob=0.2,
                            mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True),
                RandZoomd(keys=keys, min_zoom=0.7, max_zoom=1.4, prob=0.2, mode=("trilinear", "nearest"),
                          keep_size=True),
                RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1 ** 0.5, sample_std=True),
                RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0),
                                    prob=0.2),
                RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
                RandScaleIntensityFixedMeand(keys="image", factors=0.25, preserve_range=True, fixed_mean=True,
                                             prob=0.15),
                RandSimulateLowResolutiond(keys="image", prob=0.25, zoom_range=(0.5, 1.0)),
                RandAdjustContrastd(keys="image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
                RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
                RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
                RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
                RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            ]
        data = [{"image": img, "label": seg} for _, img, seg in cases]
        # copy_cache=False: the random transforms return new arrays and never modify the cached
        # item, so the default deep copy of every cached volume per draw is skipped.
        ds = CacheDataset(data, transform=Compose(steps), cache_rate=1.0, num_workers=0, progress=False,
                          copy_cache=False)
        dl = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=0, drop_last=True)
        next_batch = endless(dl)

        return next_batch, {"monai": monai.__version__}

    return make


# ---------------------------------------------------------------------------------------------
# TorchIO


def torchio_factory(args):
    import SimpleITK as sitk
    import torchio as tio

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    cases = load_preprocessed(args.preprocessed)

    def brightness(x):
        return x * float(np.random.uniform(0.75, 1.25))

    def contrast(x):
        lo, hi, mean = x.min(), x.max(), x.mean()
        return ((x - mean) * float(np.random.uniform(0.75, 1.25)) + mean).clamp(lo, hi)

    def make(mode, patch):
        patch = tuple(patch)
        subjects = []
        for c, img, seg in cases:
            img, seg = pad_to(img, patch), pad_to(seg, patch)
            subjects.append(tio.Subject(
                image=tio.ScalarImage(tensor=torch.from_numpy(img)),
                label=tio.LabelMap(tensor=torch.from_numpy(seg)),
                sampling=tio.LabelMap(tensor=torch.from_numpy((seg > 0).astype(np.uint8))),
                case=c,
            ))
        sampler = tio.LabelSampler(patch, label_name="sampling",
                                   label_probabilities={0: 1.0 - args.foreground, 1: args.foreground})
        queue = tio.Queue(tio.SubjectsDataset(subjects), max_length=32, samples_per_volume=8, sampler=sampler,
                          num_workers=0, shuffle_subjects=True, shuffle_patches=True)
        source = queue
        if mode == "aug":
            augment = tio.Compose([
                tio.RandomAffine(degrees=30, scales=0, p=0.2),
                tio.RandomAffine(degrees=0, scales=(0.7, 1.4), isotropic=True, p=0.2),
                tio.RandomNoise(std=(0, 0.1 ** 0.5), p=0.1),
                tio.RandomBlur(std=(0.5, 1.0), p=0.2),
                tio.Lambda(brightness, types_to_apply=[tio.INTENSITY], p=0.15),
                tio.Lambda(contrast, types_to_apply=[tio.INTENSITY], p=0.15),
                tio.RandomAnisotropy(downsampling=(1, 2), p=0.25),
                tio.RandomGamma(log_gamma=(np.log(0.7), np.log(1.5)), p=0.3),
                tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
            ])

            class Augmented(torch.utils.data.Dataset):
                def __len__(self):
                    return len(queue)

                def __getitem__(self, i):
                    return augment(queue[i])

            source = Augmented()
        dl = tio.SubjectsLoader(source, batch_size=args.batch, num_workers=0)
        next_batch = endless(dl)

        return next_batch, {"torchio": tio.__version__, "queue": {"max_length": 32, "samples_per_volume": 8}}

    return make


# ---------------------------------------------------------------------------------------------
# numpy memmap floor


def memmap_factory(args):
    npy = os.path.join(args.work, "npy")
    max_patch = [max(p[i] for p in args.patch_list) for i in range(3)]
    stamp = os.path.join(npy, "done-" + "x".join(map(str, max_patch)))
    if not os.path.exists(stamp):
        os.makedirs(npy, exist_ok=True)
        for c, img, seg in load_preprocessed(args.preprocessed):
            np.save(os.path.join(npy, c + "_img.npy"), np.ascontiguousarray(pad_to(img, max_patch)[0]))
            np.save(os.path.join(npy, c + "_seg.npy"), np.ascontiguousarray(pad_to(seg, max_patch)[0]))
        open(stamp, "w").close()
    cases = sorted(f[:-8] for f in os.listdir(npy) if f.endswith("_img.npy"))
    maps = [(np.load(os.path.join(npy, c + "_img.npy"), mmap_mode="r"),
             np.load(os.path.join(npy, c + "_seg.npy"), mmap_mode="r")) for c in cases]
    rng = np.random.default_rng(0)

    def make(mode, patch):
        if mode != "crop":
            return None
        pz, py, px = patch

        def next_batch():
            img = np.empty((args.batch, 1, pz, py, px), np.float32)
            seg = np.empty((args.batch, 1, pz, py, px), np.uint8)
            for b in range(args.batch):
                im, sg = maps[rng.integers(len(maps))]
                z, y, x = (int(rng.integers(0, s - p + 1)) for s, p in zip(im.shape, patch))
                img[b, 0] = im[z:z + pz, y:y + py, x:x + px]
                seg[b, 0] = sg[z:z + pz, y:y + py, x:x + px]
            return img, seg

        return next_batch, {"padded_to": max_patch}

    return make


# ---------------------------------------------------------------------------------------------


FACTORIES = {"nnunet": nnunet_factory, "monai": monai_factory, "torchio": torchio_factory, "memmap": memmap_factory}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loader", choices=sorted(FACTORIES))
    ap.add_argument("--preprocessed", required=True, help="nnUNet_preprocessed/DatasetXXX_Name")
    ap.add_argument("--dataset", required=True, help="dataset label for the report")
    ap.add_argument("--out", required=True, help="folder for the result JSON files")
    ap.add_argument("--work", default=None, help="scratch folder (memmap .npy files)")
    ap.add_argument("--patches", default="128,64,32", help="cubic patch edges, comma-separated")
    ap.add_argument("--modes", default="crop,aug")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured wall seconds at the largest patch")
    ap.add_argument("--small-seconds", type=float, default=8.0, help="measured wall seconds at smaller patches")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--foreground", type=float, default=0.33)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.patch_list = [(int(p),) * 3 for p in args.patches.split(",") if p]
    args.work = args.work or os.path.join(args.out, "work-" + args.dataset)
    os.makedirs(args.out, exist_ok=True)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    make = FACTORIES[args.loader](args)
    largest = max(p[0] for p in args.patch_list)
    failed = 0
    for patch in args.patch_list:
        for mode in args.modes.split(","):
            name = f"{args.loader}-{mode}-{args.dataset}-{patch[0]}"
            try:
                made = make(mode, patch)
                if made is None:
                    continue
                next_batch, extra = made
                seconds = args.seconds if patch[0] == largest else args.small_seconds
                r = measure(next_batch, args.batch, seconds)
                del next_batch
            except Exception as e:  # report and go on with the other configurations
                failed += 1
                r, extra = {"error": f"{type(e).__name__}: {e}"}, {}
                print(f"{name}: FAILED {r['error']}", file=sys.stderr, flush=True)
            r.update({"loader": args.loader, "mode": mode, "dataset": args.dataset, "patch": list(patch),
                      "batch": args.batch, "foreground": args.foreground, "threads": torch.get_num_threads(),
                      "affinity": sorted(os.sched_getaffinity(0)), **extra})
            with open(os.path.join(args.out, name + ".json"), "w") as f:
                json.dump(r, f, indent=1)
            if "error" not in r:
                print(f"{name}: {r['patches']} patches, {r['patches_per_cpu_s']:.1f}/CPU s, "
                      f"{r['patches_per_s']:.1f}/s wall", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
