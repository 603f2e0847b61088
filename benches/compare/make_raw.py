#!/usr/bin/env python3
"""Build an nnU-Net raw dataset folder from an image/label pair list, without copying data.

    python make_raw.py PAIRS_TSV OUT_DIR [--modality CT] [--name RealCT]

PAIRS_TSV has a header with the columns `image`, `label` and `modality` (paths relative to the
TSV's folder), like ../shared/data/pairs.tsv. OUT_DIR receives imagesTr/CASE_0000.nii.gz and
labelsTr/CASE.nii.gz as symbolic links to the originals, and a dataset.json with one channel
named "CT" (so nnU-Net and patchflow both apply CT normalisation) and the labels 0..max found in
the label maps (nnU-Net requires consecutive label values).
"""

import argparse
import csv
import json
import os

import nibabel as nib
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs")
    ap.add_argument("out")
    ap.add_argument("--modality", default=None, help="only pairs of this modality (default: all)")
    ap.add_argument("--name", default="RealCT")
    args = ap.parse_args()

    base = os.path.dirname(os.path.abspath(args.pairs))
    with open(args.pairs, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if args.modality:
        rows = [r for r in rows if r.get("modality", "").upper() == args.modality.upper()]
    if not rows:
        raise SystemExit(f"make_raw: no pairs selected from {args.pairs}")

    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    max_label = 0
    cases = []
    for r in rows:
        image = os.path.join(base, r["image"])
        label = os.path.join(base, r["label"])
        case = os.path.basename(image).removesuffix(".nii.gz").removesuffix(".nii")
        if case in cases:
            raise SystemExit(f"make_raw: duplicate case name {case!r} in {args.pairs}")
        cases.append(case)
        for src, dst in ((image, f"imagesTr/{case}_0000.nii.gz"), (label, f"labelsTr/{case}.nii.gz")):
            dst = os.path.join(args.out, dst)
            if os.path.lexists(dst):
                os.remove(dst)
            os.symlink(src, dst)
        seg = np.asanyarray(nib.load(label).dataobj)
        if seg.min() < 0:
            raise SystemExit(f"make_raw: {label}: negative label value {seg.min()}")
        max_label = max(max_label, int(seg.max()))
    labels = {"background": 0}
    labels.update({f"class_{i}": i for i in range(1, max_label + 1)})
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": args.name,
    }
    with open(os.path.join(args.out, "dataset.json"), "w") as f:
        json.dump(dataset, f, indent=2)
    print(f"make_raw: {len(cases)} cases ({', '.join(cases)}), labels 0..{max_label} -> {args.out}")


if __name__ == "__main__":
    main()
