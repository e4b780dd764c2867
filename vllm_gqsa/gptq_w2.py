# SPDX-License-Identifier: Apache-2.0
"""2-bit GPTQ served by vLLM's own ExLlama kernel, registered with vLLM as ``gptq_w2``: the W2
baseline GQSA's speed is compared against (the paper's W2 comparison), in the same engine.

vLLM 0.26 ships the ExLlama GPTQ GEMM (``torch.ops._C.gptq_gemm``) with 2-, 3-, 4- and 8-bit
paths, but its GPTQ method only routes 4 and 8 bits to a kernel: a 2-bit checkpoint fails with
"Unsupported quantization config: bits=2". This method takes those checkpoints (or
``{"quant_method": "gptq_w2", ...}``) and calls the kernel's 2-bit path directly:

- Format: AutoGPTQ's (``checkpoint_format`` "gptq", v1): per linear layer ``qweight`` int32
  ``[K/16, N]`` (16 codes of 2 bits per word along K, lowest bits first), ``qzeros`` int32
  ``[K/g, N/16]`` (packed along N, each stored as zero - 1), ``scales`` fp16 ``[K/g, N]`` and
  ``g_idx``; weight ``(q - (stored zero + 1)) * scale``, as the kernel computes it.
- Kernel: ``gptq_gemm(..., use_exllama=True, bit=2)`` after ``gptq_shuffle``, as vLLM's
  ``ExllamaLinearKernel`` does for 4 bits: the ExLlama GEMV-style kernel up to 50 tokens, above
  that the weight reconstructed to fp16 and cuBLAS. fp16 activations only.
- Not served: act-order (``desc_act``), channel-wise (``group_size`` -1), quantized ``lm_head``
  and per-module ``dynamic`` checkpoints. A ``desc_act: false`` checkpoint's ``g_idx`` is k // g
  by construction; it is loaded and ignored.

Elsewhere (the CPU, fp32 activations, or no vLLM CUDA ops) the layer multiplies by
``dequantize``'s weight, rebuilt on every call: the same math in plain torch, correct but not fast,
so that loading and sharding can be checked without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import (pack_quantized_values_into_int32,
                                                                       unpack_quantized_values_into_int32)
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter, RowvLLMParameter
from vllm.scalar_type import scalar_types

QUANT_METHOD = "gptq_w2"
BITS = 2
PACK = 32 // BITS  # codes per int32 word
WEIGHT_TYPE = scalar_types.uint2b2  # only its width matters to vLLM's pack helpers
GPTQ_METHODS = ("gptq", "auto_gptq", "gptq_marlin", QUANT_METHOD)


def pack(fields: torch.Tensor, dim: int) -> torch.Tensor:
    """Integer fields in [0, 4) packed 16 to an int32 along ``dim``, lowest bits first."""
    if fields.min() < 0 or fields.max() >= 2**BITS:
        raise ValueError(f"2-bit fields must lie in [0, {2**BITS}), got [{int(fields.min())}, {int(fields.max())}]")
    return pack_quantized_values_into_int32(fields.to(torch.int32), WEIGHT_TYPE, dim).contiguous()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``[N, K]`` weight of a GPTQ v1 2-bit layer, in ``scales``' dtype."""
    q = unpack_quantized_values_into_int32(qweight, WEIGHT_TYPE, 0)
    zeros = unpack_quantized_values_into_int32(qzeros, WEIGHT_TYPE, 1) + 1  # v1 stores zero - 1; the kernel adds 1
    w = (q - zeros.repeat_interleave(group_size, 0)).to(scales.dtype) * scales.repeat_interleave(group_size, 0)
    return w.T


def exllama_available() -> bool:
    """Whether vLLM's CUDA ops, with the ExLlama GPTQ GEMM, are loaded."""
    try:
        from vllm import _custom_ops  # noqa: F401  (loads vLLM's _C library)
    except ImportError:
        return False
    return hasattr(torch.ops._C, "gptq_gemm")


@register_quantization_config(QUANT_METHOD)
class GPTQW2Config(QuantizationConfig):
    """``bits: 2`` GPTQ (v1 format, no act-order) through vLLM's ExLlama 2-bit kernel."""

    def __init__(self, group_size: int = 128) -> None:
        super().__init__()
        if group_size <= 0 or group_size % PACK:
            raise ValueError(f"gptq_w2: group_size must be a positive multiple of {PACK} "
                             f"(channel-wise 2-bit GPTQ is not served), got {group_size}")
        self.group_size = group_size

    def __repr__(self) -> str:
        return f"GPTQW2Config(group_size={self.group_size})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # fp16 is the kernel's; fp32 runs the plain-torch path on the CPU.
        return [torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 60

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQW2Config":
        bits = config.get("bits", config.get("w_bit"))
        if bits != BITS:
            raise ValueError(f"gptq_w2 serves 2-bit GPTQ checkpoints, this one has bits={bits}")
        if config.get("desc_act", False):
            raise ValueError("gptq_w2: act-order (desc_act) checkpoints are not served; "
                             "quantize with desc_act=False")
        fmt = config.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise ValueError(f"gptq_w2: checkpoint_format {fmt!r} is not served, only 'gptq' (v1)")
        if config.get("lm_head"):
            raise ValueError("gptq_w2: a quantized lm_head is not served, only the decoder blocks' layers")
        if config.get("dynamic"):
            raise ValueError("gptq_w2: per-module 'dynamic' overrides are not served")
        return cls(group_size=int(config.get("group_size", 128)))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        # A 2-bit GPTQ checkpoint, which vLLM's own GPTQ methods refuse, comes here unless the
        # user asked for another method by name.
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if method in GPTQ_METHODS and hf_quant_cfg.get("bits") == BITS and user_quant in (None, *GPTQ_METHODS):
            return QUANT_METHOD
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        return GPTQW2LinearMethod(self) if isinstance(layer, LinearBase) else None


@register_weight_loader_v2_supported_method  # vLLM's parameter classes need the v2 loaders
class GPTQW2LinearMethod(LinearMethodBase):
    """AutoGPTQ's parameters through vLLM's loaders (tensor parallelism included); ExLlama's
    2-bit kernel on CUDA with fp16, ``dequantize`` elsewhere."""

    def __init__(self, config: GPTQW2Config) -> None:
        self.group_size = config.group_size

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        k, n, g = input_size_per_partition, sum(output_partition_sizes), self.group_size
        name = getattr(layer, "prefix", "") or type(layer).__name__
        if k % g:
            raise ValueError(f"gptq_w2: {name} has {k} input channels per rank, not a multiple of "
                             f"group_size {g}")
        if any(p % PACK for p in output_partition_sizes):
            raise ValueError(f"gptq_w2: {name}'s output sizes per rank {output_partition_sizes} must be "
                             f"multiples of {PACK} (the zero points are packed {PACK} to a word)")
        loader = extra_weight_attrs.get("weight_loader")
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(k // PACK, n, dtype=torch.int32), input_dim=0, output_dim=1,
            packed_dim=0, packed_factor=PACK, weight_loader=loader))
        layer.register_parameter("g_idx", RowvLLMParameter(
            data=torch.empty(k, dtype=torch.int32), input_dim=0, weight_loader=loader))
        layer.register_parameter("scales", GroupQuantScaleParameter(
            data=torch.empty(k // g, n, dtype=params_dtype), input_dim=0, output_dim=1, weight_loader=loader))
        layer.register_parameter("qzeros", PackedvLLMParameter(
            data=torch.empty(k // g, n // PACK, dtype=torch.int32), input_dim=0, output_dim=1,
            packed_dim=1, packed_factor=PACK, weight_loader=loader))
        layer.gptq_w2_out = n

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Plain parameters from here on: the loaders' wrappers are no longer needed.
        for name in ("qweight", "scales", "qzeros"):
            setattr(layer, name, torch.nn.Parameter(getattr(layer, name).data.contiguous(), requires_grad=False))
        layer.gptq_w2_kernel = (layer.qweight.is_cuda and layer.scales.dtype == torch.float16
                                and exllama_available())
        if layer.gptq_w2_kernel:
            # The kernel wants no act-order permutation (an empty one) and its own code order.
            layer.g_idx = torch.nn.Parameter(torch.empty(0, dtype=torch.int32, device=layer.qweight.device),
                                             requires_grad=False)
            torch.ops._C.gptq_shuffle(layer.qweight, layer.g_idx, BITS)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if layer.gptq_w2_kernel:
            y = torch.ops._C.gptq_gemm(x2, layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                       True, False, BITS)
        else:
            y = x2 @ dequantize(layer.qweight, layer.qzeros, layer.scales, self.group_size).to(x.dtype).T
        y = y.reshape(*x.shape[:-1], layer.gptq_w2_out)
        return y if bias is None else y + bias
