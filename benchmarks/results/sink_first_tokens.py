# SPDX-License-Identifier: Apache-2.0
"""Which first tokens lose the attention sink, and how often do prompts start with them?

Part of the record of smollm2_calibration_shape_experiment.md. For every vocabulary token as a
one-token sequence it takes the mean square of position 0's hidden state after decoder block BLOCK
(as bqpo_loss_experiment_sink_check.py does), lists the tokens under THRESHOLD for each model, and
weighs them by how often they start a prompt: the chat template's first token, and the first token
of each non-empty line of WikiText-2 test, stripped, as a plain prompt would be tokenized (the
tokenizer adds no BOS). SmolLM2-135M: block 11, 1e4. Then what losing it costs: the loss per token
(after the first) of the lines of 16 tokens or more, cut at 128, whose first token loses the sink in
the first checkpoint, and of as many other such lines chosen at random (seed 0), under every
checkpoint less under the dense model; the other checkpoints, which keep the sink on more of those
lines, give the same lines with it.

    python benchmarks/results/sink_first_tokens.py OUT.json DENSE_MODEL GQSA_CKPT... [--block B --threshold T]
"""

import argparse
import collections
import json
import os
import platform
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from converters.reference_model import load_reference_model  # noqa: E402

TEXT = "../shared/data/wikitext-2/test.txt"


class _Stop(Exception):
    pass


def position0_square(model, block: int) -> torch.Tensor:
    """Mean square of position 0's state after `block`, for every vocabulary token as a first token."""
    got = {}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        got["sq"] = h[:, 0].pow(2).mean(-1)
        raise _Stop

    handle = model.model.layers[block].register_forward_hook(hook)
    parts = []
    for i in range(0, model.config.vocab_size, 4096):
        try:
            with torch.no_grad():
                model(torch.arange(i, min(i + 4096, model.config.vocab_size)).unsqueeze(1))
        except _Stop:
            pass
        parts.append(got["sq"])
    handle.remove()
    return torch.cat(parts)


def line_loss(model, ids: list[int]) -> float:
    """Mean next-token loss over a line's tokens after the first."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:])).item()


def main(out: str, dense: str, ckpts: list[str], block: int, threshold: float) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense)
    with open(TEXT) as f:
        lines = [line.strip() for line in f if line.strip()]
    line_ids = [tok(line).input_ids[:128] for line in lines]
    starts = collections.Counter(ids[0] for ids in line_ids)
    chat_first = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    chat_first = tok(chat_first).input_ids[0]

    models = {}
    for path in (dense, *ckpts):
        model = (AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval() if path == dense
                 else load_reference_model(path, torch.float32))
        models[path] = (model, position0_square(model, block))
    dense_model, first_lost = models[dense][0], models[ckpts[0]][1] < threshold
    # The lines whose first token loses the sink in the first checkpoint, and a control set.
    long_lines = [ids for ids in line_ids if len(ids) >= 16]
    hit_lines = [ids for ids in long_lines if first_lost[ids[0]]]
    control = random.Random(0).sample([ids for ids in long_lines if not first_lost[ids[0]]], len(hit_lines))
    dense_loss = {name: [line_loss(dense_model, ids) for ids in group]
                  for name, group in (("lines_losing_the_sink", hit_lines), ("control_lines", control))}
    result = {"command": "python " + " ".join(sys.argv),
              "environment": {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "transformers": transformers.__version__},
              "block": block, "threshold": threshold, "text": TEXT, "lines": len(lines),
              "distinct_line_starts": len(starts), "chat_template_first_token": tok.convert_ids_to_tokens(chat_first),
              "models": {}}
    for path, (model, sq) in models.items():
        lost = set(torch.nonzero(sq < threshold).flatten().tolist())
        hit = sum(n for t, n in starts.items() if t in lost)
        top = sorted(((n, t) for t, n in starts.items() if t in lost), reverse=True)[:15]
        result["models"][path] = {
            "first_tokens_without_the_sink": len(lost),
            "line_starts_without_the_sink": hit,
            "line_starts_share": hit / len(lines),
            "distinct_line_starts_without_the_sink": sum(1 for t in starts if t in lost),
            "chat_template_first_token_keeps_the_sink": chat_first not in lost,
            "chat_template_first_token_square": round(sq[chat_first].item(), 1),
            "most_frequent_lost_line_starts": [(tok.convert_ids_to_tokens(t), n) for n, t in top],
        }
        if path != dense:
            for name, group in (("lines_losing_the_sink", hit_lines), ("control_lines", control)):
                gaps = [line_loss(model, ids) - d for ids, d in zip(group, dense_loss[name])]
                result["models"][path][f"{name}_of_the_first_checkpoint"] = {
                    "count": len(group), "tokens": sum(len(ids) for ids in group),
                    "keep_the_sink_here": sum(1 for ids in group if ids[0] not in lost),
                    "mean_loss_over_dense": round(sum(gaps) / max(len(gaps), 1), 4),
                    "median_loss_over_dense": round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None}
        print(path, json.dumps(result["models"][path]), flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("dense")
    p.add_argument("ckpts", nargs="*")
    p.add_argument("--block", type=int, default=11)
    p.add_argument("--threshold", type=float, default=1e4)
    a = p.parse_args()
    main(a.out, a.dense, a.ckpts, a.block, a.threshold)
