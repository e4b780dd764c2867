# SPDX-License-Identifier: Apache-2.0
"""Ablation for the converter's solver: the same GQSA format filled without calibration, by
magnitude pruning of whole groups (per matrix) and round-to-nearest min-max quantization.

    python benchmarks/rtn_baseline.py MODEL --sparsity 0.5 --text ../shared/data/wikitext-2/test.txt \
        --seq-len 2048 --max-windows 40 --out benchmarks/results/smollm2_rtn_baseline.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from converters.perplexity import perplexity  # noqa: E402
from converters.solver import rtn_layer  # noqa: E402
from vllm_gqsa.format import GQSAQuantConfig  # noqa: E402
from vllm_gqsa.reference import dequantize  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--out")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    qcfg = GQSAQuantConfig(bits=a.bits, group_size=a.group_size, sparsity=a.sparsity)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and qcfg.is_quantized(name):
            mod.weight.data = dequantize(rtn_layer(mod.weight.data, qcfg.layer_format(), a.sparsity))
    with open(a.text, encoding="utf-8") as f:
        r = perplexity(model, AutoTokenizer.from_pretrained(a.model), f.read(), a.seq_len, a.max_windows)
    r.update({"model": os.path.abspath(a.model), "method": "magnitude pruning of groups + round-to-nearest",
              "quantization_config": qcfg.to_dict(), "command": " ".join(sys.argv)})
    print(json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
