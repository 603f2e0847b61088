#!/usr/bin/env bash
# The PGPS curricula on a GPU: time a training step at every patch and batch size the modes of
# nnU-Net's 128³ plan train with (batch 2, steady state: each size warmed up first), project
# every mode's 1000-epoch time against the constant nnU-Net baseline next to the paper's 0.44
# (PGPS) and 0.89 (performance mode), and print one table (with --train MODES, also short
# training runs of those modes). See README.md beside this.
#
#   benches/gpu/run.sh [--cpu-tiny] [patchflow-train bench options...]
#
# PATCHFLOW_TRAIN  the patchflow-train binary [default: target/release/patchflow-train]
# TORCH_LIB        libtorch folder of an installed PyTorch 2.11 (put on LD_LIBRARY_PATH)
#                  [default: /opt/torch/.venv/lib/python3.12/site-packages/torch/lib if present]
# BENCH_DATA       folder holding ct_totalseg/aorta_ct_cropped.nii.gz and aorta_aorta.nii.gz
#                  [default: ../shared/data, else target/bench-data]
# BENCH_OUT        work folder [default: target/bench-gpu, or target/bench-cpu-tiny]
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${PATCHFLOW_TRAIN:-target/release/patchflow-train}
if [ ! -x "$bin" ]; then
    echo "run.sh: $bin not found; build it with: cargo build --release -p patchflow-trainer" >&2
    exit 2
fi

torch_lib=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
if [ -d "$torch_lib" ]; then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

data=${BENCH_DATA:-}
if [ -z "$data" ]; then
    if [ -d ../shared/data/ct_totalseg ]; then data=../shared/data; else data=target/bench-data; fi
fi

tiny=0
for a in "$@"; do [ "$a" = "--cpu-tiny" ] && tiny=1; done
if [ "$tiny" = 1 ]; then out=${BENCH_OUT:-target/bench-cpu-tiny}; else out=${BENCH_OUT:-target/bench-gpu}; fi

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
"$bin" bench --data "$data" --work "$out" "$@"
echo "wall time: $(( $(date +%s) - start )) s"
