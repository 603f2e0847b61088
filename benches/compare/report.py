#!/usr/bin/env python3
"""One table from the per-configuration JSON files of run.sh.

    python report.py RESULTS_DIR OUT_DIR [--machine TEXT] [--command TEXT] [--elapsed S]

RESULTS_DIR holds LOADER-MODE-DATASET-PATCH.json (loaders.py and `patchflow bench peer`) and
sizes-DATASET.json. Prints the table as Markdown and writes OUT_DIR/compare.md and
OUT_DIR/compare.json. The ratio column is the loader's patches per CPU second over patchflow's
in process, same dataset, patch and mode (crop-only against crop-only, augmented against
patchflow's nnU-Net preset).
"""

import argparse
import glob
import json
import os
import sys

LOADERS = [
    ("patchflow_inproc", "patchflow, in process"),
    ("patchflow_grpc", "patchflow, gRPC loopback (daemon + client)"),
    ("patchflow_rust", "patchflow, Rust client, shared memory (daemon + client)"),
    ("patchflow_py", "patchflow, Python package, torch tensors, shared memory (daemon + client)"),
    ("nnunet", "nnU-Net v2 nnUNetDataLoader"),
    ("monai", "MONAI RandCropByPosNegLabeld"),
    ("torchio", "TorchIO Queue + LabelSampler"),
    ("memmap", "numpy memmap copy (floor)"),
]
LOADER_NAME = dict(LOADERS)
LOADER_ORDER = {k: i for i, (k, _) in enumerate(LOADERS)}
DATASET_ORDER = {"real": 0, "phantom": 1}
MODE_NAME = {"crop": "crop", "aug": "aug (nnU-Net default)"}


def fmt_rate(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("out")
    ap.add_argument("--machine", default="")
    ap.add_argument("--command", default="benches/compare/run.sh")
    ap.add_argument("--elapsed", type=float, default=None)
    args = ap.parse_args()

    rows = []
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        name = os.path.basename(path)[:-5]
        if name.startswith("sizes-"):
            continue
        parts = name.split("-")
        if len(parts) != 4:
            print(f"report: ignoring {path}", file=sys.stderr)
            continue
        loader, mode, dataset, patch = parts
        try:
            r = json.load(open(path))
        except (OSError, ValueError) as e:
            r = {"error": f"unreadable result: {e}"}
        rows.append({"loader": loader, "mode": mode, "dataset": dataset, "patch": int(patch),
                     "patches": r.get("patches"), "cpu_s": r.get("cpu_s"), "wall_s": r.get("wall_s"),
                     "per_cpu_s": r.get("patches_per_cpu_s"), "per_wall_s": r.get("patches_per_s"),
                     "error": r.get("error"), "detail": r})

    ref = {(r["dataset"], r["patch"], r["mode"]): r["per_cpu_s"]
           for r in rows if r["loader"] == "patchflow_inproc" and r["per_cpu_s"]}
    for r in rows:
        base = ref.get((r["dataset"], r["patch"], r["mode"]))
        r["ratio_to_patchflow"] = (r["per_cpu_s"] / base) if (base and r["per_cpu_s"]) else None
    rows.sort(key=lambda r: (DATASET_ORDER.get(r["dataset"], 9), r["dataset"], -r["patch"],
                             r["mode"] != "crop", LOADER_ORDER.get(r["loader"], 99)))

    sizes = []
    for path in sorted(glob.glob(os.path.join(args.results, "sizes-*.json"))):
        try:
            sizes.append(json.load(open(path)))
        except (OSError, ValueError):
            pass
    sizes.sort(key=lambda s: DATASET_ORDER.get(s.get("dataset"), 9))

    lines = [
        "| loader | mode | dataset | patch | patches/s per core (CPU s) | patches/s wall (taskset -c 0) "
        "| ratio to patchflow in-process | measured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        loader = LOADER_NAME.get(r["loader"], r["loader"])
        head = f"| {loader} | {MODE_NAME.get(r['mode'], r['mode'])} | {r['dataset']} | {r['patch']}³ |"
        if r["error"]:
            err = " ".join(str(r["error"]).split())[:160].replace("|", "/")
            lines.append(f"{head} failed: {err} | — | — | — |")
            continue
        ratio = f"{r['ratio_to_patchflow']:.3f}×" if r["ratio_to_patchflow"] is not None else "—"
        if r["loader"] == "patchflow_inproc":
            ratio = "1 (reference)"
        measured = f"{r['patches']:,} patches, {r['cpu_s']:.1f} CPU s" if r["patches"] and r["cpu_s"] else "—"
        lines.append(f"{head} {fmt_rate(r['per_cpu_s'])} | {fmt_rate(r['per_wall_s'])} | {ratio} | {measured} |")
    table = "\n".join(lines)

    size_lines = []
    for s in sizes:
        mb = lambda b: f"{b / 1e6:,.1f} MB" if isinstance(b, (int, float)) else "—"  # noqa: E731
        pf, nn = s.get("patchflow_store_bytes"), s.get("nnunet_bytes")
        ratio = f", store / nnU-Net = {pf / nn:.2f}" if pf and nn else ""
        timing = []
        if s.get("patchflow_ingest_s") is not None:
            timing.append(f"patchflow ingest {s['patchflow_ingest_s']:.1f} s")
        if s.get("nnunet_preprocess_s") is not None:
            timing.append(f"nnUNetv2_plan_and_preprocess {s['nnunet_preprocess_s']:.1f} s")
        size_lines.append(
            f"- {s.get('dataset')}: patchflow store {mb(pf)} vs nnU-Net preprocessed (3d_fullres) {mb(nn)} "
            f"(arrays {mb(s.get('nnunet_array_bytes'))} + .pkl properties with class locations "
            f"{mb(s.get('nnunet_pkl_bytes'))}){ratio}; raw .nii.gz input {mb(s.get('raw_input_bytes'))}"
            + (f"; wall time, 2 cores: {', '.join(timing)}" if timing else ""))

    text = table + "\n\nStore size:\n" + "\n".join(size_lines) + "\n"
    if args.machine:
        text += f"\nMachine: {args.machine}. Command: `{args.command}`"
        if args.elapsed is not None:
            text += f" ({args.elapsed / 60:.1f} min end to end)"
        text += ".\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"machine": args.machine, "command": args.command, "elapsed_s": args.elapsed,
                   "rows": rows, "sizes": sizes}, f, indent=1)
    print(f"written: {os.path.join(args.out, 'compare.md')} and compare.json")


if __name__ == "__main__":
    main()
