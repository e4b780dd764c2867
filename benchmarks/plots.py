# SPDX-License-Identifier: Apache-2.0
"""Plots of the speed results (matplotlib PNGs), drawn only from the JSON files the benchmarks wrote.

    python benchmarks/plots.py [--results benchmarks/results/gpu] [--out benchmarks/results/plots]

- ``e2e_<shape>.json`` (benchmarks/e2e.py): output tokens/s against batch size, one line per
  configuration; time to first token against prompt length where the file has it. A file named
  ``<that name>_<more>.json`` from the same device and shape is a later run of more configurations:
  they join its plots as dashed lines, labelled with what their file name adds ("_awq"), one
  colour per configuration.
- one ``kernels_*.json`` (benchmarks/kernel_speed.py; ``--kernels``, default the H200 run): one decoder
  layer's GQSA time against each baseline's, as a speed-up, against the number of tokens M. GQSA's
  time at each M is its fastest kernel measured there (GEMV, tensor cores or dequantize + cuBLAS):
  the plugin's dispatch defaults are these crossovers, whatever the run itself dispatched.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _batches(cfg: dict) -> list[tuple[int, float]]:
    pts = [(int(k[5:]), v["output_tokens_per_s"]) for k, v in cfg.items()
           if k.startswith("batch") and isinstance(v, dict) and "output_tokens_per_s" in v]
    return sorted(pts)


def _lines(r: dict, extra: list[tuple[str, dict]]) -> list[tuple[str, str, dict, str]]:
    """(configuration, label, its results, line style) for a run and the separate runs added to it,
    each separate run's lines labelled with what its file name adds to the run's ("_awq")."""
    lines = [(c, c, cfg, "-") for c, cfg in r["configs"].items()]
    return lines + [(c, f"{c} ({tag})", cfg, "--") for tag, e in extra for c, cfg in e["configs"].items()]


def plot_e2e(path: str, out_dir: str, extra_paths: list[str] = ()) -> list[str]:
    r = json.load(open(path))
    name = os.path.splitext(os.path.basename(path))[0]
    extra = [(os.path.splitext(os.path.basename(p))[0][len(name):], json.load(open(p))) for p in extra_paths]
    colors: dict = {}  # one colour per configuration, whichever run it comes from

    def color(config: str) -> str:
        return colors.setdefault(config, f"C{len(colors) % 10}")

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, label, cfg, style in _lines(r, extra):
        pts = _batches(cfg)
        if len(pts) > 1 or (pts and style == "-"):  # a separate run's single point only clutters
            ax.plot(*zip(*pts), style, marker="o", label=label, color=color(config))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{r['shape']}, {r['device']}, vLLM {r['vllm']}\n"
                 f"prompt {r['prompt_len']}, {r['gen_len']} generated", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    written.append(os.path.join(out_dir, f"{name}_throughput.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    ttft = [(config, label, cfg["ttft"], style) for config, label, cfg, style in _lines(r, extra)
            if isinstance(cfg.get("ttft"), dict)]
    if ttft:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for config, label, t, style in ttft:
            pts = sorted((int(k), v["ttft_ms"]) for k, v in t.items())
            ax.plot(*zip(*pts), style, marker="o", label=label, color=color(config))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title(f"{r['shape']}, {r['device']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"{name}_ttft.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_kernels(paths: list[str], out_dir: str) -> list[str]:
    rows = [s for p in paths for s in json.load(open(p)).get("summary", [])]
    if not rows:
        return []
    device = json.load(open(paths[0]))["device"]
    baselines = sorted({k[len("speedup_vs_"):] for r in rows for k in r if k.startswith("speedup_vs_")})
    paths_us = ("gqsa_gemv_us", "gqsa_tc_us", "gqsa_dequant_cublas_us")

    def gqsa_us(r: dict) -> float:
        return min([r[k] for k in paths_us if r.get(k)] or [r["gqsa_us"]])

    fig, axes = plt.subplots(1, len(baselines), figsize=(5 * len(baselines), 4), squeeze=False)
    for ax, base in zip(axes[0], baselines):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["M"], r[f"{base}_us"] / gqsa_us(r)) for r in rows
                         if r["model"] == model and f"{base}_us" in r)
            ax.plot(*zip(*pts), marker="o", label=model)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel(f"speed-up over {base}")
        ax.set_title(f"GQSA W4 S50% g16, one decoder layer\n{device}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "kernels_speedup.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="benchmarks/results/gpu")
    p.add_argument("--out", default="benchmarks/results/plots")
    p.add_argument("--kernels", default="kernels_h200_448d7b1.json",
                   help="the kernel benchmark (in --results) whose summary is plotted")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    written = []
    e2e = {p: json.load(open(p)) for p in sorted(glob.glob(os.path.join(a.results, "e2e_*.json")))}

    def addendum_of(p: str, q: str) -> bool:  # is p a separate run that belongs to q's plots?
        same = all(e2e[p].get(k) == e2e[q].get(k) for k in ("device", "shape", "prompt_len", "gen_len"))
        return p != q and same and os.path.basename(p).startswith(os.path.basename(q)[:-len(".json")] + "_")

    for q in e2e:
        if not any(addendum_of(q, other) for other in e2e):
            written += plot_e2e(q, a.out, [p for p in e2e if addendum_of(p, q)])
    written += plot_kernels([os.path.join(a.results, a.kernels)], a.out)
    for w in written:
        print("wrote", w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
