#!/usr/bin/env bash
# patchflow next to its peer loaders (nnU-Net v2, MONAI, TorchIO, a numpy memmap floor), one
# core each, same cases, patch sizes, batch and foreground share. From the repository root:
#
#   benches/compare/run.sh
#
# Sets up a Python environment (pip, PyPI), builds patchflow, prepares the data (nnU-Net raw
# folders, nnUNetv2_plan_and_preprocess 3d_fullres, patchflow ingest), runs every loader under
# `taskset -c 0` with one thread, and prints one table; JSON and Markdown go to target/compare/.
# Needs network access to PyPI (and crates.io for the build) on the first run; ~30 min on
# 2 vCPUs. Everything it writes is under target/compare/ (COMPARE_DIR).
#
# Settings (environment):
#   COMPARE_DIR            work folder                        [target/compare]
#   COMPARE_PATCHES        cubic patch edges                  [128,64,32]
#   COMPARE_SECONDS        measured seconds at the largest patch [20]
#   COMPARE_SMALL_SECONDS  measured seconds at smaller patches   [8]
#   COMPARE_DATASETS       real,phantom (or one of them)      [real,phantom]
#   COMPARE_LOADERS        patchflow,python,nnunet,monai,torchio,memmap [all]
#   COMPARE_PAIRS          image/label TSV of the real data   [../shared/data/pairs.tsv]
#   CARGO_TARGET_DIR       where cargo builds                 [target]
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
here=$root/benches/compare
work=$(mkdir -p "${COMPARE_DIR:-target/compare}" && cd "${COMPARE_DIR:-target/compare}" && pwd)
patches=${COMPARE_PATCHES:-128,64,32}
seconds=${COMPARE_SECONDS:-20}
small_seconds=${COMPARE_SMALL_SECONDS:-8}
datasets=${COMPARE_DATASETS:-real,phantom}
loaders=${COMPARE_LOADERS:-patchflow,python,nnunet,monai,torchio,memmap}
pairs=${COMPARE_PAIRS:-../shared/data/pairs.tsv}
results=$work/results
logs=$work/logs
mkdir -p "$results" "$logs"
rm -f "$results"/*.json
failures=()
t_start=$(date +%s)

step() { echo; echo "== $* ($(( $(date +%s) - t_start )) s)"; }
fail() { echo "FAILED: $*" >&2; failures+=("$*"); }
has() { case ",$2," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# One core, one thread: everything measured runs under this. OPENBLAS_CORETYPE/L2_SIZE are
# workarounds for old OpenBLAS builds on this machine that slow a current numpy; the measured
# commands run without them.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMEXPR_NUM_THREADS=1 BLOSC_NTHREADS=1
one_core() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE taskset -c 0 "$@"; }

# ---------------------------------------------------------------------------------------------
step "Python environment ($work/venv)"
if ! "$here/setup_venv.sh" "$work/venv" 2>&1 | tee "$logs/venv.log"; then
  echo "cannot continue without the Python environment (see $logs/venv.log)" >&2
  exit 1
fi
py=$work/venv/bin/python

step "cargo build --release -p patchflow"
bin=${CARGO_TARGET_DIR:-$root/target}/release/patchflow
if ! cargo build --release -q -p patchflow 2>&1 | tail -20; then
  fail "cargo build --release -p patchflow"
fi
if has python "$loaders"; then
  # The Python package (crates/python) in the same venv as the peers, and the Rust client
  # example it is measured against.
  if ! cargo build --release -q -p patchflow --example stream_batches 2>&1 | tail -20 \
      || ! "$py" -m pip install -q --no-deps --force-reinstall "$root/crates/python" 2>&1 | tail -20; then
    fail "the Python package (pip install ./crates/python)"
  fi
fi
have_peer=0
if [ -x "$bin" ] && "$bin" bench peer --help >/dev/null 2>&1; then
  have_peer=1
else
  fail "patchflow bench peer: not available in $bin"
fi

# ---------------------------------------------------------------------------------------------
step "Data: nnU-Net raw folders"
export nnUNet_raw=$work/nnUNet_raw nnUNet_preprocessed=$work/nnUNet_preprocessed nnUNet_results=$work/nnUNet_results
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
declare -A dsid=([real]=901 [phantom]=902)
declare -A dsname=([real]=Dataset901_RealCT [phantom]=Dataset902_Phantom)
active=()
for ds in ${datasets//,/ }; do
  raw=$nnUNet_raw/${dsname[$ds]}
  case $ds in
    real)
      if [ ! -f "$pairs" ]; then
        fail "real data: $pairs not found (skipping the real dataset)"
        continue
      fi
      rm -rf "$raw"
      "$py" "$here/make_raw.py" "$pairs" "$raw" --name RealCT || { fail "make_raw.py $pairs"; continue; } ;;
    phantom)
      if [ ! -f "$raw/dataset.json" ] || [ "$(ls "$raw/imagesTr" 2>/dev/null | wc -l)" != 8 ]; then
        rm -rf "$raw"
        "$bin" -q phantom "$raw" --cases 8 --shape 160,192,192 || { fail "patchflow phantom"; continue; }
      fi
      # What patchflow writes must be nnU-Net's raw layout: _0000 channel suffix, one label each.
      "$py" - "$raw" <<'EOF' || { fail "phantom folder is not in nnU-Net's raw layout"; continue; }
import json, os, sys
raw = sys.argv[1]
d = json.load(open(os.path.join(raw, "dataset.json")))
assert {"channel_names", "labels", "file_ending"} <= d.keys(), d.keys()
imgs = sorted(os.listdir(os.path.join(raw, "imagesTr")))
labs = sorted(os.listdir(os.path.join(raw, "labelsTr")))
assert all(i.endswith("_0000" + d["file_ending"]) for i in imgs), imgs
assert [i.replace("_0000", "") for i in imgs] == labs, (imgs, labs)
print(f"phantom: {len(imgs)} cases, channels {d['channel_names']}, labels {d['labels']}")
EOF
      ;;
    *) fail "unknown dataset $ds"; continue ;;
  esac
  active+=("$ds")
done

step "Data: nnUNetv2_plan_and_preprocess 3d_fullres"
declare -A nn_pp_s
for ds in "${active[@]}"; do
  pre=$nnUNet_preprocessed/${dsname[$ds]}
  rm -rf "$pre"
  t0=$(date +%s.%N)
  if "$work/venv/bin/nnUNetv2_plan_and_preprocess" -d "${dsid[$ds]}" -c 3d_fullres -np 2 -npfp 2 \
      --verify_dataset_integrity --no_pbar >"$logs/nnunet-preprocess-$ds.log" 2>&1; then
    nn_pp_s[$ds]=$(echo "$(date +%s.%N) - $t0" | bc)
    echo "$ds: nnU-Net preprocessing ${nn_pp_s[$ds]} s (2 processes)"
  else
    fail "nnUNetv2_plan_and_preprocess $ds (see $logs/nnunet-preprocess-$ds.log)"
  fi
done

step "Data: patchflow ingest"
declare -A pf_ingest_s
for ds in "${active[@]}"; do
  store=$work/stores/$ds
  rm -rf "$store"
  t0=$(date +%s.%N)
  if "$bin" -q ingest "$nnUNet_raw/${dsname[$ds]}" --out "$store" --jobs 2 >"$logs/ingest-$ds.log" 2>&1; then
    pf_ingest_s[$ds]=$(echo "$(date +%s.%N) - $t0" | bc)
    echo "$ds: patchflow ingest ${pf_ingest_s[$ds]} s (2 jobs)"
  else
    fail "patchflow ingest $ds (see $logs/ingest-$ds.log)"
  fi
done

# Sizes: patchflow store vs nnU-Net's preprocessed 3d_fullres folder (arrays and the .pkl
# properties holding its class locations) vs the raw .nii.gz input.
for ds in "${active[@]}"; do
  "$py" - "$ds" "$nnUNet_raw/${dsname[$ds]}" "$nnUNet_preprocessed/${dsname[$ds]}/nnUNetPlans_3d_fullres" \
      "$work/stores/$ds" "${nn_pp_s[$ds]:-}" "${pf_ingest_s[$ds]:-}" >"$results/sizes-$ds.json" <<'EOF'
import json, os, sys
ds, raw, pre, store, nn_s, pf_s = sys.argv[1:7]
def tree(path, pred=lambda f: True):
    total = 0
    for d, _, files in os.walk(path, followlinks=False):
        for f in files:
            p = os.path.join(d, f)
            if pred(f):
                total += os.stat(p).st_size  # follows the raw folder's links to the originals
    return total if os.path.isdir(path) else None
print(json.dumps({
    "dataset": ds,
    "raw_input_bytes": tree(raw, lambda f: f.endswith(".nii.gz")),
    "nnunet_bytes": tree(pre),
    "nnunet_array_bytes": tree(pre, lambda f: not f.endswith(".pkl")),
    "nnunet_pkl_bytes": tree(pre, lambda f: f.endswith(".pkl")),
    "patchflow_store_bytes": tree(store),
    "nnunet_preprocess_s": float(nn_s) if nn_s else None,
    "patchflow_ingest_s": float(pf_s) if pf_s else None,
}))
EOF
done

# ---------------------------------------------------------------------------------------------
biggest=$(echo "$patches" | tr ',' '\n' | sort -n | tail -1)
for ds in "${active[@]}"; do
  pre=$nnUNet_preprocessed/${dsname[$ds]}
  store=$work/stores/$ds
  if has patchflow "$loaders"; then
    step "$ds: patchflow bench peer"
    if [ "$have_peer" = 1 ] && [ -d "$store" ]; then
      for p in ${patches//,/ }; do
        s=$([ "$p" = "$biggest" ] && echo "$seconds" || echo "$small_seconds")
        for transport in inproc grpc; do
          for aug in none nnunet; do
            mode=$([ "$aug" = none ] && echo crop || echo aug)
            out=$results/patchflow_$transport-$mode-$ds-$p.json
            if one_core "$bin" -q bench peer --store "$store" --patch "$p,$p,$p" --batch 2 --foreground 0.33 \
                --seconds "$s" --transport "$transport" --augment "$aug" --json "$out" \
                >"$logs/patchflow-$transport-$mode-$ds-$p.log" 2>&1; then
              "$py" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("%s: %d patches, %.1f/CPU s, %.1f/s wall" % (sys.argv[2], r["patches"], r["patches_per_cpu_s"], r["patches_per_s"]))' \
                "$out" "patchflow_$transport-$mode-$ds-$p"
            else
              fail "patchflow bench peer $transport $aug $ds $p (see $logs/patchflow-$transport-$mode-$ds-$p.log)"
              "$py" -c 'import json,sys; json.dump({"error": sys.argv[2]}, open(sys.argv[1], "w"))' "$out" \
                "$(tail -c 300 "$logs/patchflow-$transport-$mode-$ds-$p.log" | tr '\n' ' ')"
            fi
          done
        done
      done
    else
      echo "skipped: no 'patchflow bench peer' or no store"
    fi
  fi
  if has python "$loaders"; then
    step "$ds: the Python package and the Rust client, through shared memory"
    if [ -d "$store" ]; then
      one_core "$py" "$here/python_client.py" --store "$store" --dataset "$ds" --out "$results" \
          --patches "$patches" --seconds "$seconds" --small-seconds "$small_seconds" --batch 2 \
          --foreground 0.33 --bin "$bin" \
          --rust-client "${CARGO_TARGET_DIR:-$root/target}/release/examples/stream_batches" \
        || fail "python $ds: some configurations failed (see above)"
    else
      echo "skipped: no store"
    fi
  fi
  for l in memmap nnunet monai torchio; do
    has "$l" "$loaders" || continue
    step "$ds: $l"
    [ -d "$pre/nnUNetPlans_3d_fullres" ] || { fail "$l $ds: no nnU-Net preprocessed data"; continue; }
    modes=crop,aug; [ "$l" = memmap ] && modes=crop
    PYTHONWARNINGS=ignore one_core "$py" "$here/loaders.py" "$l" --preprocessed "$pre" --dataset "$ds" --out "$results" \
        --work "$work/work-$ds" --patches "$patches" --modes "$modes" --seconds "$seconds" \
        --small-seconds "$small_seconds" --batch 2 --foreground 0.33 \
      || fail "$l $ds: some configurations failed (see above)"
  done
done

# ---------------------------------------------------------------------------------------------
step "Report"
machine="$(nproc --all) vCPU $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(free -g | awk '/Mem:/{print $2}') GiB"
"$py" "$here/report.py" "$results" "$work" --machine "$machine" \
  --command "benches/compare/run.sh (COMPARE_PATCHES=$patches COMPARE_SECONDS=$seconds COMPARE_SMALL_SECONDS=$small_seconds)" \
  --elapsed "$(( $(date +%s) - t_start ))" || fail "report.py"

if [ ${#failures[@]} -gt 0 ]; then
  echo
  echo "${#failures[@]} step(s) failed:"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
