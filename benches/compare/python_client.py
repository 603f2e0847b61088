#!/usr/bin/env python3
"""Patches per second delivered by the Python package as torch tensors, against the Rust client,
from one daemon through shared memory (and over messages with --transports).

    python python_client.py --store STORE --dataset NAME --out DIR
                            [--patches 128,64,32] [--modes crop,aug] [--seconds 20]
                            [--small-seconds 8] [--batch 2] [--foreground 0.33]
                            [--transports shm] [--bin target/release/patchflow]
                            [--rust-client target/release/examples/stream_batches]

For every transport, patch and mode, one `patchflow serve STORE --workers 1` daemon serves, in
turn, the Rust client (`examples/stream_batches.rs --seconds`) and this process
(`patchflow.Client(...).stream(...)`, each batch turned into tensors with `Batch.torch()`), the
same configuration and seed, after a warm-up each. Wall time and CPU time (client + daemon,
from /proc and wait4) give patches per second and per CPU second. Results go to
OUT/patchflow_py-MODE-DATASET-P.json and OUT/patchflow_rust-MODE-DATASET-P.json (the
report.py layout; the transport is a field), and one summary line per configuration to stdout
with the ratio Python / Rust. Run under `taskset -c 0` for one core in total (run.sh does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import patchflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def python_rate(endpoint, dataset, patch, batch, aug, fraction, seconds, shared_memory):
    client = patchflow.Client(endpoint, shared_memory=shared_memory)
    with client.stream(dataset, patch=patch, batch=batch, fraction=fraction, seed=0,
                       augment="nnunet" if aug else None) as stream:
        for _ in range(2):
            next(stream).torch()
        n = batches = 0
        c0, w0 = time.process_time(), time.perf_counter()
        while True:
            b = next(stream)
            image, label = b.torch()
            n += image.shape[0]
            batches += 1
            del b, image, label
            wall = time.perf_counter() - w0
            if wall >= seconds and batches >= 2:
                break
        cpu = time.process_time() - c0
    return {"patches": n, "wall_s": wall, "client_cpu_s": cpu}


def rust_rate(rust_bin, endpoint, dataset, patch, batch, aug, fraction, seconds, shared_memory):
    cmd = [str(rust_bin), "--endpoint", endpoint, "--dataset", dataset, "--patch", ",".join(map(str, patch)),
           "--batch", str(batch), "--fraction", str(fraction), "--seed", "0", "--seconds", str(seconds),
           "--shared-memory", "on" if shared_memory == "on" else "off"]
    if aug:
        cmd += ["--augment", "nnunet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.strip()[-400:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # The whole process (start, connection and warm-up included: a slight overestimate).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"patches": r["patches"], "wall_s": r["wall_s"], "client_cpu_s": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--dataset", required=True, help="dataset label for the report")
    ap.add_argument("--out", required=True)
    ap.add_argument("--patches", default="128,64,32")
    ap.add_argument("--modes", default="crop,aug")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--small-seconds", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--foreground", type=float, default=0.33)
    ap.add_argument("--transports", default="shm", help="shm and/or grpc (voxels inside the messages)")
    ap.add_argument("--bin", default=str(ROOT / "target/release/patchflow"))
    ap.add_argument("--rust-client", default=str(ROOT / "target/release/examples/stream_batches"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    store = Path(args.store).resolve()
    patches = [int(p) for p in args.patches.split(",") if p]
    largest = max(patches)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
        for transport in args.transports.split(","):
            shared = "on" if transport == "shm" else "off"
            for p in patches:
                for mode in args.modes.split(","):
                    aug = mode == "aug"
                    seconds = args.seconds if p == largest else args.small_seconds
                    sock = Path(tmp) / f"d-{transport}-{p}-{mode}.sock"
                    daemon = subprocess.Popen([args.bin, "--quiet", "serve", str(store), "--no-tcp", "--unix", str(sock),
                                               "--workers", "1"], stdin=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                    endpoint = f"unix:{sock}"
                    try:
                        patchflow.Client(endpoint).list_datasets()  # waits for the daemon
                        results = {}
                        # Rust first, then Python, then Rust again: the mean of the two Rust
                        # runs brackets the Python run against drifts of a shared machine.
                        for who in ("rust", "py", "rust2"):
                            d0 = proc_cpu(daemon.pid)
                            if who == "py":
                                r = python_rate(endpoint, store.name, (p,) * 3, args.batch, aug,
                                                args.foreground, seconds, shared)
                            else:
                                r = rust_rate(args.rust_client, endpoint, store.name, (p,) * 3, args.batch, aug,
                                              args.foreground, seconds, shared)
                            r["daemon_cpu_s"] = proc_cpu(daemon.pid) - d0
                            results[who] = r
                    except Exception as e:  # report and go on
                        failed += 1
                        print(f"{transport} {mode} {p}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                        continue
                    finally:
                        daemon.terminate()
                        daemon.wait()
                    rust = {k: results["rust"][k] + results["rust2"][k]
                            for k in ("patches", "wall_s", "daemon_cpu_s", "client_cpu_s")}
                    for loader, r in (("patchflow_rust", rust), ("patchflow_py", results["py"])):
                        rec = {
                            "loader": loader, "transport": transport, "mode": mode, "dataset": args.dataset,
                            "patch": [p] * 3, "batch": args.batch, "foreground": args.foreground,
                            "patches": r["patches"], "wall_s": r["wall_s"],
                            "patches_per_s": r["patches"] / r["wall_s"],
                            "daemon_cpu_s": r["daemon_cpu_s"],
                            "affinity": sorted(os.sched_getaffinity(0)),
                        }
                        if r.get("client_cpu_s") is not None:
                            cpu = r["client_cpu_s"] + r["daemon_cpu_s"]
                            rec["cpu_s"] = cpu
                            rec["patches_per_cpu_s"] = r["patches"] / cpu if cpu > 0 else None
                        else:
                            rec["patches_per_cpu_s"] = None
                        suffix = "" if transport == "shm" else "_msg"
                        with open(os.path.join(args.out, f"{loader}{suffix}-{mode}-{args.dataset}-{p}.json"), "w") as f:
                            json.dump(rec, f, indent=1)
                    py_rate = results["py"]["patches"] / results["py"]["wall_s"]
                    rust_rate_ = rust["patches"] / rust["wall_s"]
                    print(f"{transport:4} {mode:4} {p:3}^3: python {py_rate:8.1f} patches/s, rust client "
                          f"{rust_rate_:8.1f} patches/s, ratio {py_rate / rust_rate_:.3f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
