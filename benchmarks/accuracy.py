# SPDX-License-Identifier: Apache-2.0
"""Accuracy table of dense models and GQSA checkpoints: WikiText-2 test perplexity, bits per
weight and size on disk, as Markdown and JSON.

    python benchmarks/accuracy.py /models/SmolLM2-135M /models/smol-w4s50-g16 ... \
        --text ../shared/data/wikitext-2/test.txt --max-windows 40 --out benchmarks/results/acc

writes ``acc.json`` and ``acc.md``; ``--append`` adds to the rows of an existing ``acc.json``
instead (each row keeps the command that measured it), to evaluate checkpoints as they are made.
Perplexity is the usual protocol (non-overlapping windows of
``--seq-len`` tokens, 2048 or the model's maximum if lower), in float32 on the CPU by default; a
GQSA checkpoint is evaluated through the reference dequantization (``benchmarks/perplexity.py``),
so the number is the format's accuracy, independent of any kernel. ``--max-windows`` scores only
the first windows, a stated prefix of the text, where the whole would take too long.

Bits per weight are counted from the checkpoint's tensors with ``vllm_gqsa.format`` (every index,
scale, zero point and row pointer included) over the layers GQSA converts; a dense model counts its
weight dtype over the same layers. Size on disk is the checkpoint's safetensors files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.perplexity import evaluate  # noqa: E402
from vllm_gqsa.checkpoint import (iter_tensors, read_quant_config, safetensors_files,  # noqa: E402
                                  split_gqsa_tensors)
from vllm_gqsa.format import DEFAULT_TARGET_MODULES, GQSALayer  # noqa: E402


def weight_stats(path: str, kind: str) -> dict:
    """Bits per weight of the (would-be) converted layers and bytes on disk."""
    disk = sum(os.path.getsize(f) for f in safetensors_files(path))
    tensors = dict(iter_tensors(path))
    if kind == "gqsa":
        qcfg = read_quant_config(path)
        layers, _ = split_gqsa_tensors(tensors, qcfg)
        fmt = qcfg.layer_format()
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        bits = weights = 0
        for name, parts in layers.items():
            n_out = (parts["row_ptr"].numel() - 1) * fmt.block_rows
            k_in = _in_features(name, config)
            layer = GQSALayer.from_tensors(parts, n_out, k_in, fmt, name)  # validates the sizes too
            bits += 8 * layer.storage_bytes()
            weights += n_out * k_in
        return {"bits_per_weight": bits / weights, "converted_weights": weights, "disk_bytes": disk,
                "format": f"GQSA W{qcfg.bits} S{qcfg.sparsity * 100:.0f}% g{qcfg.group_size}"
                          + (" pairs" if qcfg.pattern == "pairs" else "")}
    targets = [t for n, t in tensors.items()
               if n.endswith(".weight") and n.rsplit(".", 2)[-2] in DEFAULT_TARGET_MODULES]
    bits = sum(8 * t.numel() * t.element_size() for t in targets)
    weights = sum(t.numel() for t in targets)
    dtype = str(targets[0].dtype).replace("torch.", "") if targets else "?"
    return {"bits_per_weight": bits / max(weights, 1), "converted_weights": weights, "disk_bytes": disk,
            "format": f"dense {dtype}"}


def _in_features(name: str, config: dict) -> int:
    """A converted layer's input size, from the model's config (the format does not store K)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    leaf = name.rsplit(".", 1)[-1]
    return {"o_proj": heads * head_dim, "down_proj": inter}.get(leaf, hidden)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "| model | format | perplexity | bits per weight (converted layers) | weights on disk |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['format']} | {r['perplexity']:.2f} | {r['bits_per_weight']:.3f} "
                     f"| {r['disk_bytes'] / 2**20:.1f} MiB |")
    commands = list(dict.fromkeys(r["command"] for r in results))
    return "\n".join([
        f"Perplexity on `{meta['text']}` ({meta['windows']} windows of {meta['seq_len']} tokens, "
        f"{meta['dtype']} on {meta['device']}; GQSA through the reference dequantization).", "",
        *lines, "", "Commands:", "", *("    " + c for c in commands), "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="model folders (dense Hugging Face or GQSA)")
    p.add_argument("--text", required=True, help="evaluation text, e.g. WikiText-2 test.txt")
    p.add_argument("--seq-len", type=int, default=2048, help="window length (capped at the model maximum)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (for the CPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output path without extension: writes OUT.json and OUT.md")
    p.add_argument("--append", action="store_true", help="add the rows to OUT.json if it exists")
    a = p.parse_args(argv)
    command = " ".join(shlex.quote(x) for x in ["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    results, seq_lens, windows = [], set(), set()
    for path in a.models:
        t0 = time.time()
        r, kind = evaluate(path, text, a.seq_len, a.max_windows, getattr(torch, a.dtype), a.device)
        r.update(weight_stats(path, kind))
        report = os.path.join(path, "gqsa_report.json")
        if os.path.exists(report):
            with open(report) as f:
                rep = json.load(f)
            r.update({"conversion_seconds": rep.get("seconds"), "calibration": rep.get("calibration"),
                      "training": rep.get("training")})
        r.update({"name": os.path.basename(os.path.normpath(path)), "model": os.path.abspath(path),
                  "kind": kind, "eval_seconds": round(time.time() - t0, 1), "command": command})
        print(json.dumps({k: v for k, v in r.items() if k not in ("training", "calibration")}), flush=True)
        results.append(r)
    if a.append and os.path.exists(a.out + ".json"):
        with open(a.out + ".json") as f:
            old = json.load(f)
        if (old["text"], old["dtype"], old["device"]) != (os.path.abspath(a.text), a.dtype, a.device):
            raise SystemExit(f"{a.out}.json was measured on another text, dtype or device; not appending")
        results = [{"command": old.get("command"), **r} for r in old["results"]] + results
    for r in results:
        seq_lens.add(r["seq_len"])
        windows.add(r["windows"])
    meta = {"text": os.path.abspath(a.text), "dtype": a.dtype, "device": a.device,
            "seq_len": "/".join(map(str, sorted(seq_lens))), "windows": "/".join(map(str, sorted(windows))),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
