# SPDX-License-Identifier: Apache-2.0
"""The largest residual-stream activation after each decoder block of a dense model, on calibration
text: where a model writes its few very large activations (which group pruning can break).

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
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
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
                   "seq_len": a.seq_len, "blocks": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
