#!/usr/bin/env bash
# The GPU checks behind benchmarks/results/gpu/, in the order they were run. Needs a CUDA GPU,
# vLLM and this package installed; CKPT is a converted SmolLM2-135M (W4 S50% g16).
#   bash benchmarks/run_gpu_checks.sh CKPT RESULTS_DIR [all|kernels|serve|e2e|load]
# Each part fits in under ten minutes on an H100.
set -uo pipefail
ckpt=$1
out=${2:-benchmarks/results/gpu}
part=${3:-all}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,ecc.mode.current --format=csv | tee "$out/gpu.txt"
python3 -c "from vllm_gqsa.kernels import cuda; print('GQSA CUDA kernels:', cuda.available())"

if [[ $part == all || $part == kernels ]]; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_sparse24.py \
    2>&1 | tail -5 | tee "$out/cuda_kernel_tests_memcheck.txt"
  timeout 280 python3 benchmarks/kernels.py --models llama-2-7b --out "$out/kernels_llama2-7b.json" 2>&1 | tail -12
  timeout 280 python3 benchmarks/kernels.py --models llama-3-8b,qwen2.5-7b --tokens 1,4,8,16,64,512 --skip-balance \
    --out "$out/kernels_llama3-8b_qwen2.5-7b.json" 2>&1 | tail -12
fi
if [[ $part == all || $part == serve ]]; then
  for dtype in bfloat16 float16; do
    timeout 280 python3 benchmarks/serve_check.py "$ckpt" --dtype $dtype --out "$out/serve_check_$dtype.json" 2>&1 | tail -3
  done
  timeout 200 python3 benchmarks/serve_check.py "$ckpt" --dtype float32 --modes graphs \
    --out "$out/serve_check_float32.json" 2>&1 | tail -3
fi
if [[ $part == all || $part == e2e ]]; then
  timeout 590 python3 benchmarks/e2e.py --shape llama2-7b --batches 1,4,16,64,128 --ttft-prompts 512,2048,8192 \
    --configs gqsa-s50,gptq-marlin,fp16 --out "$out/e2e_llama2-7b.json" 2>&1 | grep -E "batch|first token|^[a-z0-9-]+$"
  timeout 590 python3 benchmarks/e2e.py --shape llama2-7b --batches 1,4,16,64,128 --ttft-prompts 512,2048,8192 \
    --configs gptq-machete,sparse24,gqsa-s40,gqsa-s30 --out "$out/e2e_llama2-7b_more.json" 2>&1 | grep -E "batch|first token|^[a-z0-9-]+$"
fi
if [[ $part == all || $part == load ]]; then
  timeout 595 python3 benchmarks/load_test.py "$ckpt" --minutes 9 --out "$out/load_test.json" 2>&1 | tail -6
fi
