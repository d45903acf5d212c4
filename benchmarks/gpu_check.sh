#!/usr/bin/env bash
# Everything prunekit checks on a GPU, in one go (sized for a quarter of an hour on an H100/H200): builds the CUDA
# extension, runs the GPU tests, the kernel grid (benchmarks/block_kernels.py), the whole-model figure
# (benchmarks/gpu_model.py) and SparseGPT's N:M cost (benchmarks/sparsegpt_nm.py). Logs and results go to $OUT (default gpu_out/); copy the results into
# benchmarks/results/ to commit them.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/tmp/run QUICK=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PRUNEKIT_JIT_CUDA=1 PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
stamp() { echo "== $(date -u +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/machine.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/machine.txt"

stamp "build the extension (JIT, cached)"
$PY - <<'PY' 2>&1 | tee "$OUT/build.log"
import time
from prunekit.kernels.native import load_extension
t = time.perf_counter(); ext = load_extension(True)
print(f"built in {time.perf_counter() - t:.0f} s: {len(ext.kernels())} kernels")
PY

stamp "the kernels against dense first (a wrong kernel would spoil the timings)"
$PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "cuda_ext and forward" 2>&1 | tee "$OUT/smoke.log" | tail -3

stamp "kernel grid"
$PY benchmarks/block_kernels.py --device cuda --variants ${QUICK:+--quick} --out "$OUT/kernels_cuda" 2>&1 | tee "$OUT/kernels.log" | tail -5

stamp "whole model"
$PY benchmarks/gpu_model.py --out "$OUT/kernels_cuda_model" 2>&1 | tee "$OUT/model.log" | tail -14

stamp "SparseGPT 2:4 against unstructured (the column loop is launch-bound on a GPU)"
$PY benchmarks/sparsegpt_nm.py --device cuda --out "$OUT/sparsegpt_nm_cuda" 2>&1 | tee "$OUT/sparsegpt_nm.log" | tail -4

stamp "GPU tests"
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_dispatch.py tests/test_device.py \
    tests/test_convert.py tests/test_cuda_build.py 2>&1 | tee "$OUT/tests.log" | tail -25

stamp "done"
