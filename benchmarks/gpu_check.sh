#!/usr/bin/env bash
# GPU validation of lorax_merge on a machine with a CUDA GPU, its own python3 with torch,
# a CUDA toolkit (nvcc) and no network:
#   1. builds the extension for the local GPU only, into a temporary directory (the source
#      tree is not modified), with the ptxas register/spill report;
#   2. runs the CUDA tests (tests/test_cuda.py, slow cases included);
#   3. runs the GPU benchmark (benchmarks/bench_gpu.py);
#   4. runs compute-sanitizer (memcheck, racecheck, synccheck) over a small workload that
#      touches every kernel;
#   5. runs the CUDA cases of the device-parametrised core tests, as time allows.
# Everything is logged into the folder given as the only argument: check.log (all
# output), build.log, tests.log, bench.log, gpu_bench.md / gpu_bench.json,
# sanitizer-*.log, tests-core.log and summary.md (the status of each step). A failing step
# does not stop the later ones; the exit status is non-zero when any step failed.
# Budget: under 8 minutes on one H200 (GPU_CHECK_BUDGET_S, default 450 s, caps the steps).
#
#   bash benchmarks/gpu_check.sh /tmp/gpu-results
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTPUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lorax_merge_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START_S=$SECONDS
exec > >(tee -a "$OUT/check.log") 2>&1

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()

# run_step NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND with a timeout of
# min(CAP, time left in the budget), output to LOGFILE and the console; records the status.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - START_S)))
  local limit=$((cap < left ? cap : left))
  local status rc t0=$SECONDS
  echo
  echo "=== $name (limit ${limit}s) ==="
  if ((limit <= 5)); then
    status="skipped (time budget spent)"
  else
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 0)); then
      status="ok"
    elif ((rc == 124 || rc == 137)); then
      status="timed out after ${limit}s"
    else
      status="failed (exit $rc)"
    fi
  fi
  STEP_NAMES+=("$name")
  STEP_STATUS+=("$status")
  STEP_SECONDS+=($((SECONDS - t0)))
  echo "--- $name: $status"
}

step_ok() { # step_ok NAME: whether that step ran and succeeded
  local i
  for i in "${!STEP_NAMES[@]}"; do
    if [[ ${STEP_NAMES[$i]} == "$1" && ${STEP_STATUS[$i]} == ok ]]; then
      return 0
    fi
  done
  return 1
}

record() { # record NAME STATUS: a step that was not run
  STEP_NAMES+=("$1")
  STEP_STATUS+=("$2")
  STEP_SECONDS+=(0)
  echo "--- $1: $2"
}

# ------------------------------------------------------------------ environment
echo "lorax_merge GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())' || true
ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "")
# The toolkit: CUDA_HOME, else /usr/local/cuda, else the one torch finds, else the folder
# above the nvcc on PATH (when it holds the headers; a bare wrapper does not).
if [[ -z ${CUDA_HOME:-} ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  else
    CUDA_HOME=$("$PYTHON" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null || true)
    if [[ -z $CUDA_HOME || ! -f $CUDA_HOME/include/cuda_runtime.h ]] && command -v nvcc >/dev/null 2>&1; then
      CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
    if [[ ! -f $CUDA_HOME/include/cuda_runtime.h ]]; then CUDA_HOME=""; fi
  fi
fi
export CUDA_HOME=${CUDA_HOME:-}
echo "CUDA_HOME=${CUDA_HOME:-<none>} arch=${ARCH:-<none visible: setup.py defaults>}"

# ------------------------------------------------------------------ 1. build
LIB=$WORK/lib
build() {
  cd "$REPO"
  TORCH_CUDA_ARCH_LIST="$ARCH" LORAX_MERGE_CUDA=1 LORAX_MERGE_PTXAS_VERBOSE=1 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" setup.py build_ext --build-temp "$WORK/build" --build-lib "$LIB"
  # The package's Python files beside the freshly built extension.
  cp "$REPO"/lorax_merge/*.py "$LIB/lorax_merge/"
  local cuobjdump
  cuobjdump=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
  if [[ -x $cuobjdump ]]; then
    "$cuobjdump" --list-elf "$LIB"/lorax_merge/_C*.so || true
  fi
  cd "$WORK"
  PYTHONPATH="$LIB" "$PYTHON" -c 'import lorax_merge; print(lorax_merge.build_info())'
}
export -f build
export REPO WORK LIB ARCH PYTHON
if [[ -z $CUDA_HOME ]]; then
  record build "failed (no CUDA toolkit: nvcc not found)"
else
  run_step build 200 "$OUT/build.log" bash -c 'set -euo pipefail; build'
fi
if [[ -f $OUT/build.log ]]; then
  echo "ptxas: $(grep -c 'Used [0-9]* registers' "$OUT/build.log" || true) kernel reports," \
    "$(grep -c ' [1-9][0-9]* bytes spill' "$OUT/build.log" || true) with spills"
fi
export PYTHONPATH=$LIB${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
cd "$WORK" # the source tree's own lorax_merge/ must not shadow the fresh build

HAVE_PYTEST=0
if "$PYTHON" -c 'import pytest' 2>/dev/null; then HAVE_PYTEST=1; fi

# ------------------------------------------------------------------ 2. CUDA tests
if ! step_ok build; then
  record tests-cuda "skipped (no build)"
elif ((HAVE_PYTEST == 0)); then
  record tests-cuda "skipped (pytest is not installed)"
else
  run_step tests-cuda 120 "$OUT/tests.log" \
    "$PYTHON" -m pytest "$REPO/tests/test_cuda.py" -q -rs -p no:cacheprovider
fi

# ------------------------------------------------------------------ 3. benchmark
if step_ok build; then
  run_step benchmark 120 "$OUT/bench.log" \
    "$PYTHON" "$REPO/benchmarks/bench_gpu.py" --markdown-out "$OUT/gpu_bench.md" \
    --json-out "$OUT/gpu_bench.json"
else
  record benchmark "skipped (no build)"
fi

# ------------------------------------------------------------------ 4. compute-sanitizer
cat >"$WORK/sanitize_workload.py" <<'PYEOF'
"""Every kernel on small, awkward inputs (odd sizes, misaligned views, several tiles)."""

import torch

import lorax_merge
from lorax_merge import utils

torch.manual_seed(0)
dev = "cuda"
w_gpu = torch.tensor([0.5, -1.0, 2.0], device=dev)
for dtype in (torch.bfloat16, torch.float32, torch.float64):
    flat = [torch.randn(40001, device=dev).to(dtype) for _ in range(3)]
    for tasks in ([f[:40000] for f in flat], [f[1:] for f in flat]):
        for strategy in ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"):
            lorax_merge.merge(tasks, [0.5, -1.0, 2.0], strategy, density=0.3, seed=1)
            lorax_merge.merge(
                tasks, w_gpu, strategy, density=0.3, seed=1, majority_sign_method="frequency"
            )
ties = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.bfloat16, device=dev)
x = ties[torch.randint(5, (70001,), device=dev)]
for d in (0.1, 0.5, 0.99):
    utils.prune(x, d, "magnitude")
groups = [[torch.randn(7 + g, 3, device=dev) for _ in range(1 + g % 3)] for g in range(150)]
weights = [[1.0] * len(g) for g in groups]
lorax_merge.merge_many(groups, weights, strategy="ties", density=0.4)
lorax_merge.merge_many(groups, weights, strategy="dare_ties", density=0.4, seed=2)
stacked = torch.randn(3, 1001, device=dev)
utils.disjoint_merge(stacked, utils.calculate_majority_sign_mask(stacked, "total"))
torch.cuda.synchronize()
print("workload done")
PYEOF
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer")
if ! step_ok build; then
  record sanitizer "skipped (no build)"
elif [[ ! -x $SANITIZER ]]; then
  record sanitizer "skipped (compute-sanitizer not found)"
else
  for tool in memcheck racecheck synccheck; do
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # accesses past a tensor's end.
    run_step "sanitizer-$tool" 70 "$OUT/sanitizer-$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "$PYTHON" "$WORK/sanitize_workload.py"
  done
fi

# ------------------------------------------------------------------ 5. core tests on CUDA
# The CUDA cases of the device-parametrised core suite; modules whose imports are missing
# on this machine (optional test dependencies) are left out and listed.
cat >"$WORK/missing_imports.py" <<'PYEOF'
import ast
import importlib.util
import pathlib
import sys

for path in sorted(pathlib.Path(sys.argv[1]).glob("test_*.py")):
    if path.name == "test_cuda.py":
        continue
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    missing = [
        m for m in sorted(names)
        if not (path.parent / f"{m}.py").exists() and importlib.util.find_spec(m) is None
    ]
    if missing:
        print(f"--ignore={path}")
        print(f"{path.name} left out: {', '.join(missing)} not installed", file=sys.stderr)
PYEOF
if step_ok build && ((HAVE_PYTEST == 1)); then
  mapfile -t IGNORES < <("$PYTHON" "$WORK/missing_imports.py" "$REPO/tests")
  run_step tests-core-on-cuda 60 "$OUT/tests-core.log" \
    "$PYTHON" -m pytest "$REPO/tests" -q -rs -p no:cacheprovider -k cuda -m "not slow" \
    --ignore="$REPO/tests/test_cuda.py" "${IGNORES[@]}"
else
  record tests-core-on-cuda "skipped (no build or no pytest)"
fi

# ------------------------------------------------------------------ summary
{
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  for i in "${!STEP_NAMES[@]}"; do
    echo "| ${STEP_NAMES[$i]} | ${STEP_STATUS[$i]} | ${STEP_SECONDS[$i]} |"
  done
  echo
  echo "total: $((SECONDS - START_S)) s"
} >"$OUT/summary.md"
echo
echo "=== summary ==="
cat "$OUT/summary.md"
if [[ -f $OUT/gpu_bench.md ]]; then
  echo
  cat "$OUT/gpu_bench.md"
fi
for s in "${STEP_STATUS[@]}"; do
  if [[ $s != ok ]]; then exit 1; fi
done
exit 0
