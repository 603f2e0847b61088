#!/usr/bin/env bash
# Python environment for the peer loaders: torch (CPU use of the PyPI CUDA wheel), nnU-Net v2,
# MONAI and TorchIO, in VENV (created if absent; reused when it already imports all four).
#
#   benches/compare/setup_venv.sh VENV
#
# PyPI has no CPU-only torch for Linux x86_64, and the CUDA wheel pulls ~2.5 GB of NVIDIA
# libraries that a CPU run never calls. So: pip resolves the full requirement set once
# (--dry-run --report, metadata only), everything except the NVIDIA/CUDA/Triton wheels is
# installed with --no-deps, plus the two small CUDA wheels the torch libraries load for real
# (CUDA runtime, CUPTI), and cuda_stubs.py writes stand-ins for the remaining CUDA libraries
# into torch/lib. The venv is ~2.4 GB.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$1
py=$venv/bin/python
TORCH_VERSION=${TORCH_VERSION:-2.11.0}

check() {
  "$py" - <<'EOF' 2>/dev/null
import torch, nnunetv2, monai, torchio, numpy
print(f"venv ready: torch {torch.__version__}, nnunetv2, monai {monai.__version__}, torchio {torchio.__version__}, numpy {numpy.__version__}")
EOF
}

if [ -x "$py" ] && check; then
  exit 0
fi

python3 -m venv "$venv"
"$py" -m pip install -q --no-cache-dir --upgrade pip
report=$(mktemp)
"$py" -m pip install -q --no-cache-dir --dry-run --ignore-installed --report "$report" \
  "torch==$TORCH_VERSION" nnunetv2 monai torchio
reqs=$("$py" - "$report" <<'EOF'
import json, re, sys
keep_cuda = {"nvidia-cuda-runtime", "nvidia-cuda-cupti"}
out = []
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"]
    norm = re.sub(r"[-_.]+", "-", name).lower()
    if norm not in keep_cuda and (norm.startswith("nvidia-") or norm.startswith("cuda-") or norm == "triton"):
        continue
    out.append(f"{name}=={item['metadata']['version']}")
print("\n".join(out))
EOF
)
rm -f "$report"
echo "installing $(echo "$reqs" | wc -l) packages (no NVIDIA libraries beyond the CUDA runtime and CUPTI)"
# shellcheck disable=SC2086
"$py" -m pip install -q --no-cache-dir --no-deps $reqs
torch_dir=$("$py" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
"$py" "$here/cuda_stubs.py" "$torch_dir" "$torch_dir/lib"
check || { echo "setup_venv: the environment does not import torch/nnunetv2/monai/torchio" >&2; exit 1; }
du -sh "$venv" | awk '{print "venv size: " $1}'
