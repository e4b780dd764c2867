# SPDX-License-Identifier: Apache-2.0
"""E2E-OQP on a finished GQSA checkpoint:

    python -m converters.e2e_checkpoint CKPT OUT [--e2e-epochs N --e2e-lr LR ...]

The stage that ``gqsa-convert --e2e-epochs N`` runs after the blocks, applied to a checkpoint
converted with ``--e2e-epochs 0`` (EfficientQAT runs its E2E-QP on the saved Block-AP model
the same way). It calibrates on the checkpoint's own calibration samples (from its report),
so with the same options the result equals a conversion with the stage on. Only the
``scales`` tensors change; the output is written next to OUT and moved into place in one
rename, as gqsa-convert does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from vllm_gqsa.checkpoint import read_quant_config, safetensors_files, split_gqsa_tensors
from vllm_gqsa.format import GQSALayer
from .calibration import calibration_samples
from .convert import (BLOCKS_DIR, COMPLETE_MARKER, ConvertError, ConvertOptions, _publish, check_output_location,
                      describe, environment, peak_memory, pick_device, prepare_output)
from .e2e import train_scales
from .hub import model_card
from .reference_model import load_reference_model


def train_checkpoint_scales(ckpt_dir: str, out_dir: str, opts: ConvertOptions) -> dict:
    """Run E2E-OQP on the GQSA checkpoint ``ckpt_dir`` and write the result to ``out_dir``."""
    from transformers import AutoTokenizer

    t_start = time.time()
    report_path = os.path.join(ckpt_dir, COMPLETE_MARKER)
    if not os.path.exists(report_path):
        raise ConvertError(f"{ckpt_dir} is not a finished GQSA checkpoint (no {COMPLETE_MARKER})")
    with open(report_path) as f:
        report = json.load(f)
    if report.get("training", {}).get("e2e"):
        raise ConvertError(f"{ckpt_dir} already went through E2E-OQP")
    qcfg = read_quant_config(ckpt_dir)
    files = safetensors_files(ckpt_dir)
    cal = report["calibration"]
    opts.calib_data = None if cal["data"] == "random tokens" else cal["data"]
    opts.n_samples, opts.seq_len, opts.seed = cal["n_samples"], cal["seq_len"], cal["seed"]
    if opts.held_out() < 1 or opts.e2e_epochs < 1:
        raise ConvertError("E2E-OQP needs --e2e-epochs 1 or more and 2 or more calibration samples")
    if opts.calib_data and not os.path.exists(opts.calib_data):
        raise ConvertError(f"the calibration data of {ckpt_dir}, {opts.calib_data} (from its "
                           f"{COMPLETE_MARKER}), does not exist; E2E-OQP calibrates on the same text")
    if opts.e2e_batch_size < 1:
        raise ConvertError(f"--e2e-batch-size {opts.e2e_batch_size} must be 1 or more")
    device = pick_device(opts.device)
    # The checkpoint is read whole before the output replaces it: it may be its own output, not
    # inside it.
    check_output_location(ckpt_dir, out_dir, may_replace_input=True)
    # The checks above first: a refused run leaves no partial folder.
    tmp = prepare_output(out_dir, opts.overwrite, False, sum(os.path.getsize(p) for p in files))

    torch.manual_seed(opts.seed)
    model = load_reference_model(ckpt_dir)
    model.config.use_cache = False
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        vocab_size = json.load(f).get("vocab_size")
    samples = calibration_samples(AutoTokenizer.from_pretrained(ckpt_dir), opts.calib_data, opts.n_samples,
                                  opts.seq_len, opts.seed, vocab_size=vocab_size)
    shards = [load_file(p) for p in files]
    parts, _ = split_gqsa_tensors({k: v for s in shards for k, v in s.items()}, qcfg)
    modules = dict(model.named_modules())
    layers = {name: GQSALayer.from_tensors(p, *modules[name].weight.shape, qcfg.layer_format(), name)
              for name, p in parts.items()}
    trained, record = train_scales(model, layers, samples, opts.held_out(), opts.scale_training(), device)

    for path, shard in zip(files, shards):
        for name in list(shard):
            module, _, leaf = name.rpartition(".")
            if leaf == "scales" and module in trained:
                shard[name] = trained[module].scales.contiguous()
        save_file(shard, os.path.join(tmp, os.path.basename(path)), metadata={"format": "pt"})
    for name in os.listdir(ckpt_dir):
        src = os.path.join(ckpt_dir, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (COMPLETE_MARKER,
                                                                                     "README.md"):
            shutil.copy2(src, os.path.join(tmp, name))
    report.setdefault("training", {})["e2e"] = {
        "epochs": opts.e2e_epochs, "lr": opts.e2e_lr, "batch_size": opts.e2e_batch_size,
        "held_out_samples": opts.held_out(), **record,
        "peak_memory": peak_memory(device), "environment": environment(device)}
    # The checkpoint took two processes; a user provisions for the larger peak of the two.
    earlier = report.get("peak_memory", {})
    report["peak_memory"] = {k: max(v, earlier.get(k, 0))
                             for k, v in report["training"]["e2e"]["peak_memory"].items()}
    report["seconds"] = round(report["seconds"] + time.time() - t_start, 1)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card(report, report["source"]))
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
        json.dump(report, f, indent=2)
    os.rmdir(os.path.join(tmp, BLOCKS_DIR))  # made by prepare_output for gqsa-convert's resume; unused
    _publish(tmp, out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    d = ConvertOptions()
    p = argparse.ArgumentParser(prog="python -m converters.e2e_checkpoint",
                                description=__doc__.split("\n\n")[0].strip())
    p.add_argument("checkpoint", help="GQSA checkpoint folder converted with --e2e-epochs 0")
    p.add_argument("output", help="folder to write the checkpoint with trained scales to")
    p.add_argument("--e2e-epochs", type=int, default=d.e2e_epochs)
    p.add_argument("--e2e-lr", type=float, default=d.e2e_lr, help="learning rate of the scales, relative")
    p.add_argument("--e2e-batch-size", type=int, default=d.e2e_batch_size)
    p.add_argument("--val-samples", type=int, default=d.val_samples)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    # As gqsa-convert: INFO messages and the progress bars.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = ConvertOptions(e2e_epochs=a.e2e_epochs, e2e_lr=a.e2e_lr, e2e_batch_size=a.e2e_batch_size,
                          val_samples=a.val_samples, device=a.device, overwrite=a.overwrite)
    try:
        report = train_checkpoint_scales(a.checkpoint, a.output, opts)
    except (ConvertError, FileNotFoundError, ValueError) as e:  # ValueError: GQSAFormatError too
        print(f"e2e_checkpoint: error: {e}", file=sys.stderr)
        return 2
    e2e = report["training"]["e2e"]
    print(describe(report))
    print(f"  E2E-OQP                held-out loss {e2e['val_loss_start']:.4f} -> {e2e['val_loss_best']:.4f} "
          f"({'kept' if e2e['kept_trained'] else 'not better: scales unchanged'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
