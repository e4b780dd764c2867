# SPDX-License-Identifier: Apache-2.0
"""Outlier-weighted sparsity per decoder block (OWL; Yin et al., 2023, arXiv 2310.05175).

Blocks whose weights hold more outliers lose more when pruned, so they keep more groups and other
blocks fewer, at the same mean sparsity. A weight's score is Wanda's ``|W_ij| * ||X_j||`` (the
norm of its input channel over the calibration tokens, from the dense model's own stream); a
block's outlier ratio is the fraction of its converted weights scoring above ``OUTLIER_THRESHOLD``
times the block's mean score.

After both training stages at S50% this gave SmolLM2-135M 3.0% and 3.4% lower perplexity (two
calibration seeds) and Gemma-3-270M 3.0% higher, so it is an option, off by default
(benchmarks/results/smollm2_sparsity_allocation_experiment.md).
"""

from __future__ import annotations

import torch

OUTLIER_THRESHOLD = 5.0  # OWL's M: a score this many times the block's mean is an outlier


def outlier_ratio(weights: list[torch.Tensor], input_sq_norms: list[torch.Tensor]) -> float:
    """The fraction of the weights ``[N, K]`` whose score exceeds ``OUTLIER_THRESHOLD`` times the
    mean score; ``input_sq_norms[i]`` ``[K]`` holds the sum of squares of each input channel of
    ``weights[i]`` over the calibration tokens."""
    scores = torch.cat([(w.abs() * s.sqrt()).flatten() for w, s in zip(weights, input_sq_norms)])
    return float((scores > OUTLIER_THRESHOLD * scores.mean()).float().mean())


def block_sparsities(ratios: list[float | None], sparsity: float, lam: float) -> list[float]:
    """Each block's sparsity: ``sparsity`` shifted down for blocks with more outliers and up for
    the others, so that the blocks' mean stays ``sparsity`` (OWL's rule: the ratios scaled to
    [0, 2 lam] and centred, so a shift is at most 2 lam). A block with nothing to convert
    (``None``) gets ``sparsity``."""
    known = [r for r in ratios if r is not None]
    if not known or max(known) == min(known):
        return [sparsity] * len(ratios)
    lo, hi = min(known), max(known)
    scaled = [(r - lo) / (hi - lo) * 2 * lam if r is not None else None for r in ratios]
    mean = sum(s for s in scaled if s is not None) / len(known)
    return [sparsity + mean - s if s is not None else sparsity for s in scaled]

