# SPDX-License-Identifier: Apache-2.0
"""Does a model write its attention-sink activation at position 0, whatever the first token?

Part of the record of bqpo_loss_experiment.md. Runs the first 64 tokens of each WikiText-2 test
window (position 0's state depends on no later token) up to decoder block BLOCK, and prints the
windows where position 0's hidden state has a mean square under THRESHOLD; then the same for every
token of the vocabulary as a one-token sequence. SmolLM2-135M: block 11, 1e4 (the dense model's
median there is about 1e6).

    python benchmarks/results/bqpo_loss_experiment_sink_check.py OUT.json DENSE_MODEL GQSA_CKPT... [--block B --threshold T]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from converters.perplexity import windows  # noqa: E402
from converters.reference_model import load_reference_model  # noqa: E402
from sink_first_tokens import position0_square  # noqa: E402  (this script's folder)

TEXT, WINDOWS = "../shared/data/wikitext-2/test.txt", 40


class _Stop(Exception):
    pass


def main(out: str, dense: str, ckpts: list[str], block: int, threshold: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(TEXT) as f:
        wins, _ = windows(AutoTokenizer.from_pretrained(dense), f.read(), 2048, WINDOWS)
    result = {}
    for path in (dense, *ckpts):
        model = (AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval() if path == dense
                 else load_reference_model(path, torch.float32))
        got = {}

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            got["position0"] = h[0, 0].pow(2).mean().item()
            got["largest_other"] = h[0, 1:].pow(2).mean(-1).max().item() if h.shape[1] > 1 else 0.0
            raise _Stop

        handle = model.model.layers[block].register_forward_hook(hook)
        rows = []
        for w in wins:
            try:
                with torch.no_grad():
                    model(w.reshape(1, -1)[:, :64])
            except _Stop:
                pass
            rows.append((round(got["position0"], 1), round(got["largest_other"], 1)))
        handle.remove()
        vocab = position0_square(model, block)
        result[path] = {"windows": rows, "first_tokens_without_the_sink": int((vocab < threshold).sum()),
                        "vocab_size": vocab.numel()}
        print(path, "windows without the sink:", [i for i, r in enumerate(rows) if r[0] < threshold],
              f"first tokens without it: {result[path]['first_tokens_without_the_sink']} of {vocab.numel()}")
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("dense")
    p.add_argument("ckpts", nargs="*")
    p.add_argument("--block", type=int, default=11)
    p.add_argument("--threshold", type=float, default=1e4)
    a = p.parse_args()
    main(a.out, a.dense, a.ckpts, a.block, a.threshold)
