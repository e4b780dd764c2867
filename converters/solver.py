# SPDX-License-Identifier: Apache-2.0
"""Second-order pruning and quantization of one linear layer into GQSA groups.

This is SparseGPT's joint prune-and-quantize (Frantar & Alistarh, 2023) at the
granularity of GQSA groups:

* Columns are processed left to right in blocks of ``BLOCK_COLS``. At the start of
  a block, each group (G consecutive input channels of one row block) gets the
  optimal-brain-surgeon saliency of removing it as a whole,
  ``w_g^T [(H_rem^-1)_gg]^-1 w_g``, where ``H_rem^-1`` is the inverse Hessian of the
  columns not processed yet. The ``sparsity`` fraction of groups with the lowest
  saliency in the block is pruned. Rows therefore keep different numbers of
  groups, which the task-centric kernels balance.
* With the ``pairs`` pattern, each row block instead keeps the more salient group
  of every aligned pair of group columns (2j, 2j + 1): exactly half the groups, one
  per pair, which the sparse tensor cores run as 2:4 sparsity once the pair's
  channels are interleaved (``vllm_gqsa.format.is_pair_pattern``). A pair is chosen
  when its first column is reached, as SparseGPT chooses its N:M groups, from the
  weights as the errors of the columns before it left them. On SmolLM2-135M that gave
  perplexity 578 one shot where choosing at the start of the block gave 814; after the
  training stages 69.7 against 66.8, which one conversion of each cannot tell apart
  (benchmarks/results/smollm2_pair_pattern.md).
* Every column is then quantized (kept groups) or zeroed (pruned groups) and the
  error is spread over the columns not processed yet, as GPTQ does.
* A kept group's scale and zero point come from its weights at the moment its
  first column is reached, with a small grid search over clipping ranges.

``H = 2 X^T X / n`` is accumulated from the layer's calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_gqsa.format import PATTERNS, GQSAFormatError, GQSALayer, LayerFormat, SCALE_DTYPE, pack_layer

BLOCK_COLS = 128  # columns per lazy-update block, as GPTQ; rounded to a multiple of G (2G for pairs)
DAMPING = 0.01  # fraction of the mean Hessian diagonal added for stability
CLIP_GRID = torch.linspace(1.0, 0.80, 11).tolist()  # shrink factors tried for each group's range


def group_params(w: torch.Tensor, bits: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and zero point for each row of ``w`` [rows, G].

    Returns fp16-representable scales and integer zero points, both ``[rows]``. With
    ``search``, the range is shrunk by the factor in ``CLIP_GRID`` that gives the
    least squared error (clipping a few outliers often pays off at 4 bits; the first
    factor wins a tie). All factors are tried in one batch, a ninth of the operations
    of a loop over them: on a GPU each of the solver's small operations is a kernel
    launch.
    """
    maxq = (1 << bits) - 1
    # The integer zero point must lie in [0, maxq], so the range must contain 0.
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    shrink = torch.tensor(CLIP_GRID if search else [1.0], dtype=w.dtype, device=w.device).unsqueeze(1)
    l, h = lo * shrink, hi * shrink  # [factors, rows]
    s = ((h - l) / maxq).to(SCALE_DTYPE).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale is exact
    z = torch.round(-l / s).clamp(0, maxq)
    q = torch.clamp(torch.round(w / s.unsqueeze(2)) + z.unsqueeze(2), 0, maxq)
    err = ((s.unsqueeze(2) * (q - z.unsqueeze(2)) - w) ** 2).sum(2)
    best = err.argmin(0, keepdim=True)  # the first of equal minima, as the factors' order gives
    return s.gather(0, best)[0], z.gather(0, best)[0]


@dataclass
class SolveResult:
    layer: GQSALayer
    weight: torch.Tensor  # the dequantized weight, float32 [N, K]; equals reference.dequantize(layer)
    loss: float  # the quantization-pruning objective sum((W - Wq) H (W - Wq)^T)/N, for progress
    # The weights as they were rounded, after GPTQ's error compensation, float32 [N, K]: the
    # codes are clamp(round(latent / s) + z). Training (BQPO) starts from them, so it starts
    # from this result with the rounding residuals that give the scales their gradient.
    latent: torch.Tensor | None = None


def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Running mean of ``2 x^T x`` over calibration tokens (GPTQ's H)."""
    x = x.reshape(-1, x.shape[-1]).float()
    n = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
    H.mul_(count / (count + n))
    x = x * (2.0 / (count + n)) ** 0.5
    H.addmm_(x.T, x)
    return H, count + n


def check_pattern(pattern: str, sparsity: float, fmt: LayerFormat, in_features: int) -> None:
    """Refuse a pruning pattern that this layer or sparsity cannot have."""
    if pattern not in PATTERNS:
        raise GQSAFormatError(f"pattern={pattern!r} is not supported; choose one of {PATTERNS}")
    if pattern == "pairs":
        if sparsity != 0.5:
            raise GQSAFormatError(f"pattern 'pairs' prunes one group of every two: sparsity must be 0.5, "
                                  f"got {sparsity}")
        if in_features % (2 * fmt.group_size):
            raise GQSAFormatError(f"pattern 'pairs': input size {in_features} is not a multiple of "
                                  f"2 * group_size = {2 * fmt.group_size}")


def group_saliency(W1: torch.Tensor, U1: torch.Tensor, start: int, c0: int, G: int) -> torch.Tensor:
    """Saliency ``w_g^T [(H_rem^-1)_gg]^-1 w_g`` of the group at columns ``c0 .. c0+G-1`` of the
    column block ``W1`` (``U1`` its part of U), every row; ``H_rem`` is the Hessian of the columns
    from ``start`` on."""
    Ug = U1[start:c0 + G, c0:c0 + G]  # U is upper triangular: rows past the group are zero here
    M = torch.linalg.inv(Ug.T @ Ug)
    wg = W1[:, c0:c0 + G]
    return torch.einsum("ng,gh,nh->n", wg, M, wg)


def keep_one_of_each_pair(saliency: torch.Tensor) -> torch.Tensor:
    """The kept groups of the ``pairs`` pattern: for ``saliency`` [rows, 2P], the more salient
    group of each pair of columns (2j, 2j + 1), the even one on a tie. Bool [rows, 2P]."""
    s = saliency.reshape(saliency.shape[0], -1, 2)
    odd = s[..., 1] > s[..., 0]
    return torch.stack([~odd, odd], dim=2).reshape(saliency.shape)


def inverse_hessian_factor(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1, as GPTQ and SparseGPT use it: row i of U gives the update
    for column i, and U[i1:, i1:]^T U[i1:, i1:] is the inverse Hessian of the columns from i1 on.

    Prepares W and H in place first: inputs that never fire are zeroed in W (and get a unit
    diagonal in H), and H is damped by ``DAMPING`` times its mean diagonal."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += DAMPING * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def solve_layer(weight: torch.Tensor, H: torch.Tensor, fmt: LayerFormat, sparsity: float,
                clip_search: bool = True, pattern: str = "groups") -> SolveResult:
    """Prune a ``sparsity`` fraction of the groups of ``weight`` [N, K] and quantize the rest;
    ``pattern`` ``"pairs"`` prunes one group of each aligned pair (``sparsity`` 0.5)."""
    G, R, bits = fmt.group_size, fmt.block_rows, fmt.bits
    maxq = (1 << bits) - 1
    W = weight.detach().float().clone()
    N, K = W.shape
    fmt.check_shape(N, K)
    check_pattern(pattern, sparsity, fmt, K)
    NB, KG = N // R, K // G
    H = H.detach().float().clone()
    W0 = W.clone()

    U = inverse_hessian_factor(W, H)

    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(N, KG, device=W.device)
    zeros = torch.zeros(N, KG, device=W.device)
    keep = torch.ones(NB, KG, dtype=torch.bool, device=W.device)
    Wq = torch.zeros_like(W)
    latent = torch.zeros_like(W)
    zero = torch.zeros(N, device=W.device)
    # A pair's two groups must be in the same block, where its columns' updates are known.
    unit = 2 * G if pattern == "pairs" else G
    block = max(unit, BLOCK_COLS // unit * unit)

    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        ng = (i2 - i1) // G
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)

        if sparsity > 0 and pattern == "groups":
            saliency = torch.empty(N, ng, device=W.device)
            for g in range(ng):
                saliency[:, g] = group_saliency(W1, U1, 0, g * G, G)
            saliency = saliency.reshape(NB, R, ng).sum(1)
            n_prune = int(round(sparsity * NB * ng))
            if n_prune:
                pruned = torch.topk(saliency.flatten(), n_prune, largest=False).indices
                block_keep = torch.ones(NB * ng, dtype=torch.bool, device=W.device)
                block_keep[pruned] = False
                keep[:, i1 // G:i2 // G] = block_keep.reshape(NB, ng)
        keep_rows = keep[:, i1 // G:i2 // G].repeat_interleave(R, 0)  # [N, ng]

        for i in range(i2 - i1):
            g = i // G
            if pattern == "pairs" and i % (2 * G) == 0:
                saliency = torch.stack([group_saliency(W1, U1, i, c0, G) for c0 in (i, i + G)], 1)
                pair_keep = keep_one_of_each_pair(saliency.reshape(NB, R, 2).sum(1))
                keep[:, i1 // G + g:i1 // G + g + 2] = pair_keep
                keep_rows[:, g:g + 2] = pair_keep.repeat_interleave(R, 0)
            if i % G == 0:
                s, z = group_params(W1[:, i:i + G], bits, clip_search)
                scales[:, i1 // G + g], zeros[:, i1 // G + g] = s, z
            # Small operations, each a kernel launch on a GPU, where launches rather than arithmetic
            # are the likely cost: results are written where they are kept, not copied there.
            w, d = W1[:, i], U1[i, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            deq = torch.where(keep_rows[:, g], s * (q - z), zero)
            codes[:, i1 + i].copy_(q)  # integers in [0, maxq]: exact in uint8
            latent[:, i1 + i] = w
            Q1[:, i] = deq
            err = torch.div(w - deq, d, out=Err1[:, i])
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Wq[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    layer = pack_layer(codes.cpu(), scales.cpu(), zeros.cpu().to(torch.uint8), keep.cpu(), fmt)
    delta = W0 - Wq
    loss = float(torch.einsum("nk,kl,nl->", delta, H, delta) / N)
    return SolveResult(layer=layer, weight=Wq, loss=loss, latent=latent)


def rtn_layer(weight: torch.Tensor, fmt: LayerFormat, sparsity: float = 0.0,
              pattern: str = "groups") -> GQSALayer:
    """Round-to-nearest GQSA with magnitude pruning: no calibration. For tests and quick checks."""
    G, R, bits = fmt.group_size, fmt.block_rows, fmt.bits
    W = weight.detach().float()
    N, K = W.shape
    fmt.check_shape(N, K)
    check_pattern(pattern, sparsity, fmt, K)
    NB, KG = N // R, K // G
    norms = W.reshape(NB, R, KG, G).pow(2).sum((1, 3))  # [NB, KG]
    keep = torch.ones(NB, KG, dtype=torch.bool)
    n_prune = int(round(sparsity * NB * KG))
    if pattern == "pairs":
        keep = keep_one_of_each_pair(norms)
    elif n_prune:
        keep.view(-1)[torch.topk(norms.flatten(), n_prune, largest=False).indices] = False
    s, z = group_params(W.reshape(-1, G), bits, search=False)
    q = torch.clamp(torch.round(W.reshape(-1, G) / s[:, None]) + z[:, None], 0, (1 << bits) - 1)
    return pack_layer(q.reshape(N, K).to(torch.uint8), s.reshape(N, KG), z.reshape(N, KG).to(torch.uint8),
                      keep, fmt)
