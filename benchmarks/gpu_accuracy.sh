#!/usr/bin/env bash
# Accuracy of a real model converted on a GPU: the dense model, GQSA W4 S50% g16 at the default
# and at 4x the training epochs, and SparseGPT 2:4 and GPTQ W2 g128 from the same calibration
# samples, all scored on the whole WikiText-2 test split (GQSA and dense in float32 through the
# reference math, as the baselines are, and in float16 through vLLM and the GQSA kernels).
# One step per run, so that each stays short (under ten minutes on an H200 for a 1.5B model); a
# conversion cut short by its time limit (LIMIT) continues where it stopped when the step is run
# again.
#   bash benchmarks/gpu_accuracy.sh STEP DENSE WORK RESULTS
#   STEP: dense | gqsa | gqsa-long | baselines
# Environment: CALIB, TEXT (WikiText-2's valid.txt and test.txt); N_SAMPLES, SEQ_LEN (calibration,
# default 128 x 512, the converter's defaults); DEVICE (cuda); MAX_WINDOWS (all); VLLM (1: also
# score in vLLM); LIMIT (seconds a conversion may run in this run of the step, 500); METHODS (the
# baselines step's methods, sparsegpt-2:4,gptq-w2g128).
set -euo pipefail
step=$1 dense=$2 work=$3 out=$4
device=${DEVICE:-cuda}
calib=(--calib-data "$CALIB" --n-samples "${N_SAMPLES:-128}" --seq-len "${SEQ_LEN:-512}")
windows=(); [[ -n ${MAX_WINDOWS:-} ]] && windows=(--max-windows "$MAX_WINDOWS")
ppl=(python3 benchmarks/perplexity.py --text "$TEXT" --seq-len 2048 "${windows[@]}")
mkdir -p "$out" "$work"

score() {  # score MODEL NAME: float32 reference on $device, and float16 in vLLM; each once
  if [[ ! -e $out/${2}_reference.json ]]; then
    "${ppl[@]}" "$1" --device "$device" --dtype float32 --out "$out/${2}_reference.json" | tail -1
  fi
  if [[ ${VLLM:-1} == 1 && ! -e $out/${2}_vllm.json ]]; then
    "${ppl[@]}" "$1" --engine vllm --dtype float16 --out "$out/${2}_vllm.json" 2>&1 | tail -1
  fi
}

case $step in
  dense) score "$dense" dense ;;
  gqsa|gqsa-long)
    epochs=(); [[ $step == gqsa-long ]] && epochs=(--bqpo-epochs 8 --e2e-epochs 4)
    ckpt=$work/$step
    if [[ ! -e $ckpt/gqsa_report.json ]]; then
      # --resume continues an earlier run's blocks (and starts afresh when there are none).
      rc=0
      timeout --signal=INT "${LIMIT:-500}" python3 -m converters.cli "$dense" "$ckpt" "${calib[@]}" "${epochs[@]}" \
        --device "$device" --resume || rc=$?
      if [[ ! -e $ckpt/gqsa_report.json ]]; then
        echo "conversion stopped (exit $rc); run this step again to continue"
        exit 0
      fi
    fi
    cp "$ckpt/gqsa_report.json" "$out/${step}_report.json"
    score "$ckpt" "$step" ;;
  baselines)
    python3 benchmarks/baselines.py "$dense" --methods "${METHODS:-sparsegpt-2:4,gptq-w2g128}" "${calib[@]}" \
      --text "$TEXT" "${windows[@]}" --device "$device" --out "$out/baselines.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
