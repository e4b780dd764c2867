# SPDX-License-Identifier: Apache-2.0
"""How far greedy decoding of a checkpoint survives bf16 rounding alone: transformers in float32
against transformers in bfloat16, on the prompts of ``serve_check.py``, through the reference
dequantization. A model whose own bf16 and fp32 runs diverge after a few tokens cannot agree with
any other bf16 implementation for longer; this is the control for the serving check.

    python benchmarks/bf16_sensitivity.py CKPT [CKPT ...] --out benchmarks/results/bf16_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from converters.reference_model import load_reference_model  # noqa: E402
from serve_check import NEW_TOKENS, PROMPTS, leading_agreement  # noqa: E402


@torch.no_grad()
def greedy(ckpt: str, dtype: torch.dtype, tok) -> list[list[int]]:
    model = load_reference_model(ckpt, dtype=dtype)
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        g = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--out")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    results = []
    for ckpt in a.ckpts:
        tok = AutoTokenizer.from_pretrained(ckpt)
        fp32, bf16 = greedy(ckpt, torch.float32, tok), greedy(ckpt, torch.bfloat16, tok)
        agree = [leading_agreement(x, y) for x, y in zip(fp32, bf16)]
        r = {"checkpoint": os.path.abspath(ckpt), "leading_agreement_fp32_vs_bf16": agree,
             "prompts_identical": sum(n == NEW_TOKENS for n in agree), "prompts": len(agree)}
        print(json.dumps(r), flush=True)
        results.append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "torch": torch.__version__, "device": "cpu",
                       "new_tokens": NEW_TOKENS, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
