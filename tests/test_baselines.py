# SPDX-License-Identifier: Apache-2.0
"""The accuracy baselines prune what they claim to prune."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from baselines import sparsegpt_nm, wanda_nm  # noqa: E402
from converters.solver import accumulate_hessian  # noqa: E402


@pytest.mark.parametrize("prune", [sparsegpt_nm, wanda_nm])
def test_two_of_every_four_are_zero(prune):
    X = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    H, _ = accumulate_hessian(None, X, 0)
    W = torch.randn(32, 64)
    Wp = prune(W, H)
    zeros = (Wp.reshape(32, 16, 4) == 0).sum(-1)
    assert torch.all(zeros >= 2)


def test_sparsegpt_beats_wanda_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    H, _ = accumulate_hessian(None, X, 0)
    W = torch.randn(32, 64, generator=g)
    err = lambda Wp: float(((X @ (W - Wp).T) ** 2).sum())  # noqa: E731
    assert err(sparsegpt_nm(W, H)) < err(wanda_nm(W, H))
