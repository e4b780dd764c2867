# SPDX-License-Identifier: Apache-2.0
"""2:4 semi-structured sparsity in fp16/bf16, registered with vLLM as ``sparse24``: the baseline
GQSA's speed is compared against, served by the same engine (vLLM 0.26 has no 2:4 method of its own).

A checkpoint (or a ``--load-format dummy`` model) whose ``quantization_config`` is
``{"quant_method": "sparse24"}`` loads its linear layers as ordinary dense weights through vLLM's
own loaders, tensor parallelism included. After loading, every run of 4 consecutive input weights
keeps its 2 largest magnitudes (a checkpoint already pruned 2:4, by SparseGPT or Wanda, keeps its
pattern). On a CUDA GPU the result is compressed for cuSPARSELt (``torch._cslt_compress``, the
kernel behind PyTorch's ``to_sparse_semi_structured`` on Hopper) and multiplied by
``torch._cslt_sparse_mm`` inside a custom op, so torch.compile and CUDA graphs see one opaque call.
Elsewhere, or for shapes cuSPARSELt refuses, the pruned weight stays dense.

PyTorch builds a new cuSPARSELt plan on every ``_cslt_sparse_mm`` call, host work that costs
tens of milliseconds per call on an H200 (judged from vLLM's start-up times there; not timed one
call at a time). In vLLM this backend is slow: about a minute to capture each CUDA-graph size, and
7.3 tokens/s (137 ms per token) at batch 1 on an H200 with graphs captured, where its kernels
replayed in a graph take about 7 ms per token for the linear layers
(``benchmarks/results/gpu/e2e_llama2-7b_h200_sparse24.json``; where the rest of the time goes was
not profiled). Compare 2:4 at the kernel level (``benchmarks/kernels.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .ops import register_op

logger = logging.getLogger("vllm.gqsa")

QUANT_METHOD = "sparse24"
# cuSPARSELt's fp16/bf16 limits (torch.sparse.SparseSemiStructuredTensorCUSPARSELT): the sparse
# operand's rows and columns are multiples of 16, the dense operand's multiples of 8.
SPARSE_MULTIPLE = 16
DENSE_ROW_MULTIPLE = 8


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` with the 2 smallest magnitudes of every 4 consecutive columns set to zero."""
    if w.dim() != 2 or w.shape[1] % 4:
        raise ValueError(f"2:4 sparsity needs a 2-D weight with a multiple of 4 columns, got {tuple(w.shape)}")
    g = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape_as(w)


def sparse24_mm(x: torch.Tensor, packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` for W compressed by ``torch._cslt_compress``."""
    M = x.shape[0]
    pad = -M % DENSE_ROW_MULTIPLE
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    # (W @ x.T).T in one call: transpose_result hands back [M, N] directly.
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
    return y[:M] if pad else y


def _sparse24_mm_fake(x, packed, n_out):
    return x.new_empty((x.shape[0], n_out))


register_op("sparse24_mm", sparse24_mm, _sparse24_mm_fake)


@register_quantization_config(QUANT_METHOD)
class Sparse24Config(QuantizationConfig):
    """``{"quant_method": "sparse24"}``: every linear layer 2:4-pruned at load."""

    def __repr__(self) -> str:
        return "Sparse24Config()"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Sparse24Config":
        return cls()

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        if str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD:
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        return Sparse24LinearMethod() if isinstance(layer, LinearBase) else None


class Sparse24LinearMethod(UnquantizedLinearMethod):
    """Dense weights at load (vLLM's loaders and sharding), 2:4-pruned and compressed after."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = prune_2_4(layer.weight.data)
        n, k = w.shape
        reason = None
        if not w.is_cuda:
            reason = "not on a CUDA device"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            reason = f"{w.dtype} activations"
        elif n % SPARSE_MULTIPLE or k % SPARSE_MULTIPLE:
            reason = f"shape {n}x{k} is not a multiple of {SPARSE_MULTIPLE}"
        if reason is None:
            layer.sparse24_packed = Parameter(torch._cslt_compress(w.contiguous()), requires_grad=False)
            layer.sparse24_n_out = n
            del layer.weight  # the compressed copy holds everything
        else:
            layer.weight.data = w
            logger.info("sparse24: %dx%d layer kept as a pruned dense weight (%s)", n, k, reason)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not hasattr(layer, "sparse24_packed"):
            return torch.nn.functional.linear(x, layer.weight, bias)
        y = torch.ops.vllm_gqsa.sparse24_mm(x.reshape(-1, x.shape[-1]), layer.sparse24_packed,
                                            layer.sparse24_n_out)
        y = y.reshape(*x.shape[:-1], layer.sparse24_n_out)
        return y if bias is None else y + bias
