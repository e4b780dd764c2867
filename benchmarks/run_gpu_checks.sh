#!/usr/bin/env bash
# The GPU checks behind benchmarks/results/gpu/, in the order they were run. Needs a CUDA GPU,
# vLLM and this package installed; CKPT is a converted SmolLM2-135M (W4 S50% g16; the default
# conversion with BQPO + E2E-OQP: a one-shot checkpoint's near ties make greedy comparisons fragile).
#   bash benchmarks/run_gpu_checks.sh CKPT RESULTS_DIR [all|kernels|serve|tp|e2e|bench|load|perplexity]
# Environment: TESTS (a -k expression: which vLLM GPU tests `serve` runs), TEXT (WikiText-2's
# test.txt, for `perplexity`), RUNS (which perplexity runs: any of 2048 16 3 dense).
# Each part but `load` fits in under ten minutes on an H100; `load` needs about 12 minutes alone on
# its GPU (a vLLM server sharing the GPU with another that starts at the same time finds no memory
# for its KV cache).
set -uo pipefail
ckpt=$1
out=${2:-benchmarks/results/gpu}
part=${3:-all}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,ecc.mode.current --format=csv | tee "$out/gpu.txt"
python3 -c "from vllm_gqsa.kernels import cuda; print('GQSA CUDA kernels:', cuda.available())"

if [[ $part == all || $part == kernels ]]; then
  # The kernels' tests under memcheck (about 1,500; the sparse24 test that loads vLLM on its
  # CPU platform is a CPU test).
  timeout 500 compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_sparse24.py \
    -k "not vllm_loads" 2>&1 | tail -5 | tee "$out/cuda_kernel_tests_memcheck.txt"
  # About 3.5 minutes on an H200 with vLLM installed (Marlin and Machete in the same run).
  timeout 500 python3 benchmarks/kernel_speed.py --out "$out/kernels.json" 2>&1 | grep -E "layer sum|balance|grid"
fi
if [[ $part == all || $part == serve ]]; then
  # vLLM end to end against transformers on tiny converted models of every family (the test
  # suite's GPU tests): about 21 engine starts, 20-25 minutes in all. One pytest call per test,
  # so that a hung engine costs one test; TESTS=<-k expression> picks a subset.
  : > "$out/vllm_gpu_tests.txt"
  python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_vllm_gpu.py ${TESTS:+-k "$TESTS"} \
    | grep "::" | while read -r test; do
    echo "== $test" >> "$out/vllm_gpu_tests.txt"
    timeout 300 python3 -m pytest -q -s -p no:cacheprovider "$test" < /dev/null >> "$out/vllm_gpu_tests.txt" 2>&1
    tail -1 "$out/vllm_gpu_tests.txt"
  done
  # About 5 minutes per dtype with both modes: two server start-ups (torch.compile and CUDA-graph
  # capture for one of them), then the transformers reference.
  for dtype in float16 bfloat16; do
    timeout 500 python3 benchmarks/serve_check.py "$ckpt" --dtype $dtype --out "$out/serve_check_$dtype.json" 2>&1 | tail -3
  done
  timeout 330 python3 benchmarks/serve_check.py "$ckpt" --dtype float32 --modes graphs \
    --out "$out/serve_check_float32.json" 2>&1 | tail -3
fi
if [[ $part == all || $part == tp ]]; then
  # Tensor parallelism on 2 GPUs. SmolLM2's 9 attention heads do not split in two, so this uses a
  # tiny random Llama (8 heads, 4 KV heads) whose lm_head is scaled by 10: random weights give
  # nearly flat logits, whose greedy argmax would flip on rounding noise alone.
  tiny=$(mktemp -d)
  python3 - "$tiny/dense" <<'PY'
import sys, torch
from safetensors.torch import load_file, save_file
from converters.tiny import build_tiny_model
d = build_tiny_model(sys.argv[1], hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                     num_kv_heads=4, dtype=torch.float16, seed=1)
sd = load_file(f"{d}/model.safetensors")
sd["lm_head.weight"] = (sd["lm_head.weight"].float() * 10).half()
save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
PY
  gqsa-convert "$tiny/dense" "$tiny/w4s50" --bqpo-epochs 0 --e2e-epochs 0 --n-samples 16 --seq-len 128 -q
  timeout 400 python3 benchmarks/serve_check.py "$tiny/w4s50" --tensor-parallel-size 2 \
    --out "$out/serve_check_tp2.json" 2>&1 | tail -3
fi
if [[ $part == all || $part == e2e ]]; then
  # About two minutes per configuration (start-up, five batch sizes, three prompt lengths).
  e2e="python3 benchmarks/e2e.py --shape llama2-7b --batches 1,4,16,64,128 --ttft-prompts 512,2048,8192"
  timeout 590 $e2e --configs gqsa-s50,gptq-marlin,fp16 --out "$out/e2e_llama2-7b.json" 2>&1 | grep -E "batch|first token|^[a-z0-9-]+$"
  timeout 590 $e2e --configs gptq-machete,gqsa-s40,gqsa-s30 --out "$out/e2e_llama2-7b_more.json" 2>&1 | grep -E "batch|first token|^[a-z0-9-]+$"
  # 2:4 through cuSPARSELt: vLLM spends about a minute capturing each CUDA-graph size with it, so
  # batch 1 only, beside GQSA in the same run.
  timeout 590 python3 benchmarks/e2e.py --shape llama2-7b --batches 1 --configs sparse24,gqsa-s50 \
    --out "$out/e2e_llama2-7b_sparse24.json" 2>&1 | grep -E "batch|^[a-z0-9-]+$"
fi
if [[ $part == all || $part == bench ]]; then
  # vllm bench serve at fixed request rates, one server start-up per configuration.
  timeout 590 python3 benchmarks/serve_bench.py --shape llama2-7b --configs gqsa-s50,gptq-marlin,fp16 \
    --rates 2,8 --num-prompts 200 --out "$out/serve_bench_llama2-7b.json" 2>&1 | grep -E "req/s|^[a-z0-9-]+$"
fi
if [[ $part == all || $part == load ]]; then
  timeout 900 python3 benchmarks/load_test.py "$ckpt" --minutes 10.5 --out "$out/load_test.json" 2>&1 | tail -6
fi
if [[ $part == all || $part == perplexity ]]; then
  # WikiText-2 perplexity of CKPT served by vLLM, one engine start per run (about 2 minutes
  # each, 10-11 in all; RUNS="2048 16" picks runs, "dense" being the dense-copy control): the
  # step budget picks the kernel that scores the prompts (2048: dequantize + cuBLAS, 16: the
  # tensor-core kernel, 3: the GEMV), and the same budget with the weights saved as a dense model
  # tells the kernels' share of any difference from the dtype's. TEXT is WikiText-2's test.txt.
  if [[ -z ${TEXT:-} ]]; then
    echo "perplexity: skipped, set TEXT to WikiText-2's test.txt"
  else
    # At 3 tokens a step the 40 windows take about 27,000 steps: the GEMV scores the first 10 (the
    # results hold every window's loss, to compare window by window).
    ppl="python3 benchmarks/perplexity.py --engine vllm --dtype float16 --text $TEXT --seq-len 2048"
    for run in ${RUNS:-2048 16 3 dense}; do
      case $run in
        dense) flags=(--max-num-batched-tokens 2048 --max-windows 40 --as-dequantized) name=dense_copy_b2048 ;;
        3) flags=(--max-num-batched-tokens 3 --max-windows 10) name=b3 ;;
        *) flags=(--max-num-batched-tokens "$run" --max-windows 40) name=b$run ;;
      esac
      timeout 300 $ppl "${flags[@]}" --out "$out/perplexity_vllm_$name.json" "$ckpt" 2>&1 | tail -1
    done
  fi
fi
