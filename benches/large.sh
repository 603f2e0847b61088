#!/usr/bin/env bash
# The large-dataset run of `patchflow bench`: a store larger than the memory the daemon and the
# page cache may use, so that most reads come from the disk.
#
# The dataset should be 1.5-2x the machine's RAM. Where the disk cannot hold that much, this
# script confines the benchmark (and the daemon it starts, and the page cache they fill) to a
# memory cgroup of MEM_MB instead, and sizes the data at about RATIO x MEM_MB of store: the
# kernel then has only MEM_MB for the processes' own memory and cached store pages, as a
# machine with that much RAM would. Needs root for the cgroup (v1 `memory` controller or v2).
# The processes' own memory (chunk caches of CACHE_MB each, batches in flight) must fit in
# MEM_MB with room to spare, or the kernel kills the daemon.
#
#   benches/large.sh                      # MEM_MB=1536 RATIO=2 in ./patchflow-bench-large
#   MEM_MB=0 SIZE_GB=40 benches/large.sh  # no cgroup: a 40 GB dataset against the whole RAM
#   SKIP_INGEST=1 ...                     # measure the store already in WORK again
#   KEEP_RAW=0 ...                        # delete the generated NIfTI files after ingest
#   COMPARE_READAHEAD=1 ...               # also measure with the kernel's readahead
#
# Results: patchflow-bench-large/bench.json, bench.png; the table is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
MEM_MB=${MEM_MB:-1536}
RATIO=${RATIO:-2}
EDGES=${EDGES:-64,128}
CACHE_MB=${CACHE_MB:-128}
WORK=${WORK:-patchflow-bench-large}
SHAPE=${SHAPE:-300,512,512}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
if [[ "$MEM_MB" == 0 ]]; then
  SIZE_GB=${SIZE_GB:?set SIZE_GB when MEM_MB=0}
else
  # The phantom's store is ~0.35 of its voxel bytes (i16 image + u8 label, cropped, zstd 1).
  SIZE_GB=${SIZE_GB:-$(python3 -c "print(round($MEM_MB / 1024 * $RATIO / 0.35, 1))")}
fi
cargo build --release -p patchflow
BIN=target/release/patchflow

# 1. Generate and ingest outside the cgroup (measures ingest too; the raw files are kept so
#    that a rerun reuses them).
if [[ "${SKIP_INGEST:-0}" != 1 ]]; then
  "$BIN" bench --work-dir "$WORK" --shape "$SHAPE" --size-gb "$SIZE_GB" --edges 16 --no-pgps \
    --no-daemon --no-cold --seconds 0.5 --json "$WORK/ingest.json" --png "$WORK/ingest.png"
fi

# 2. Measure inside the cgroup. With COMPARE_READAHEAD=1, measure again with the store's reads
#    left to the kernel's readahead (PATCHFLOW_KERNEL_READAHEAD=1), into bench-kernel-readahead.*.
measure() {
  "$BIN" bench --work-dir "$WORK" --store "$WORK/store" --edges "$EDGES" --no-pgps \
    --clients 1,2 --seconds "$SECONDS_PER_RUN" --cold-batches 16 --cache-mb "$CACHE_MB" "$@"
}
run() {
  drop_cache
  measure --json "$WORK/bench.json" --png "$WORK/bench.png"
  if [[ "${COMPARE_READAHEAD:-0}" == 1 ]]; then
    drop_cache
    PATCHFLOW_KERNEL_READAHEAD=1 measure --json "$WORK/bench-kernel-readahead.json" \
      --png "$WORK/bench-kernel-readahead.png"
  fi
}
# Start cold: nothing of the store in the page cache.
drop_cache() {
  python3 - "$WORK/store" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        fd = os.open(os.path.join(root, f), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}
if [[ "${KEEP_RAW:-1}" == 0 ]]; then
  rm -rf "$WORK/raw"
fi
if [[ "$MEM_MB" == 0 ]]; then
  run
  exit
fi
LIMIT=$((MEM_MB * 1024 * 1024))
if [[ -d /sys/fs/cgroup/memory ]]; then
  CG=/sys/fs/cgroup/memory/patchflow-bench-large
  mkdir -p "$CG"
  echo "$LIMIT" > "$CG/memory.limit_in_bytes"
else
  CG=/sys/fs/cgroup/patchflow-bench-large
  mkdir -p "$CG"
  echo "$LIMIT" > "$CG/memory.max"
fi
echo "memory cgroup $CG: ${MEM_MB} MiB for the benchmark, its daemon and their page cache"
echo "store: $(du -sh "$WORK/store" | cut -f1)"
( echo $BASHPID > "$CG/cgroup.procs"; run )
