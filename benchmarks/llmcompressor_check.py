# SPDX-License-Identifier: Apache-2.0
"""The project's own GPTQ and SparseGPT baselines (``baselines.py``) against llm-compressor's, on the
same calibration tokens and the same perplexity protocol. llm-compressor pins its own transformers,
so this runs in a separate environment:

    python -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor tqdm
    PYTHONPATH=. .venv-llmc/bin/python benchmarks/llmcompressor_check.py MODEL \\
        --calib-data ../shared/data/wikitext-2/valid.txt --text ../shared/data/wikitext-2/test.txt \\
        --max-windows 40 --out benchmarks/results/smollm2_llmcompressor.json

``gptq-w4g128`` is llm-compressor's GPTQModifier with the W4A16_ASYM scheme (asymmetric 4-bit,
groups of 128, as ``baselines.py``); ``sparsegpt-2:4`` its SparseGPTModifier with a 2:4 mask.
The quantized model is evaluated as llm-compressor leaves it (weights fake-quantized in forward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.baselines import add_protocol_args  # noqa: E402
from converters.calibration import calibration_samples  # noqa: E402
from converters.convert import peak_memory  # noqa: E402
from converters.perplexity import perplexity  # noqa: E402


def recipe(method: str, dampening: float | None):
    if method == "gptq-w4g128":
        from llmcompressor.modifiers.quantization import GPTQModifier
        # SmolLM2's 576 columns are 4.5 groups of 128; the last group is partial, as in baselines.py.
        return GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"],
                            bypass_divisibility_checks=True)
    if method == "sparsegpt-2:4":
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        extra = {} if dampening is None else {"dampening_frac": dampening}
        return SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"],
                                 ignore=["lm_head"], **extra)
    raise SystemExit(f"unknown method {method!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--methods", default="sparsegpt-2:4,gptq-w4g128")
    add_protocol_args(p)
    p.add_argument("--dampening", type=float,
                   help="SparseGPT's dampening_frac (default: llm-compressor's; the solver here uses 0.01)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    samples = calibration_samples(tok, a.calib_data, a.n_samples, a.seq_len, 0)  # baselines.py's tokens
    data = Dataset.from_dict({"input_ids": samples.tolist(),
                              "attention_mask": torch.ones_like(samples).tolist()})
    results = {"command": " ".join(sys.argv), "llmcompressor": llmcompressor.__version__,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "dampening": a.dampening,
               "methods": {}}
    for method in a.methods.split(","):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        t0 = time.time()
        oneshot(model=model, dataset=data, recipe=recipe(method, a.dampening), max_seq_length=a.seq_len,
                num_calibration_samples=a.n_samples)
        seconds = time.time() - t0
        r = perplexity(model, tok, text, a.eval_seq_len, a.max_windows, "cpu", desc=method)
        r.update({"seconds": round(seconds, 1), "peak_memory": peak_memory(torch.device("cpu"))})
        print(method, json.dumps(r), flush=True)
        results["methods"][method] = r
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
