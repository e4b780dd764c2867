# SPDX-License-Identifier: Apache-2.0
"""WikiText-2 test perplexity of dense models and GQSA checkpoints (through the reference math).

    python benchmarks/perplexity.py --text ../shared/data/wikitext-2/test.txt \
        --seq-len 2048 --max-windows 40 --out benchmarks/results/ppl.json DENSE_DIR GQSA_DIR ...

A GQSA checkpoint is evaluated as a transformers model whose linear weights are the reference
dequantization of the checkpoint, in float32 on the CPU by default: the number is the format's
accuracy, independent of any kernel.

With ``--engine vllm`` (a GPU) the same windows are scored by vLLM's engine instead, through the
kernels that serve the model (``prompt_logprobs``): the accuracy users get when serving it.
``--max-num-batched-tokens`` caps the tokens of each engine step, and so picks the GQSA kernel
that runs the prompts: at most 3 the GEMV, at most 64 the tensor-core kernel, more
dequantize + cuBLAS (the plugin's defaults). ``--as-dequantized`` scores a GQSA checkpoint's
weights saved as an ordinary dense model instead (the reference dequantization, float32), with the
same engine settings, so that what the GQSA kernels change is told apart from what the dtype does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from converters.perplexity import perplexity, prompt_nll, result, windows  # noqa: E402
from converters.reference_model import load_reference_model  # noqa: E402


def load(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config", {}).get("quant_method") == "gqsa":
        return load_reference_model(path, dtype=dtype, device=device), "gqsa"
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), "dense"


def evaluate(path: str, text: str, seq_len: int, max_windows: int | None, dtype: torch.dtype,
             device: str) -> tuple[dict, str]:
    """Perplexity of one model folder (windows capped at the model's maximum), and its kind."""
    from transformers import AutoTokenizer

    model, kind = load(path, dtype, device)
    tok = AutoTokenizer.from_pretrained(path)
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    return perplexity(model, tok, text, seq_len, max_windows, device, desc=os.path.basename(path)), kind


def evaluate_vllm(path: str, text: str, seq_len: int, max_windows: int | None, dtype: str,
                  max_num_batched_tokens: int | None) -> tuple[dict, str]:
    """The same windows as :func:`evaluate`, scored by vLLM's engine with the serving kernels."""
    import gc

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    # An engine process forked after this process had run torch on the CPU (writing a dequantized
    # copy) hung as it started on the H200; a spawned one starts clean.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    kind = "gqsa" if config.get("quantization_config", {}).get("quant_method") == "gqsa" else "dense"
    seq_len = min(seq_len, config.get("max_position_embeddings", seq_len))
    wins, total = windows(AutoTokenizer.from_pretrained(path), text, seq_len, max_windows)
    budget = max_num_batched_tokens or seq_len
    # Each window is a prompt of seq_len tokens and one generated token. Prefix caching would
    # reuse earlier prompts' states instead of scoring them.
    llm = LLM(model=path, dtype=dtype, max_model_len=seq_len + 1, enable_prefix_caching=False,
              max_num_batched_tokens=budget, max_num_seqs=min(budget, len(wins), 256),
              gpu_memory_utilization=0.5, seed=0)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in wins],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    seconds = time.time() - t0
    nll = [prompt_nll(w, o.prompt_logprobs) for w, o in zip(wins, outs)]
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    r = result(nll, seq_len, total)
    r.update({"engine": "vllm", "max_num_batched_tokens": budget, "score_seconds": round(seconds, 1)})
    return r, kind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model folders (dense or GQSA)")
    p.add_argument("--text", required=True, help="evaluation text, e.g. WikiText-2 test.txt")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 for the reference, float16 for vLLM")
    p.add_argument("--device", default="cpu", help="the reference's device")
    p.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                   help="reference: transformers with the checkpoint dequantized (default); "
                        "vllm: vLLM's engine and its GQSA kernels (needs a GPU)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="vLLM only: tokens per engine step (default: one window), which picks the kernel")
    p.add_argument("--as-dequantized", action="store_true",
                   help="vLLM only: score the GQSA checkpoint's dequantized weights as a dense model")
    p.add_argument("--out", help="write results JSON here")
    a = p.parse_args(argv)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    for flag, used in (("--max-num-batched-tokens", a.max_num_batched_tokens is not None),
                       ("--as-dequantized", a.as_dequantized)):
        if used and a.engine != "vllm":
            p.error(f"{flag} is for --engine vllm")
    a.dtype = a.dtype or ("float16" if a.engine == "vllm" else "float32")
    results = []
    for path in a.models:
        t0 = time.time()
        if a.engine == "vllm":
            if a.as_dequantized:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    r, _ = evaluate_vllm(dequantized_copy(path, tmp), text, a.seq_len, a.max_windows, a.dtype,
                                         a.max_num_batched_tokens)
                kind = "gqsa, dequantized to a dense model"
            else:
                r, kind = evaluate_vllm(path, text, a.seq_len, a.max_windows, a.dtype, a.max_num_batched_tokens)
        else:
            r, kind = evaluate(path, text, a.seq_len, a.max_windows, getattr(torch, a.dtype), a.device)
        report = os.path.join(path, "gqsa_report.json")
        if os.path.exists(report):
            with open(report) as f:
                rep = json.load(f)
            r.update({k: rep[k] for k in ("bits_per_weight_quantized_layers", "checkpoint_bytes",
                                          "seconds", "quantization_config", "calibration")})
        else:
            r["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                                        if n.endswith(".safetensors"))
        r.update({"model": os.path.abspath(path), "kind": kind, "eval_seconds": round(time.time() - t0, 1)})
        print(json.dumps({k: v for k, v in r.items() if k != "quantization_config"}), flush=True)
        results.append(r)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "text": os.path.abspath(a.text), "engine": a.engine,
                       "dtype": a.dtype, "device": a.device if a.engine == "reference" else "cuda",
                       "torch": torch.__version__, **engine_versions(a.engine),
                       "cpu": platform.processor() or platform.machine(), "results": results}, f, indent=2)
    return 0


def dequantized_copy(path: str, out: str) -> str:
    """The GQSA checkpoint ``path`` as a dense float32 model in ``out``, with its tokenizer."""
    import shutil

    load_reference_model(path, dtype=torch.float32).save_pretrained(out)
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(os.path.join(path, name), os.path.join(out, name))
    return out


def engine_versions(engine: str) -> dict:
    if engine != "vllm":
        return {}
    import vllm

    return {"vllm": vllm.__version__, "gpu": torch.cuda.get_device_name()}


if __name__ == "__main__":
    sys.exit(main())
