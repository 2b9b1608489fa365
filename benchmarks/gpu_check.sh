#!/usr/bin/env bash
# GPU validation of lorax_merge on a machine with a CUDA GPU, its own python3 with torch,
# setuptools and ninja, a CUDA toolkit (nvcc) and no network:
#   1. builds the extension for the local GPU only, into a temporary directory (the source
#      tree is not modified), with the ptxas register/spill report;
#   2. runs the CUDA tests (tests/test_cuda.py, slow cases included): every strategy, dtype
#      and size against the CPU bit for bit (NaNs and signed zeros included), ties with 128
#      and 129 tasks (the inline descriptor table and the uploaded one), merge_many over 50
#      tie-heavy bfloat16 groups, every public entry point under
#      torch.cuda.set_sync_debug_mode("error"), CUDA-graph capture and replay (merge_many
#      with weights on the GPU included) and the capture-probe cases;
#   3. runs the GPU benchmark (benchmarks/bench_gpu.py);
#   4. runs compute-sanitizer (memcheck, initcheck, racecheck, synccheck) over a small
#      workload that reaches every kernel and every selection path, after a smoke test
#      that the sanitizer runs on this machine at all;
#   5. runs the CUDA cases of the device-parametrised core tests, as time allows.
# It writes 7 files into the folder given as the only argument: summary.md (each step's
# status, the test and sanitizer results, the per-kernel register/spill table),
# gpu_bench.md (the benchmark tables, ready for the README), gpu_bench.json (raw numbers),
# build.log, tests.log, sanitizer.log and check.log (everything). A failing step does not
# stop the later ones; the exit status is non-zero when any step failed.
# Budget: under 8 minutes on one H200 (GPU_CHECK_BUDGET_S, default 450 s, caps the steps;
# GPU_CHECK_BUILD_S, default 180 s, caps the build, for slower machines).
# Where no GPU is visible it is a dry run of the script itself (CI runs it so): the build for
# sm_90 and every test collected (and skipped); the benchmark and the sanitizers are skipped,
# and the exit status is zero when the rest passed.
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
if [[ $PYTHON == */* ]]; then # a path: made absolute, as the steps run in other folders
  PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lorax_merge_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START_S=$SECONDS
export PYTHONUNBUFFERED=1
# A reused output folder starts empty of this script's logs.
rm -f "$OUT"/{check,build,tests,sanitizer}.log "$OUT"/summary.md "$OUT"/gpu_bench.{md,json}
exec > >(tee -a "$OUT/check.log") 2>&1

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()

# run_step NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND with a timeout of
# min(CAP, time left in the budget), its output appended to LOGFILE (under a header) and
# shown on the console; records the status. The timeout interrupts with SIGINT first, so
# that pytest still prints what failed so far and a sanitizer its summary.
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
    echo "=== $name ===" >>"$log"
    set +e
    timeout -s INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
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
GPU_LINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi failed")
echo "$GPU_LINE"
PY_LINE=$("$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())' 2>&1 || true)
echo "$PY_LINE"
# What a build needs besides torch: Python's headers and setuptools (pyproject.toml's license
# field wants 77 or newer).
"$PYTHON" -c 'import os, sysconfig, setuptools; h = os.path.join(sysconfig.get_paths()["include"], "Python.h"); print("Python.h", "found" if os.path.exists(h) else "MISSING", h, "| setuptools", setuptools.__version__)' 2>&1 || true
ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "")
HAVE_GPU=1
NO_GPU="skipped (dry run: no GPU visible)"
if [[ -z $ARCH ]]; then
  HAVE_GPU=0
  ARCH=9.0 # the H200's, one architecture: the build is what a GPU run would compile
  echo "no GPU visible: a dry run"
fi
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
echo "CUDA_HOME=${CUDA_HOME:-<none>} arch=$ARCH"
# A g++ that links libstdc++ statically by default (the GPU image's /opt/gcc does) gives the
# extension a private libstdc++ that crashes on its first error message; setup.py refuses such
# a build. Where Python's compiler does that, build with the system's g++.
if [[ -z ${CXX:-} && -x /usr/bin/g++ ]]; then
  default_cxx=$("$PYTHON" -c 'import sysconfig; print((sysconfig.get_config_var("CXX") or "c++").split()[0])')
  printf '#include <string>\nstd::string f(double x) { return std::to_string(x); }\n' \
    >"$WORK/cxx_probe.cpp"
  if "$default_cxx" -shared -fPIC "$WORK/cxx_probe.cpp" -o "$WORK/cxx_probe.so" 2>/dev/null; then
    probe_needs=$(ldd "$WORK/cxx_probe.so" 2>/dev/null || true)
    if [[ $probe_needs != *libstdc++* ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
  fi
fi
echo "C++ compiler: ${CXX:-the default}"

# ------------------------------------------------------------------ 1. build
LIB=$WORK/lib
build() {
  cd "$REPO"
  "$PYTHON" -c 'import setuptools, ninja' # offline build needs both (no build isolation)
  TORCH_CUDA_ARCH_LIST="$ARCH" LORAX_MERGE_CUDA=1 LORAX_MERGE_PTXAS_VERBOSE=1 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PYTHON" setup.py build_ext --build-temp "$WORK/build" --build-lib "$LIB"
  # The package's Python files (its subpackages too) beside the freshly built extension.
  (cd "$REPO" && find lorax_merge -name '*.py' -exec cp --parents -t "$LIB" {} +)
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
  run_step build "${GPU_CHECK_BUILD_S:-180}" "$OUT/build.log" bash -c 'set -euo pipefail; build'
fi
export PYTHONPATH=$LIB${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
cd "$WORK" # the source tree's own lorax_merge/ must not shadow the fresh build

HAVE_PYTEST=0
if "$PYTHON" -c 'import pytest' 2>/dev/null; then HAVE_PYTEST=1; fi
# A test that hangs has its stack dumped after 45 s.
PYTEST_ARGS=(-q -rfEs -p no:cacheprovider -o faulthandler_timeout=45)

# ------------------------------------------------------------------ 2. CUDA tests
if ! step_ok build; then
  record tests-cuda "skipped (no build)"
elif ((HAVE_PYTEST == 0)); then
  record tests-cuda "skipped (pytest is not installed)"
else
  run_step tests-cuda 120 "$OUT/tests.log" \
    "$PYTHON" -m pytest "$REPO/tests/test_cuda.py" "$REPO/tests/test_build.py" "${PYTEST_ARGS[@]}"
fi

# ------------------------------------------------------------------ 3. benchmark
if ((HAVE_GPU == 0)); then
  record benchmark "$NO_GPU"
elif step_ok build; then
  # (its output is in check.log)
  run_step benchmark 110 "$WORK/bench.log" \
    "$PYTHON" "$REPO/benchmarks/bench_gpu.py" --markdown-out "$OUT/gpu_bench.md" \
    --json-out "$OUT/gpu_bench.json"
else
  record benchmark "skipped (no build)"
fi

# ------------------------------------------------------------------ 4. compute-sanitizer
cat >"$WORK/sanitize_workload.py" <<'PYEOF'
"""Every kernel and every selection path on small, awkward inputs: odd sizes, misaligned
views, one-block and spread selections, trivial densities, tables inline and uploaded."""

import torch

import lorax_merge
from lorax_merge import delta, utils

torch.manual_seed(0)
dev = "cuda"
strategies = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
w_gpu = torch.tensor([0.5, -1.0, 2.0], device=dev)
# one block selects 40000-element tensors of every dtype; 270001 float32 elements are
# spread over one block per tile
for dtype, n in ((torch.bfloat16, 40001), (torch.float32, 40001), (torch.float64, 40001),
                 (torch.float32, 270001)):
    flat = [torch.randn(n, device=dev).to(dtype) for _ in range(3)]
    for tasks in ([f[: n - 1] for f in flat], [f[1:] for f in flat]):
        for strategy in strategies:
            lorax_merge.merge(tasks, [0.5, -1.0, 2.0], strategy, density=0.3, seed=1)
            lorax_merge.merge(tasks, w_gpu, strategy, density=0.3, seed=1,
                              majority_sign_method="frequency", out_dtype=torch.float16)
ties = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.bfloat16, device=dev)
for n in (70001, 400003):
    x = ties[torch.randint(5, (n,), device=dev)]
    for d in (0.0, 0.1, 0.5, 0.99, 1.0):
        utils.prune(x, d, "magnitude")
many = [torch.randn(513, device=dev) for _ in range(129)]
lorax_merge.merge(many, [1.0] * 129, "ties", density=0.4)
groups = [[torch.randn(7 + g, 3, device=dev) for _ in range(1 + g % 3)] for g in range(150)]
weights = [[1.0] * len(g) for g in groups]
lorax_merge.merge_many(groups, weights, strategy="ties", density=0.4)
lorax_merge.merge_many(groups, weights, strategy="dare_ties", density=0.4, seed=2)
stacked = torch.randn(3, 1001, device=dev)
for method in ("total", "frequency"):
    utils.disjoint_merge(stacked, utils.calculate_majority_sign_mask(stacked, method))
# gradients: the fused backward (magnitude and DARE), the weight-gradient tree, the
# disjoint-merge backward
leaves = [torch.randn(4099, device=dev, requires_grad=True) for _ in range(3)]
w_leaf = w_gpu.clone().requires_grad_(True)
for strategy in strategies:
    lorax_merge.merge(leaves, w_leaf, strategy, density=0.3, seed=1).square().sum().backward()
stacked.requires_grad_(True)
mask = utils.calculate_majority_sign_mask(stacked.detach(), "total")
utils.disjoint_merge(stacked, mask).square().sum().backward()
# LoRA deltas and a delta-space merge of them
lora_a = [torch.randn(8, 257, device=dev) for _ in range(3)]
lora_b = [torch.randn(300, 8, device=dev) for _ in range(3)]
delta.merged_delta(lora_a, lora_b, [1.0, 0.5, 2.0], [0.5, -1.0, 2.0], "ties_svd", density=0.4)
torch.cuda.synchronize()
print("workload done")
PYEOF
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer")
# A smoke test first: where the sanitizer cannot run at all (some container runtimes refuse
# it the device), the four tools are marked as such instead of as failures of the kernels.
SANITIZER_ARGS=()
SANITIZER_SKIP=""
if ((HAVE_GPU == 0)); then
  SANITIZER_SKIP=$NO_GPU
elif ! step_ok build; then
  SANITIZER_SKIP="skipped (no build)"
elif [[ ! -x $SANITIZER ]]; then
  SANITIZER_SKIP="skipped (compute-sanitizer not found)"
else
  SMOKE='import torch; x = torch.ones(8, device="cuda"); print("smoke", float((x + 1).sum()))'
  SANITIZER_SKIP="skipped (compute-sanitizer does not run here: its smoke test failed, see sanitizer.log)"
  for args in "--print-limit 50" ""; do
    echo "=== sanitizer smoke test (${args:-no options}) ===" >>"$OUT/sanitizer.log"
    # shellcheck disable=SC2086 # the options are words
    if timeout -s INT --kill-after=5 40 "$SANITIZER" --tool memcheck --error-exitcode 1 $args \
      "$PYTHON" -c "$SMOKE" >>"$OUT/sanitizer.log" 2>&1; then
      read -r -a SANITIZER_ARGS <<<"$args"
      SANITIZER_SKIP=""
      break
    fi
  done
fi
for tool in memcheck initcheck racecheck synccheck; do
  if [[ -n $SANITIZER_SKIP ]]; then
    record "sanitizer-$tool" "$SANITIZER_SKIP"
  else
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # accesses past a tensor's end.
    run_step "sanitizer-$tool" 50 "$OUT/sanitizer.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "${SANITIZER_ARGS[@]}" "$PYTHON" "$WORK/sanitize_workload.py"
  fi
done

# ------------------------------------------------------------------ 5. core tests on CUDA
# The CUDA cases of the device-parametrised core suite; modules whose imports are missing
# on this machine (optional test dependencies) are left out and listed.
cat >"$WORK/missing_imports.py" <<'PYEOF'
import ast
import importlib.util
import pathlib
import sys

for path in sorted(pathlib.Path(sys.argv[1]).glob("test_*.py")):
    if path.name in ("test_cuda.py", "test_build.py"):
        continue
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    missing = [
        m for m in sorted(names)
        # tests/conftest.py puts tests/ and benchmarks/ on sys.path
        if not any((d / f"{m}.py").exists() for d in (path.parent, path.parent.parent / "benchmarks"))
        and importlib.util.find_spec(m) is None
    ]
    if missing:
        print(f"--ignore={path}")
        print(f"{path.name} left out: {', '.join(missing)} not installed", file=sys.stderr)
PYEOF
if step_ok build && ((HAVE_PYTEST == 1)); then
  mapfile -t IGNORES < <("$PYTHON" "$WORK/missing_imports.py" "$REPO/tests")
  # Four workers where pytest-xdist is installed (collection is a good part of the time); a
  # module that fails to import is reported, and the others still run.
  PARALLEL=()
  if "$PYTHON" -c 'import xdist' 2>/dev/null; then PARALLEL=(-n 4); fi
  run_step tests-core-on-cuda 90 "$OUT/tests.log" \
    "$PYTHON" -m pytest "$REPO/tests" "${PYTEST_ARGS[@]}" "${PARALLEL[@]}" \
    --continue-on-collection-errors -m "not slow" \
    -k "cuda or different_devices or wrong_device" \
    --ignore="$REPO/tests/test_cuda.py" --ignore="$REPO/tests/test_build.py" "${IGNORES[@]}"
else
  record tests-core-on-cuda "skipped (no build or no pytest)"
fi

# ------------------------------------------------------------------ summary
{
  echo "# lorax_merge GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ); GPU: $GPU_LINE; $PY_LINE"
  if ((HAVE_GPU == 0)); then
    echo
    echo "**Dry run: no GPU was visible.** Only the build and the test collection were checked."
  fi
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  for i in "${!STEP_NAMES[@]}"; do
    echo "| ${STEP_NAMES[$i]} | ${STEP_STATUS[$i]} | ${STEP_SECONDS[$i]} |"
  done
  echo
  echo "total: $((SECONDS - START_S)) s"
  if [[ -f $OUT/tests.log ]]; then
    echo
    echo "## Tests"
    echo
    echo '```'
    # Per step: its header, at most 25 failures, and its closing counts (also after a timeout).
    awk '/^=== / { print; listed = 0; next }
         /^(FAILED|ERROR) / { if (++listed <= 25) print; else if (listed == 26) print "(more failures: tests.log)"; next }
         /KeyboardInterrupt|Timeout/ { print; next }
         /(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s/ { print }' \
      "$OUT/tests.log" || true
    echo '```'
  fi
  if [[ -f $OUT/sanitizer.log ]]; then
    echo
    echo "## compute-sanitizer"
    echo
    echo '```'
    grep -E '^=== |SUMMARY|workload done|smoke' "$OUT/sanitizer.log" || true
    echo '```'
  fi
  if [[ -f $OUT/build.log ]]; then
    echo
    echo "## Registers and spills (ptxas)"
    echo
    "$PYTHON" "$REPO/benchmarks/ptxas_report.py" "$OUT/build.log" || echo "(no ptxas report)"
  fi
} >"$OUT/summary.md"
echo
echo "=== summary ==="
cat "$OUT/summary.md"
if [[ -f $OUT/gpu_bench.md ]]; then
  echo
  cat "$OUT/gpu_bench.md"
fi
echo
echo "=== steps ===" # again last, where a short view of the output shows it
for i in "${!STEP_NAMES[@]}"; do
  echo "${STEP_NAMES[$i]}: ${STEP_STATUS[$i]} (${STEP_SECONDS[$i]} s)"
done
for s in "${STEP_STATUS[@]}"; do
  if [[ $s != ok && $s != "$NO_GPU" ]]; then exit 1; fi
done
exit 0
