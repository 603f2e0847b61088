#!/usr/bin/env bash
# Ingest throughput and store size, printed as a markdown table for benches/RESULTS.md.
#
#   benches/ingest.sh [WORKDIR]
#
# Runs the release binary on (1) the real pairs of ../shared/data (when present), with and
# without resampling, and (2) a generated phantom dataset, each into a fresh store, with
# --jobs = number of cores. Reports wall time, CPU time (user+sys), MB/s of .nii.gz input per
# wall second and per CPU second, and the store size against the input and the raw arrays.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
cargo build --release -q -p patchflow
bin=target/release/patchflow
jobs=$(nproc)

measure() { # name, input, extra args...
  local name=$1 input=$2; shift 2
  local store=$work/store-$name
  rm -rf "$store"
  local t0 t1 cpu
  t0=$(date +%s.%N)
  /usr/bin/time -o "$work/time-$name" -f "%U %S" "$bin" -q ingest "$input" --out "$store" --jobs "$jobs" "$@" >/dev/null 2>&1
  cpu=$(tail -1 "$work/time-$name")
  t1=$(date +%s.%N)
  "$bin" inspect "$store" --json | python3 -c '
import json, sys
name, wall, cpu = sys.argv[1], float(sys.argv[2]), sum(map(float, sys.argv[3].split()))
t = json.load(sys.stdin)["total"]
inp, raw, st = t["input_bytes"] / 1e6, t["raw_bytes"] / 1e6, t["stored_bytes"] / 1e6
print("| %s | %d | %.1f | %.1f | %.1f | %.2f | %.2f | %.1f | %.1f | %.2f | %.2f |" % (
    name, t["cases"], inp, raw, st, wall, cpu, inp / wall, inp / cpu, st / inp, raw / st))
' "$name" "$(echo "$t1 - $t0" | bc)" "$cpu"
}

echo "| dataset | cases | input .nii.gz MB | raw MB | store MB | wall s | CPU s | MB/s input (wall) | MB/s input per CPU s | store / input | raw / store |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
if [ -f ../shared/data/pairs.tsv ]; then
  measure real-keep-spacing ../shared/data/pairs.tsv --keep-spacing
  measure real-resampled ../shared/data/pairs.tsv
fi
"$bin" -q phantom "$work/phantom" --cases 16 --shape 128,192,192 >/dev/null 2>&1
measure phantom-16x128x192x192 "$work/phantom" --keep-spacing
