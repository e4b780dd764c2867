# SPDX-License-Identifier: Apache-2.0
"""How many group columns a tensor-core warp tile of a real checkpoint must multiply.

The tensor-core kernel multiplies 16 rows at a time (one mma A operand) over every 16-channel
k-step. A k-step could be skipped only if none of the tile's 16 rows keeps that group column. This
script reports, for every GQSA layer of a checkpoint, the fraction of group columns kept (density)
and the fraction kept by at least one row of each 16-row tile (the columns the kernel must feed to
the tensor cores), also after sorting the rows by a random projection of their keep patterns, a
cheap way to group similar rows (the kernel could permute its output rows at load time).

    python benchmarks/tile_columns.py CKPT [--tile 16] [--out benchmarks/results/tile_columns.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from converters.fake_quant import group_params  # noqa: E402
from vllm_gqsa.checkpoint import iter_tensors, read_quant_config, split_gqsa_tensors  # noqa: E402
from vllm_gqsa.format import GQSALayer  # noqa: E402


def tile_union(mask: torch.Tensor, tile: int) -> float:
    """Fraction of (tile, column) pairs where some row of the tile keeps the column."""
    n = mask.shape[0] // tile * tile
    return mask[:n].reshape(n // tile, tile, -1).any(1).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--tile", type=int, default=16, help="rows per tensor-core tile (mma m = 16)")
    p.add_argument("--out", default="benchmarks/results/tile_columns.json")
    args = p.parse_args(argv)

    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = read_quant_config(args.ckpt)
    config = AutoConfig.from_pretrained(args.ckpt)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # only the layer shapes are needed
        modules = dict(AutoModelForCausalLM.from_config(config).named_modules())
    layers, _ = split_gqsa_tensors(dict(iter_tensors(args.ckpt)), qcfg)
    g = torch.Generator().manual_seed(0)
    rows, total = [], {"cols": 0, "kept": 0.0, "union": 0.0, "union_sorted": 0.0}
    for name in sorted(layers):
        out_features, in_features = modules[name].weight.shape
        layer = GQSALayer.from_tensors(layers[name], out_features, in_features, qcfg.layer_format(), name)
        mask = group_params(layer)[0]  # bool [N, K / G]: the groups each row keeps
        order = (mask.float() @ torch.randn(mask.shape[1], generator=g)).argsort()
        r = {"layer": name, "rows": mask.shape[0], "group_cols": mask.shape[1],
             "density": mask.float().mean().item(), "tile_union": tile_union(mask, args.tile),
             "tile_union_sorted_rows": tile_union(mask[order], args.tile)}
        rows.append(r)
        cols = mask.numel()
        total["cols"] += cols
        total["kept"] += r["density"] * cols
        total["union"] += r["tile_union"] * cols
        total["union_sorted"] += r["tile_union_sorted_rows"] * cols
        print(f"{name:45s} density {r['density']:.3f}  {args.tile}-row tiles keep {r['tile_union']:.3f} "
              f"of the columns ({r['tile_union_sorted_rows']:.3f} with rows sorted)")
    summary = {k: total[k] / total["cols"] for k in ("kept", "union", "union_sorted")}
    print(f"all layers: density {summary['kept']:.3f}, {args.tile}-row tiles keep {summary['union']:.3f} "
          f"of the columns ({summary['union_sorted']:.3f} with rows sorted)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    import transformers

    Path(args.out).write_text(json.dumps({"checkpoint": args.ckpt, "tile": args.tile, "device": "cpu",
                                          "torch": torch.__version__, "transformers": transformers.__version__,
                                          "command": " ".join(["benchmarks/tile_columns.py", *sys.argv[1:]]),
                                          "summary": summary, "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
