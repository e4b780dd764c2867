#!/usr/bin/env bash
# SmolLM2-135M GQSA W4 S50% g16 (default training) at 128, 512 and 1024 calibration samples of 512
# tokens on one GPU, SparseGPT 2:4 from the same 512 and 1024, each scored on the first 40 windows
# of WikiText-2 test (float32, as the CPU tables). Every step is skipped once its result exists and
# conversions resume, so the same command continues where a run stopped. Stops starting steps at BUDGET
# seconds (the GPU machine's time limit per command). Run from the project root:
#   W=/path/to/work BUDGET=540 bash benchmarks/results/gpu/smollm2_h200_calibration_size.sh
# Kept as the record of these runs. To repeat them, benchmarks/gpu_accuracy.sh runs the same steps:
#   N_SAMPLES=512 MAX_WINDOWS=40 VLLM=0 METHODS=sparsegpt-2:4 CALIB=valid.txt TEXT=test.txt \
#     bash benchmarks/gpu_accuracy.sh gqsa|baselines|dense SmolLM2-135M work512 results512
set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1
start=$(date +%s); BUDGET=${BUDGET:-520}
W=${W:?a folder with smol.gguf, valid.txt and test.txt}; R=$W/results; mkdir -p $R
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a $R/log.txt; }
if [[ ! -f $W/SmolLM2-135M/config.json ]]; then
  python3 benchmarks/export_gguf_model.py smollm2 $W/SmolLM2-135M --gguf $W/smol.gguf 2>&1 | tail -2
fi
calib=(--calib-data $W/valid.txt --seq-len 512)
for n in 128 512 1024; do
  ck=$W/g$n
  if [[ ! -f $ck/gqsa_report.json ]]; then
    [[ $(left) -lt 60 ]] && { log "stop before g$n"; break; }
    log "convert g$n"
    t0=$(date +%s)
    timeout --signal=INT $(left) python3 -m converters.cli $W/SmolLM2-135M $ck --sparsity 0.5 "${calib[@]}" \
      --n-samples $n --device cuda --resume > $R/g$n.convert.$t0.log 2>&1
    log "convert g$n rc $? in $(( $(date +%s) - t0 )) s"
    [[ -f $ck/gqsa_report.json ]] || break
    cp $ck/gqsa_report.json $R/g${n}_report.json
  fi
  if [[ ! -f $R/acc_g$n.json ]]; then
    python3 benchmarks/accuracy.py $ck --text $W/test.txt --seq-len 2048 --max-windows 40 --device cuda \
      --dtype float32 --out $R/acc_g$n > $R/acc_g$n.log 2>&1; log "eval g$n rc $?"; tail -3 $R/acc_g$n.md
  fi
  if [[ $n != 128 && ! -f $R/sgpt_g$n.json ]]; then
    [[ $(left) -lt 60 ]] && { log "stop before sgpt$n"; break; }
    t0=$(date +%s)
    timeout $(left) python3 benchmarks/baselines.py $W/SmolLM2-135M --methods sparsegpt-2:4 "${calib[@]}" \
      --n-samples $n --text $W/test.txt --max-windows 40 --device cuda --out $R/sgpt_g$n.json > $R/sgpt_g$n.log 2>&1
    log "sgpt $n rc $? in $(( $(date +%s) - t0 )) s"
  fi
done
if [[ ! -f $R/acc_dense.json && $(left) -gt 40 ]]; then
  python3 benchmarks/accuracy.py $W/SmolLM2-135M --text $W/test.txt --seq-len 2048 --max-windows 40 --device cuda \
    --dtype float32 --out $R/acc_dense > $R/acc_dense.log 2>&1; log "eval dense rc $?"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/device.txt
python3 -c "import torch,transformers;print(torch.__version__, transformers.__version__)" >> $R/device.txt
