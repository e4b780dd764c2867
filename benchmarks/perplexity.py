# SPDX-License-Identifier: Apache-2.0
"""WikiText-2 test perplexity of dense models and GQSA checkpoints (through the reference math).

    python benchmarks/perplexity.py --text ../shared/data/wikitext-2/test.txt \
        --seq-len 2048 --max-windows 40 --out benchmarks/results/ppl.json DENSE_DIR GQSA_DIR ...

A GQSA checkpoint is evaluated as a transformers model whose linear weights are the reference
dequantization of the checkpoint, in float32 on the CPU by default: the number is the format's
accuracy, independent of any kernel.
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

from converters.perplexity import perplexity  # noqa: E402
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model folders (dense or GQSA)")
    p.add_argument("--text", required=True, help="evaluation text, e.g. WikiText-2 test.txt")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write results JSON here")
    a = p.parse_args(argv)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    results = []
    for path in a.models:
        t0 = time.time()
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
            json.dump({"command": " ".join(sys.argv), "text": os.path.abspath(a.text),
                       "dtype": a.dtype, "device": a.device, "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
