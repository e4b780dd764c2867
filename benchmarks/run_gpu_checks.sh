#!/usr/bin/env bash
# The GPU checks behind benchmarks/results/: kernel tests, the serving check of a converted
# checkpoint, and the kernel benchmark. Needs a CUDA GPU, vLLM and this package installed.
#   bash benchmarks/run_gpu_checks.sh CKPT RESULTS_DIR
set -uo pipefail
ckpt=$1
out=${2:-benchmarks/results}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,ecc.mode.current --format=csv | tee "$out/gpu.txt"
python3 -c "from vllm_gqsa.kernels import cuda; print('GQSA CUDA kernels:', cuda.available())"
timeout 240 python3 -m pytest -q -x tests/test_cuda_kernels.py 2>&1 | tail -5 | tee "$out/cuda_kernel_tests.txt"
timeout 330 python3 benchmarks/serve_check.py "$ckpt" --out "$out/serve_check.json" 2>&1 | tail -8
timeout 120 python3 benchmarks/kernels.py --quick --out "$out/kernels_quick.json" 2>&1 | tail -30
