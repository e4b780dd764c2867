# SPDX-License-Identifier: Apache-2.0
"""The largest residual-stream activation after each decoder block of a dense model, on calibration
text: where a model writes its few very large activations (which group pruning can break). Also,
for each RMSNorm inside the decoder layers, the largest |h * weight| of its input h: the g that
the norm split between two GQSA layers stores in the activations' dtype (vllm_gqsa/fusion.py), so
a launch whose g passes fp16's 65504 takes vLLM's normalized input instead (slower, same result).

    python benchmarks/residual_peaks.py MODEL --text ../shared/data/wikitext-2/valid.txt --out peaks.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from converters.calibration import calibration_samples  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--n-samples", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ids = calibration_samples(tok, a.text, a.n_samples, a.seq_len, seed=0)
    norm_peaks = {}

    def record(name):
        def hook(module, args):
            g = args[0].abs() * module.weight.abs()
            per_token = g.amax(-1).flatten()
            norm_peaks[name] = {"max_abs_h_times_weight": float(per_token.max()),
                                "tokens_over_fp16": int((per_token > 65504).sum()), "tokens": per_token.numel()}
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
               if ".layers." in n and n.rsplit(".", 1)[-1] in ("input_layernorm", "post_attention_layernorm")]
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    # hidden_states[0] is the embedding output; transformers gives the last block's output after the
    # model's final norm.
    for i, h in enumerate(out.hidden_states[1:]):
        peak = h.abs().amax(dim=(0, 1))  # per channel
        top = torch.topk(peak, 3)
        pos = h.abs().amax(dim=(0, 2)).argmax()
        rows.append({"block": i, "max_abs": float(top.values[0]), "channels": top.indices.tolist(),
                     "median_channel_max": float(peak.median()), "position_of_max": int(pos)})
        print(f"block {i:2d}: max |h| {rows[-1]['max_abs']:9.1f} in channels {rows[-1]['channels']}, "
              f"median channel max {rows[-1]['median_channel_max']:.2f}")
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "command": " ".join(sys.argv), "n_samples": a.n_samples,
                   "seq_len": a.seq_len, "blocks": rows, "norm_inputs": norm_peaks}, f, indent=1)
    worst = max(norm_peaks.items(), key=lambda kv: kv[1]["max_abs_h_times_weight"], default=None)
    if worst:
        print(f"largest |h * norm weight|: {worst[1]['max_abs_h_times_weight']:.1f} at {worst[0]}; "
              f"tokens over 65504 at any norm: {sum(v['tokens_over_fp16'] for v in norm_peaks.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
