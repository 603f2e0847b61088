#!/usr/bin/env bash
# Train with batches from a local daemon instead of an in-process sampler: starts
# `patchflow serve STORE` on a Unix socket (shared-memory delivery) with a few sampling workers,
# trains with `patchflow-train --server`, and prints the run's data-wait share (the share of
# step time the trainer spent waiting for a batch). See README.md beside this.
#
#   benches/gpu/daemon.sh STORE OUT [patchflow-train options...]
#
# PATCHFLOW        the patchflow binary [default: target/release/patchflow]
# PATCHFLOW_TRAIN  the patchflow-train binary [default: target/release/patchflow-train]
# TORCH_LIB        libtorch folder of an installed PyTorch 2.11 (put on LD_LIBRARY_PATH)
#                  [default: /opt/torch/.venv/lib/python3.12/site-packages/torch/lib if present]
# WORKERS          the daemon's sampling threads [default: 2]
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 2 ]; then
    echo "usage: benches/gpu/daemon.sh STORE OUT [patchflow-train options...]" >&2
    exit 2
fi
store=$1
out=$2
shift 2

pf=${PATCHFLOW:-target/release/patchflow}
train=${PATCHFLOW_TRAIN:-target/release/patchflow-train}
for b in "$pf" "$train"; do
    if [ ! -x "$b" ]; then
        echo "daemon.sh: $b not found; build it with: cargo build --release -p patchflow -p patchflow-trainer" >&2
        exit 2
    fi
done
if [ ! -f "$store/manifest.json" ]; then
    echo "daemon.sh: $store is not a store (no manifest.json); run benches/gpu/run.sh first or ingest one" >&2
    exit 2
fi

torch_lib=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
if [ -d "$torch_lib" ]; then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

sock_dir=$(mktemp -d)
sock=$sock_dir/patchflow.sock
"$pf" serve "$store" --unix "$sock" --no-tcp --quiet --workers "${WORKERS:-2}" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; rm -rf "$sock_dir"' EXIT

# The daemon creates the socket once it accepts connections.
for _ in $(seq 200); do
    [ -S "$sock" ] && break
    kill -0 "$daemon" 2>/dev/null || { echo "daemon.sh: the daemon exited before listening" >&2; exit 1; }
    sleep 0.05
done
[ -S "$sock" ] || { echo "daemon.sh: no socket at $sock after 10 s" >&2; exit 1; }

start=$(date +%s)
"$train" --server "unix:$sock" --store "$store" --dataset "$(basename "$store")" --out "$out" "$@"
echo "wall time: $(( $(date +%s) - start )) s"
