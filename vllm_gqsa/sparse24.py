# SPDX-License-Identifier: Apache-2.0
"""2:4 semi-structured sparsity in fp16/bf16, registered with vLLM as ``sparse24``: the baseline
GQSA's speed is compared against, served by the same engine (vLLM 0.26 has no 2:4 method of its own).

A checkpoint (or a ``--load-format dummy`` model) whose ``quantization_config`` is
``{"quant_method": "sparse24"}`` loads its linear layers as ordinary dense weights through vLLM's
own loaders, tensor parallelism included. After loading, every run of 4 consecutive input weights
keeps its 2 largest magnitudes (a checkpoint already pruned 2:4, by SparseGPT or Wanda, keeps its
pattern). On a CUDA GPU the result is compressed for one of PyTorch's two 2:4 kernels and
multiplied inside a custom op, so torch.compile and CUDA graphs see one opaque call. Elsewhere, or
for shapes the kernel refuses, the pruned weight stays dense. ``VLLM_GQSA_SPARSE24_BACKEND`` picks
the kernel; the default, ``auto``, takes CUTLASS on Ampere (compute capability 8.x) and
cuSPARSELt elsewhere:

- ``cutlass``: ``torch._sparse_semi_structured_mm``, PyTorch's CUTLASS 2:4 GEMM, with nothing to
  plan per call. PyTorch builds it for compute capability 8.x only: on an H200 it raises
  "Supported only on GPUs with compute capability 8.x"
  (``benchmarks/results/gpu/kernels_h200.json``, ``sparse24_cutlass_fp16_error``).
- ``cusparselt``: ``torch._cslt_sparse_mm``, which builds a new cuSPARSELt plan on every call (0.8 to 2
  ms of host time: hidden when a CUDA graph replays it, paid on every call outside one). Its
  ``transpose_result=True`` option is avoided: on an H200 at one token it took 165 to 290 ms of host
  time per call and 74 to 345 us per Llama-2-7B shape in a CUDA graph, against 33 to 76 us for the
  plain call (``benchmarks/results/gpu/sparse24_diag2.json``; the op adds a copy of the M x N result).
  End to end it decoded 7.3 tokens/s at batch 1 with it and 118.5 without it
  (``benchmarks/results/gpu/e2e_llama2-7b_h200_sparse24_fixed.json``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .ops import register_op

logger = logging.getLogger("vllm.gqsa")

QUANT_METHOD = "sparse24"
BACKENDS = ("auto", "cutlass", "cusparselt")
# fp16/bf16 shape limits (torch.sparse.SparseSemiStructuredTensorCUTLASS / ...CUSPARSELT): the
# sparse operand's rows and columns are multiples of these, the dense operand's of 8.
SPARSE_MULTIPLES = {"cutlass": (32, 64), "cusparselt": (16, 16)}
DENSE_ROW_MULTIPLE = 8


def backend(device: torch.device | None = None) -> str:
    """The 2:4 kernel for weights on ``device``: ``cutlass`` or ``cusparselt``."""
    name = os.environ.get("VLLM_GQSA_SPARSE24_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"VLLM_GQSA_SPARSE24_BACKEND={name!r}: expected one of {BACKENDS}")
    if name == "auto":
        ampere = device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 8
        name = "cutlass" if ampere else "cusparselt"
    return name


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` with the 2 smallest magnitudes of every 4 consecutive columns set to zero."""
    if w.dim() != 2 or w.shape[1] % 4:
        raise ValueError(f"2:4 sparsity needs a 2-D weight with a multiple of 4 columns, got {tuple(w.shape)}")
    g = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape_as(w)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` padded with zero rows to the multiple of 8 both 2:4 kernels need."""
    pad = -x.shape[0] % DENSE_ROW_MULTIPLE
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _x_times_w_t(w_times: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` from a kernel that computes ``W @ b``: b is the padded x transposed, and the
    ``[N, M]`` result is copied back to ``[M, N]`` (the fakes' contiguous layout, which
    torch.compile relies on)."""
    return w_times(pad_rows(x).t()).t()[:x.shape[0]].contiguous()


def sparse24_mm(x: torch.Tensor, packed: torch.Tensor, n_out: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` for W compressed by ``torch._cslt_compress``."""
    # Not transpose_result=True: far slower on Hopper (see the module docstring).
    return _x_times_w_t(lambda b: torch._cslt_sparse_mm(packed, b), x)


def sparse24_cutlass_mm(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ W.T`` for W compressed by ``compress_cutlass``."""
    return _x_times_w_t(lambda b: torch._sparse_semi_structured_mm(packed, meta, b), x)


def compress_cutlass(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4-pruned ``w [N, K]`` as the CUTLASS kernel's kept values ``[N, K/2]`` and metadata."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(w.contiguous())


def _sparse24_mm_fake(x, packed, n_out):
    return x.new_empty((x.shape[0], n_out))


def _sparse24_cutlass_mm_fake(x, packed, meta):
    return x.new_empty((x.shape[0], packed.shape[0]))


register_op("sparse24_mm", sparse24_mm, _sparse24_mm_fake)
register_op("sparse24_cutlass_mm", sparse24_cutlass_mm, _sparse24_cutlass_mm_fake)


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
        kernel = backend(w.device)
        rows, cols = SPARSE_MULTIPLES[kernel]
        reason = None
        if not w.is_cuda:
            reason = "not on a CUDA device"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            reason = f"{w.dtype} activations"
        elif n % rows or k % cols:
            reason = f"shape {n}x{k} is not a multiple of {rows}x{cols} ({kernel})"
        if reason is not None:
            layer.weight.data = w
            logger.info("sparse24: %dx%d layer kept as a pruned dense weight (%s)", n, k, reason)
            return
        if kernel == "cutlass":
            packed, meta = compress_cutlass(w)
            layer.sparse24_meta = Parameter(meta, requires_grad=False)
        else:
            packed = torch._cslt_compress(w.contiguous())
        layer.sparse24_packed = Parameter(packed, requires_grad=False)
        layer.sparse24_n_out = n
        del layer.weight  # the compressed copy holds everything

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not hasattr(layer, "sparse24_packed"):
            return torch.nn.functional.linear(x, layer.weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if hasattr(layer, "sparse24_meta"):
            y = torch.ops.vllm_gqsa.sparse24_cutlass_mm(x2, layer.sparse24_packed, layer.sparse24_meta)
        else:
            y = torch.ops.vllm_gqsa.sparse24_mm(x2, layer.sparse24_packed, layer.sparse24_n_out)
        y = y.reshape(*x.shape[:-1], layer.sparse24_n_out)
        return y if bias is None else y + bias
