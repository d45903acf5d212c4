#!/usr/bin/env bash
# Everything prunekit checks on a GPU, in one go (sized for a quarter of an hour on an H100/H200): builds the CUDA
# extension, checks the kernels against dense, times the host cost of one call (benchmarks/call_overhead.py), runs
# the kernel grid with every launch variant (benchmarks/block_kernels.py), the whole-model figure
# (benchmarks/gpu_model.py), SparseGPT's N:M cost (benchmarks/sparsegpt_nm.py) and the GPU tests. Logs and results
# go to $OUT (default gpu_out/); copy the results into benchmarks/results/ to commit them. STEPS picks steps, in this
# order, for runs split across calls (the build is cached between calls on a warm machine). The grid saves its rows
# as it goes: if a call's time limit cuts it short, RESUME=<that kernels_cuda.json> makes the next call (on a GPU of
# the same model) measure only the rest.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/tmp/run QUICK=1 STEPS="build smoke grid" bash ...
#   RESUME=gpu_in/kernels_cuda.json STEPS="grid model sparsegpt tests" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# 9.0a: Hopper's arch-specific code, with wgmma (the tcw kernel); the build is cached per arch list
export PRUNEKIT_JIT_CUDA=1 PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
STEPS=${STEPS:-build smoke overhead grid model sparsegpt tests}
stamp() { echo "== $(date -u +%T) $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/machine.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/machine.txt"

if want build; then
stamp "build the extension (JIT, cached)"
$PY - <<'PY' 2>&1 | tee "$OUT/build.log"
import time
from prunekit.kernels.native import load_extension
t = time.perf_counter(); ext = load_extension(True)
print(f"built in {time.perf_counter() - t:.0f} s: {len(ext.kernels())} kernels; wgmma (tcw) loaded: {ext.has_wgmma()}")
PY
fi

if want smoke; then
stamp "the kernels against dense first (a wrong kernel would spoil the timings)"
$PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "cuda_ext and (forward or variant)" 2>&1 | tee "$OUT/smoke.log" | tail -3
if grep -q "failed\|error" "$OUT/smoke.log"; then  # tcw, new and never run, must not take the grid down with it
  export PRUNEKIT_WGMMA=0
  echo "smoke failed: PRUNEKIT_WGMMA=0 from here on" | tee -a "$OUT/smoke.log"
fi
fi

if want overhead; then
stamp "host cost of a call: the operator, the module around it, nn.Linear"
$PY benchmarks/call_overhead.py --device cuda --out "$OUT/call_overhead_cuda" 2>&1 | tee "$OUT/overhead.log" | tail -5
fi

if want grid; then
stamp "kernel grid"
$PY benchmarks/block_kernels.py --device cuda --variants ${QUICK:+--quick} ${RESUME:+--resume "$RESUME"} \
    --out "$OUT/kernels_cuda" 2>&1 | tee "$OUT/kernels.log" | tail -5
fi

if want model; then
stamp "whole model"
$PY benchmarks/gpu_model.py --out "$OUT/kernels_cuda_model" 2>&1 | tee "$OUT/model.log" | tail -14
fi

if want sparsegpt; then
stamp "SparseGPT 2:4 against unstructured (the column loop is launch-bound on a GPU)"
$PY benchmarks/sparsegpt_nm.py --device cuda --out "$OUT/sparsegpt_nm_cuda" 2>&1 | tee "$OUT/sparsegpt_nm.log" | tail -4
fi

if want tests; then
stamp "GPU tests"
# (test_cuda_build's compile checks, nvcc's of the kernels for three architectures and of the operator and NVRTC's,
# are for machines without a GPU; here they would spend about two minutes of the lease, and the build step and the CuPy
# runs compile and load what the GPU needs)
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_dispatch.py tests/test_device.py \
    tests/test_convert.py tests/test_cuda_build.py \
    -k "not nvcc_builds and not operator_compiles and not nvrtc_compiles" 2>&1 | tee "$OUT/tests.log" | tail -25
fi

stamp "done"
