# SPDX-License-Identifier: Apache-2.0
"""Where in a 2048-token window does a converted model lose against the dense one?

Part of the record of smollm2_calibration_shape_experiment.md. Scores the same WikiText-2 test
windows as benchmarks/accuracy.py (the first WINDOWS of 2048 tokens, float32), but sums each
token's loss into bins by its position in the window, so that models calibrated on windows of
different lengths can be compared at the positions their calibration did and did not show.

    python benchmarks/results/loss_by_position.py OUT.json DENSE_MODEL GQSA_CKPT... [--windows N] [--skip-dense]

(--skip-dense scores only the checkpoints; the dense model's folder still gives the tokenizer.)
"""

import argparse
import json
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from converters.perplexity import windows  # noqa: E402
from converters.reference_model import load_reference_model  # noqa: E402

TEXT, SEQ_LEN = "../shared/data/wikitext-2/test.txt", 2048
# Positions of the predicted token: 1-127, 128-511, 512-1023, 1024-2047.
BINS = (1, 128, 512, 1024, SEQ_LEN)


def main(out: str, dense: str, ckpts: list[str], n_windows: int, skip_dense: bool = False) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(TEXT) as f:
        wins, _ = windows(AutoTokenizer.from_pretrained(dense), f.read(), SEQ_LEN, n_windows)
    result = {"command": "python " + " ".join(sys.argv), "text": TEXT, "windows": len(wins), "seq_len": SEQ_LEN,
              "bins": [f"{a}-{b - 1}" for a, b in zip(BINS, BINS[1:])],
              "environment": {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "transformers": transformers.__version__},
              "models": {}}
    for path in (ckpts if skip_dense else (dense, *ckpts)):
        model = (AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval() if path == dense
                 else load_reference_model(path, torch.float32))
        sums = torch.zeros(len(BINS) - 1, dtype=torch.float64)
        for w in wins:
            with torch.no_grad():
                logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, w[1:], reduction="none").double()
            for i, (a, b) in enumerate(zip(BINS, BINS[1:])):
                sums[i] += nll[a - 1:b - 1].sum()  # nll[p - 1] is the loss of the token at position p
        counts = [len(wins) * (b - a) for a, b in zip(BINS, BINS[1:])]
        mean = [s / c for s, c in zip(sums.tolist(), counts)]
        result["models"][path] = {"mean_nll": [round(m, 4) for m in mean],
                                  "perplexity": [round(math.exp(m), 2) for m in mean],
                                  "overall_perplexity": round(math.exp(sum(sums.tolist()) / sum(counts)), 2)}
        print(path, json.dumps(result["models"][path]), flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("dense")
    p.add_argument("ckpts", nargs="*")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--skip-dense", action="store_true")
    a = p.parse_args()
    main(a.out, a.dense, a.ckpts, a.windows, a.skip_dense)
