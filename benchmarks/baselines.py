# SPDX-License-Identifier: Apache-2.0
"""Accuracy baselines on the converter's own calibration pipeline: the same samples, the same
block-by-block, sub-layer-by-sub-layer order, and the same perplexity protocol as GQSA.

* ``gptq-w4g128``, ``gptq-w2g128``: GPTQ (asymmetric, min-max ranges, no act-order), i.e. the
  converter's solver with no pruning and no clipping search.
* ``sparsegpt-2:4``: SparseGPT's 2:4 pruning with OBS updates, fp16 weights.
* ``wanda-2:4``: Wanda's |W| * ||X|| score, 2 of every 4 pruned per row, no updates.
* ``awq-w4g128``: AWQ (Lin et al., 2024) as llm-awq runs it: per block, a grid search of
  activation-aware input-channel scales s = mean|x|^a for each group of layers that reads one
  input, folded into the op before it (RMSNorm weights; v_proj for o_proj when the shapes allow;
  up_proj for down_proj), then a per-group search of the clipping range, then round-to-nearest
  asymmetric 4-bit g128. Blocks see the full-precision model's activations, as in llm-awq. The
  searches use a random subset of the calibration tokens (``AWQ_SEARCH_TOKENS``, ``AWQ_CLIP_TOKENS``)
  to fit the CPU.

The weights are evaluated dense (the math, not a serving format); bits per weight are those of the
formats these methods ship in (GPTQ: 16-bit scale and packed zero per group; 2:4: 16-bit kept values
and 2-bit indices).

    python benchmarks/baselines.py MODEL --calib-data ../shared/data/wikitext-2/valid.txt \
        --text ../shared/data/wikitext-2/test.txt --max-windows 40 --out benchmarks/results/baselines.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from converters.calibration import calibration_samples  # noqa: E402
from converters.convert import (_block_inputs, _collect_hessians,  # noqa: E402
                                _module, _run_block, _to, peak_memory, sequential_groups)
from converters.perplexity import perplexity  # noqa: E402
from converters.solver import inverse_hessian_factor, solve_layer  # noqa: E402
from vllm_gqsa.format import LayerFormat  # noqa: E402

BITS_PER_WEIGHT = {"gptq-w4g128": 4 + 20 / 128, "gptq-w2g128": 2 + 18 / 128,
                   "sparsegpt-2:4": 9.0, "wanda-2:4": 9.0, "awq-w4g128": 4 + 20 / 128}
AWQ_GRID = 20  # scale exponents 0, 1/20, ..., 19/20 (llm-awq's n_grid)
AWQ_CLIP_GRID = 20  # clipping ratios 1, 0.975, ..., 0.525 (llm-awq: max_shrink 0.5, n_grid 20)
AWQ_SEARCH_TOKENS = 8192
AWQ_CLIP_TOKENS = 512  # llm-awq's n_sample_token


def sparsegpt_nm(weight, H, n=2, m=4, block=128):
    """SparseGPT (Frantar & Alistarh, 2023) with n:m masks chosen per m columns, no quantization."""
    W = weight.detach().float().clone()
    K = W.shape[1]
    U = inverse_hessian_factor(W, H.detach().float().clone())
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1, mask = torch.zeros_like(W1), torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                score = W1[:, i:i + m] ** 2 / torch.diag(U1)[i:i + m].reshape(1, -1) ** 2
                mask.scatter_(1, i + torch.topk(score, n, dim=1, largest=False).indices, True)
            w, d = W1[:, i], U1[i, i]
            q = torch.where(mask[:, i], torch.zeros_like(w), w)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


def wanda_nm(weight, H, n=2, m=4):
    """Wanda (Sun et al., 2023): prune the n of every m weights with the least |W| * ||X||."""
    W = weight.detach().float().clone()
    score = W.abs() * torch.diag(H).clamp(min=0).sqrt().unsqueeze(0)
    N, K = W.shape
    idx = torch.topk(score.reshape(N, K // m, m), n, dim=-1, largest=False).indices
    W.reshape(N, K // m, m).scatter_(-1, idx, 0.0)
    return W


def rtn_groups(W: torch.Tensor, bits: int = 4, group: int = 128, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest per group of ``group`` input columns (the last group may
    be partial); ``clip`` [N, groups] shrinks each group's range (AWQ's clipping)."""
    N, K = W.shape
    pad = -K % group
    Wg = torch.nn.functional.pad(W, (0, pad)).reshape(N, -1, group)
    hi, lo = Wg.amax(-1, keepdim=True).clamp(min=0), Wg.amin(-1, keepdim=True).clamp(max=0)
    if clip is not None:
        hi, lo = hi * clip.unsqueeze(-1), lo * clip.unsqueeze(-1)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(Wg / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(N, -1)[:, :K]


def awq_scale_groups(block):
    """(previous op, layers reading its output) per AWQ scaling group of a Llama/Qwen2 block."""
    if hasattr(block, "pre_feedforward_layernorm"):
        # Gemma: the MLP reads pre_feedforward_layernorm, not post_attention_layernorm, and its
        # norms multiply by (1 + w), so dividing w would not divide their output.
        raise ValueError(f"awq-w4g128 folds scales into Llama/Qwen2-style norms; {type(block).__name__} "
                         "normalizes differently and is not supported")
    attn, mlp = block.self_attn, block.mlp
    groups = [(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
              (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
              (mlp.up_proj, [mlp.down_proj])]
    if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:  # no grouped-query heads
        groups.insert(1, (attn.v_proj, [attn.o_proj]))
    return groups


def _fold_scale(prev, scales: torch.Tensor) -> None:
    """Divide the output of ``prev`` (a norm or a linear layer) by ``scales``."""
    prev.weight.data = prev.weight.data / (scales if prev.weight.dim() == 1 else scales.unsqueeze(1))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = prev.bias.data / scales


@torch.no_grad()
def awq_block(block, X: dict, gen: torch.Generator) -> None:
    """AWQ's scale search, scale folding and clip search for one block, in place; ``X`` maps each
    linear layer to its input activations [tokens, K]. Weights are quantized by the caller."""
    for prev, layers in awq_scale_groups(block):
        x = X[layers[0]]
        xs = x[torch.randperm(x.shape[0], generator=gen)[:AWQ_SEARCH_TOKENS]]
        x_mean = x.abs().mean(0)
        W = torch.cat([m.weight.data for m in layers])
        ref = xs @ W.T
        best, best_s = float("inf"), torch.ones_like(x_mean)
        for i in range(AWQ_GRID):
            s = x_mean.pow(i / AWQ_GRID).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = (ref - (xs / s) @ rtn_groups(W * s).T).pow(2).mean().item()
            if err < best:
                best, best_s = err, s
        _fold_scale(prev, best_s)
        for m in layers:
            m.weight.data = m.weight.data * best_s
            X[m] = X[m] / best_s
    attn = block.self_attn
    for m, x in X.items():
        if m in (attn.q_proj, attn.k_proj):  # llm-awq skips these: their error is hard to measure
            continue
        xs = x[torch.randperm(x.shape[0], generator=gen)[:AWQ_CLIP_TOKENS]]
        W = m.weight.data
        N, K = W.shape
        pad = -K % 128
        xg = torch.nn.functional.pad(xs, (0, pad)).reshape(xs.shape[0], -1, 128)  # [T, G, 128]
        Wg = torch.nn.functional.pad(W, (0, pad)).reshape(N, -1, 128)           # [N, G, 128]
        ref = torch.einsum("tgk,ngk->ngt", xg, Wg)
        best_err = torch.full(Wg.shape[:2], float("inf"))
        best_clip = torch.ones(Wg.shape[:2])
        for i in range(AWQ_CLIP_GRID):
            ratio = 1 - i / (2 * AWQ_CLIP_GRID)
            q = rtn_groups(W, clip=torch.full(Wg.shape[:2], ratio))
            qg = torch.nn.functional.pad(q, (0, pad)).reshape(N, -1, 128)
            err = (torch.einsum("tgk,ngk->ngt", xg, qg) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err[better], best_clip[better] = err[better], ratio
        m.gqsa_awq_clip = best_clip


@torch.no_grad()
def compress_awq(model, samples, device, batch_size=8) -> None:
    inputs, block_kwargs = _block_inputs(model, samples, device)
    block_kwargs = _to(block_kwargs, device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for b, block in enumerate(tqdm(model.model.layers, desc="awq-w4g128", unit="block")):
        block.to(device, torch.float32)
        kwargs = block_kwargs[b]
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        feats = {m: [] for m in linears}
        hooks = [m.register_forward_hook(lambda mod, args, _out: feats[mod].append(
            args[0].reshape(-1, args[0].shape[-1]))) for m in linears]
        try:
            outputs = _run_block(block, inputs, kwargs, batch_size)  # full precision, as llm-awq
        finally:
            for h in hooks:
                h.remove()
        awq_block(block, {m: torch.cat(v) for m, v in feats.items()}, gen)
        for m in linears:
            m.weight.data = rtn_groups(m.weight.data, clip=getattr(m, "gqsa_awq_clip", None))
            if hasattr(m, "gqsa_awq_clip"):
                del m.gqsa_awq_clip
        inputs = outputs
        block.to("cpu")


def solve(method, weight, H):
    if method.startswith("gptq"):
        bits = int(method.split("-w")[1].split("g")[0])
        # GPTQ's last group may be partial (SmolLM2's 576 inputs are 4.5 groups of 128). Padding
        # with zero weights that see zero input is the same thing: the solver's ranges always
        # contain 0, and a column with no input is left untouched by the updates.
        K = weight.shape[1]
        pad = (-K) % 128
        W = torch.nn.functional.pad(weight.detach().float(), (0, pad))
        Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
        return solve_layer(W, Hp, LayerFormat(bits, 128, 1), 0.0, clip_search=False).weight[:, :K]
    if method == "sparsegpt-2:4":
        return sparsegpt_nm(weight, H)
    if method == "wanda-2:4":
        return wanda_nm(weight, H)
    raise ValueError(method)


@torch.no_grad()
def compress(model, samples, method, device, batch_size=8):
    inputs, block_kwargs = _block_inputs(model, samples, device)
    block_kwargs = _to(block_kwargs, device, torch.float32)
    blocks = model.model.layers
    for b in tqdm(range(len(blocks)), desc=method, unit="block"):
        block, kwargs = blocks[b].to(device, torch.float32), block_kwargs[b]
        for group in sequential_groups(block):  # true sequential, as the converter
            (H,) = _collect_hessians(block, [list(group)], inputs, kwargs, batch_size)
            for n in group:
                m = _module(block, n)
                m.weight.data = solve(method, m.weight, H).to(m.weight.dtype)
        inputs = _run_block(block, inputs, kwargs, batch_size)
        blocks[b] = block.to("cpu")


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The calibration and evaluation options every baseline run shares, so that runs compared in
    one table (here and in llmcompressor_check.py) use the same tokens and windows."""
    p.add_argument("--calib-data", required=True)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--text", required=True)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--methods", default="gptq-w4g128,gptq-w2g128,awq-w4g128,sparsegpt-2:4,wanda-2:4")
    add_protocol_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--no-eval", action="store_true",
                   help="compress only: record the time and peak memory, not the perplexity")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    results = {"command": " ".join(sys.argv), "model": os.path.abspath(a.model), "torch": torch.__version__,
               "device": a.device, "calibration": {"data": a.calib_data, "n_samples": a.n_samples,
                                                   "seq_len": a.seq_len, "seed": 0}, "methods": {}}
    for method in a.methods.split(","):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        samples = calibration_samples(tok, a.calib_data, a.n_samples, a.seq_len, 0)
        t0 = time.time()
        if method == "awq-w4g128":
            compress_awq(model, samples, torch.device(a.device))
        else:
            compress(model, samples, method, torch.device(a.device))
        seconds = time.time() - t0
        # The process's peak so far: a method's own peak when it is the first (or only) one run.
        peak = peak_memory(torch.device(a.device))
        r = {} if a.no_eval else perplexity(model.to(a.device), tok, text, a.eval_seq_len, a.max_windows,
                                            a.device, desc=method)
        r.update({"seconds": round(seconds, 1), "peak_memory": peak,
                  "bits_per_weight": BITS_PER_WEIGHT[method]})
        print(method, json.dumps(r), flush=True)
        results["methods"][method] = r
        if os.path.exists(a.out):  # add to an earlier run's methods instead of dropping them
            with open(a.out) as f:
                earlier = json.load(f)
            results["methods"] = {**earlier.get("methods", {}), **results["methods"]}
            results.setdefault("commands", earlier.get("commands", [earlier.get("command")]))
            for key, value in earlier.items():  # notes added to the file by hand (machine, memory)
                results.setdefault(key, value)
            if results["command"] not in results["commands"]:
                results["commands"].append(results["command"])
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
