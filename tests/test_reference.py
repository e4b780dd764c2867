# SPDX-License-Identifier: Apache-2.0
"""Reference math: the GQSA matmul equals dense math on the dequantized weights."""

import pytest
import torch

from conftest import random_layer
from vllm_gqsa.format import LayerFormat
from vllm_gqsa.reference import dequantize, gqsa_linear


@pytest.mark.parametrize("fmt", [LayerFormat(4, 16, 1), LayerFormat(2, 32, 2), LayerFormat(8, 128, 1)],
                         ids=str)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_reference_equals_dense(fmt, M):
    N, K = 22 * fmt.block_rows, 5 * fmt.group_size
    layer = random_layer(N, K, fmt, density=0.6, empty_rows=[0], full_rows=[1])
    x = torch.randn(M, K)
    bias = torch.randn(N)
    w = dequantize(layer)
    torch.testing.assert_close(gqsa_linear(x, layer, bias), x @ w.T + bias)
    assert torch.all(gqsa_linear(x, layer)[:, :fmt.block_rows] == 0)  # the empty row block


def test_reference_keeps_activation_dtype():
    layer = random_layer(16, 64)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = gqsa_linear(x, layer)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 16)
