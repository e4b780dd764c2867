# SPDX-License-Identifier: Apache-2.0
"""``gqsa-convert``: a Hugging Face model folder in, a GQSA checkpoint out."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile

from vllm_gqsa.format import PATTERNS, GQSAFormatError

from .convert import ConvertError, ConvertOptions, convert, describe
from .hub import HubError, check_can_push, push, resolve_model


# --demo's calibration, where the options are not given: a tiny model converts in seconds.
DEMO_SAMPLING = {"n_samples": 16, "seq_len": 128}


def build_parser() -> argparse.ArgumentParser:
    d = ConvertOptions()
    p = argparse.ArgumentParser(
        prog="gqsa-convert",
        description="Prune groups of weights and quantize the rest into a GQSA checkpoint that "
                    "`vllm serve` loads with the vllm-gqsa plugin.")
    p.add_argument("model", nargs="?", help="Hugging Face model folder (config.json + safetensors), "
                                            "or a Hub model id such as HuggingFaceTB/SmolLM2-135M")
    p.add_argument("output", nargs="?", help="folder to write the GQSA checkpoint to")
    p.add_argument("--demo", action="store_true",
                   help="build a tiny random Llama and convert it (no model or data needed); "
                        "OUTPUT defaults to ./gqsa-demo")
    p.add_argument("--bits", type=int, default=4, help="bits per kept weight (2, 4 or 8; default 4)")
    # None: not given, so that --pattern pairs can tell a contradicting value from none.
    p.add_argument("--sparsity", type=float,
                   help="fraction of weight groups pruned, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", choices=PATTERNS, default=d.pattern,
                   help="which groups may be pruned: 'groups' (default) the least salient ones, any "
                        "number in a row; 'pairs' the less salient group of each aligned pair of groups "
                        "in every row (row block), so exactly 50%% sparsity, which the GPU's sparse "
                        "tensor cores (2:4) can run; it needs the input sizes to be multiples of "
                        "2 * --group-size")
    p.add_argument("--owl-lambda", type=float, default=d.owl_lambda,
                   help="give decoder blocks with more outlier weights more groups and the others fewer, "
                        "at the same mean sparsity (OWL); a block's sparsity moves by at most 2x this "
                        "(default 0: every block at --sparsity; 0.08 was 3%% better on SmolLM2-135M and 3%% worse on "
                        "Gemma-3-270M)")
    p.add_argument("--mlp-sparsity", type=float, default=None,
                   help="fraction of the MLP layers' groups pruned; each block's attention layers then "
                        "take what keeps the block's mean at --sparsity (counted in weights), so the "
                        "checkpoint keeps its size (default: every layer at --sparsity)")
    p.add_argument("--group-size", type=int, default=16,
                   help="consecutive input channels per group: 16, 32, 64 or 128 (default 16); 32 "
                        "stores less metadata (smaller, faster one-token decode, lower accuracy)")
    p.add_argument("--block-rows", type=int, default=1,
                   help="output rows sharing one pruning pattern (default 1); 64 lets the GPU's "
                        "tensor-core kernel skip pruned columns (faster batched decode, lower accuracy)")
    p.add_argument("--calib-data", help="text file (or folder of .txt) to calibrate on, "
                                        "e.g. WikiText-2 validation; random tokens if omitted")
    # None: not given, so that --demo can pick its own (DEMO_SAMPLING) and still honour a given value.
    p.add_argument("--n-samples", type=int, help=f"calibration sequences (default {d.n_samples}, "
                                                 f"{DEMO_SAMPLING['n_samples']} with --demo); for the same "
                                                 "training steps, more samples beat more epochs; on a GPU, "
                                                 "512 cost little and score better")
    p.add_argument("--seq-len", type=int, help=f"tokens per calibration sequence (default {d.seq_len}, "
                                               f"{DEMO_SAMPLING['seq_len']} with --demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: GPU when present)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="calibrate all sub-layers of a block in one pass (faster, less accurate)")
    p.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="use plain min-max ranges for the groups' scales")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="full name of a layer to leave dense (repeatable), "
                        "e.g. model.layers.0.mlp.down_proj")
    p.add_argument("--quantize-output-layer", action="store_true",
                   help="convert the output layer (lm_head) too, untied from the embedding if the model "
                        "ties them; it is left dense by default (accuracy first). Worth it for large "
                        "vocabularies, where it is a large share of each decoded token's bytes")
    p.add_argument("--output-layer-sparsity", type=float, default=0.0,
                   help="fraction of the output layer's groups pruned, with --quantize-output-layer "
                        "(default 0: quantized, not pruned)")
    t = p.add_argument_group(
        "training stages",
        "BQPO trains each block, after the solver, to reproduce the dense block (kept weights, "
        "scales and zero points; the pruning pattern stays). E2E-OQP then trains only the scales "
        "on the model's LM loss. Both use the calibration samples, the last --val-samples of them "
        "held out: a stage's result is kept only if it lowers the held-out loss. 0 epochs turns a "
        "stage off. Learning rates are fractions of each group's quantization step (Adam moves a "
        "parameter by about its learning rate per step), so they carry over between models. "
        "More epochs cost time and buy accuracy: on SmolLM2-135M, --bqpo-epochs 8 --e2e-epochs 4 "
        "took 3x the default conversion time and perplexity from 47.3 to 38.0.")
    t.add_argument("--bqpo-epochs", type=int, default=d.bqpo_epochs,
                   help=f"BQPO epochs over the calibration samples, per block (default {d.bqpo_epochs})")
    t.add_argument("--bqpo-lr-weight", type=float, default=d.bqpo_lr_weight,
                   help=f"BQPO learning rate of the kept weights, in units of the group's scale "
                        f"(default {d.bqpo_lr_weight:g})")
    t.add_argument("--bqpo-lr-quant", type=float, default=d.bqpo_lr_quant,
                   help=f"BQPO learning rate of the scales (relative) and zero points (in codes) "
                        f"(default {d.bqpo_lr_quant:g})")
    t.add_argument("--bqpo-batch-size", type=int, default=d.bqpo_batch_size,
                   help=f"calibration sequences per BQPO step (default {d.bqpo_batch_size})")
    t.add_argument("--e2e-epochs", type=int, default=d.e2e_epochs,
                   help=f"E2E-OQP epochs over the calibration samples (default {d.e2e_epochs})")
    t.add_argument("--e2e-lr", type=float, default=d.e2e_lr,
                   help=f"E2E-OQP learning rate of the scales, relative (default {d.e2e_lr:g})")
    t.add_argument("--e2e-batch-size", type=int, default=d.e2e_batch_size,
                   help=f"calibration sequences per E2E-OQP step (default {d.e2e_batch_size})")
    t.add_argument("--val-samples", type=int, default=d.val_samples,
                   help=f"calibration samples held out from training, at most half of --n-samples "
                        f"(default {d.val_samples})")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion from its last finished block "
                        "(same model and options)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the checkpoint to this Hub repository")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # Also where logging was configured before (basicConfig then does nothing); the converter's
    # progress bars are off where this logger is above INFO (converters.show_progress).
    logging.getLogger("converters").setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.quiet:  # transformers' and the Hub's bars
        from transformers.utils.logging import disable_progress_bar
        disable_progress_bar()
    sampling = DEMO_SAMPLING if args.demo else {"n_samples": ConvertOptions.n_samples,
                                                "seq_len": ConvertOptions.seq_len}
    for k, default in sampling.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    if args.pattern == "pairs" and args.sparsity not in (None, 0.5):
        print(f"gqsa-convert: error: --pattern pairs prunes exactly one group of every two (sparsity "
              f"0.5), not --sparsity {args.sparsity}; leave --sparsity out or use --pattern groups",
              file=sys.stderr)
        return 2
    if args.sparsity is None:
        args.sparsity = ConvertOptions.sparsity
    opts = ConvertOptions(
        bits=args.bits, group_size=args.group_size, sparsity=args.sparsity,
        block_rows=args.block_rows, pattern=args.pattern, owl_lambda=args.owl_lambda, mlp_sparsity=args.mlp_sparsity, calib_data=args.calib_data, n_samples=args.n_samples,
        seq_len=args.seq_len, seed=args.seed, device=args.device, batch_size=args.batch_size,
        true_sequential=args.true_sequential, clip_search=args.clip_search,
        skip_modules=tuple(args.skip), quantize_output_layer=args.quantize_output_layer,
        output_layer_sparsity=args.output_layer_sparsity, bqpo_epochs=args.bqpo_epochs, bqpo_lr_weight=args.bqpo_lr_weight,
        bqpo_lr_quant=args.bqpo_lr_quant, bqpo_batch_size=args.bqpo_batch_size,
        e2e_epochs=args.e2e_epochs, e2e_lr=args.e2e_lr, e2e_batch_size=args.e2e_batch_size,
        val_samples=args.val_samples, overwrite=args.overwrite, resume=args.resume)
    try:
        with contextlib.ExitStack() as stack:
            if args.demo:
                from .tiny import build_tiny_model
                output = args.output or args.model or "gqsa-demo"
                # The tiny model lives only as long as its conversion.
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gqsa-demo-"))
                model = build_tiny_model(os.path.join(tmp, "tiny-llama"))
            else:
                if not args.model or not args.output:
                    build_parser().error("MODEL and OUTPUT are required (or use --demo)")
                model, output = resolve_model(args.model), args.output
            if args.push_to_hub:
                check_can_push()
            report = convert(model, output, opts)
            if args.push_to_hub:
                print(f"pushed to {push(os.path.abspath(output), args.push_to_hub)}")
    except (ConvertError, GQSAFormatError, FileNotFoundError, HubError) as e:
        print(f"gqsa-convert: error: {e}", file=sys.stderr)
        return 2
    print(describe(report))
    print(f"  written to             {os.path.abspath(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
