# SPDX-License-Identifier: Apache-2.0
"""vLLM's side of GQSA: ``GQSAConfig`` (registered as ``gqsa``) and ``GQSALinearMethod``.

A GQSA layer's tensors have data-dependent lengths (the number of kept groups), so vLLM's
fixed-shape parameter classes cannot shard them. Instead (the pattern GGUF used):

1. ``create_weights`` registers an empty placeholder per checkpoint tensor, each with a loader
   that stashes what arrives;
2. as soon as the five tensors of one shard (q, k, v, gate, up, or the whole layer) are in,
   they are validated against the shard's full shape and sliced for this tensor-parallel rank,
   so host memory holds one rank's slice, not the whole layer (a checkpoint layer that holds
   several shards, such as Phi-3's ``qkv_proj``, is first split into them by rows);
3. ``process_weights_after_loading`` fuses the shards in vLLM's output order, repacks them
   into the kernel format once, and replaces the placeholders with the final tensors.

The output layer (``lm_head``, when the checkpoint lists it in ``target_modules``) is a
``ParallelLMHead``, which vLLM shards by vocabulary rows and pads per rank; it goes through the
same method, and the padding rows are empty (no kept groups), so their logits are 0 and vLLM
cuts them off.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase,
                                               MergedColumnParallelLinear, QKVParallelLinear,
                                               UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from . import fusion, ops  # noqa: F401  (ops registers torch.ops.vllm_gqsa.*)
from .format import (QUANT_METHOD, TENSOR_NAMES, GQSAFormatError, GQSALayer, GQSAQuantConfig,
                     LayerFormat)
from .kernels import cuda as cuda_kernels
from .kernels.cuda_format import can_implement, pair_pattern, to_kernel_format

# Under "vllm." so that vLLM's logging configuration prints it.
logger = logging.getLogger("vllm.gqsa")

QKV_SHARDS = ("q", "k", "v")
CPU_NUM_CTAS = 8  # the GEMV schedule's grid where no GPU says how many SMs there are


@register_quantization_config(QUANT_METHOD)
class GQSAConfig(QuantizationConfig):
    """The ``quantization_config`` of a GQSA checkpoint, as vLLM sees it."""

    def __init__(self, quant: GQSAQuantConfig | None = None) -> None:
        super().__init__()
        self.quant = quant or GQSAQuantConfig()
        self.kernels_logged: set[str] = set()

    def __repr__(self) -> str:
        return f"GQSAConfig({self.quant})"

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
    def from_config(cls, config: dict[str, Any]) -> "GQSAConfig":
        return cls(GQSAQuantConfig.from_dict(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        if str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD:
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.quant.modules_to_not_convert:
            # An entry names a module (one layer or a whole part of the model), so it is mapped as
            # the prefix of its weights: an image-text model's "model.vision_tower" follows the
            # mapper's "model.vision_tower." -> "vision_tower." like the tower's own weights.
            names = [f"{m}." for m in self.quant.modules_to_not_convert]
            mapped = tuple(m[:-1] for m in hf_to_vllm_mapper.apply_list(names))
            self.quant = GQSAQuantConfig(**{**self.quant.__dict__, "modules_to_not_convert": mapped})

    def checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint modules behind a vLLM layer: ``...qkv_proj`` -> q/k/v_proj."""
        parent, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            if not self.quant.is_quantized(prefix):
                return None  # vLLM's dense output layer
            layer.prefix = prefix  # LinearBase keeps its prefix; the output layer does not
            return GQSALinearMethod(self, [prefix])
        if not isinstance(layer, LinearBase):
            return None
        names = self.checkpoint_names(prefix)
        quantized = [self.quant.is_quantized(n) for n in names]
        if any(quantized) != all(quantized):
            raise GQSAFormatError(f"{prefix}: some but not all of {names} are GQSA layers; the "
                                  "shards of a fused layer must all be quantized or all dense")
        if not all(quantized):
            return UnquantizedLinearMethod()
        fusion.install()  # each RMSNorm split between the GQSA layers around it, when vLLM compiles
        return GQSALinearMethod(self, names)


def _shard_order(layer) -> tuple:
    if isinstance(layer, QKVParallelLinear):
        return QKV_SHARDS
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


def _full_shard_shape(layer, shard_id) -> tuple[int, int]:
    """Rows and columns of one shard as stored in the checkpoint (before tensor parallelism)."""
    if isinstance(layer, ParallelLMHead):
        return layer.org_vocab_size, layer.embedding_dim
    if shard_id is None:
        return layer.output_size, layer.input_size
    if shard_id in QKV_SHARDS:
        heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
        head = layer.v_head_size if shard_id == "v" else layer.head_size
        return heads * head, layer.input_size
    return layer.output_sizes[shard_id], layer.input_size


def _partition_shape(layer) -> tuple[int, int]:
    """Rows and columns this rank computes."""
    if isinstance(layer, ParallelLMHead):
        return layer.num_embeddings_per_partition, layer.embedding_dim
    return layer.output_size_per_partition, layer.input_size_per_partition


def select_rows(full: GQSALayer, start: int, end: int) -> GQSALayer:
    """Rows ``start .. end-1`` of ``full``. Where the range cuts through row blocks (a rank's
    share, or vLLM's padded vocabulary, that is no multiple of ``block_rows``), the layer is first
    rewritten as single rows: the same weights, and what the kernels run anyway."""
    R = full.fmt.block_rows
    if start % R or end % R:
        full = full.single_rows()
    return full.select_rows(start, end)


def shard_for_rank(layer, shard_id, full: GQSALayer) -> GQSALayer:
    """The part of one checkpoint shard this tensor-parallel rank computes."""
    if isinstance(layer, ParallelLMHead):
        # This rank's vocabulary rows, then empty rows up to vLLM's padded size per rank.
        s = layer.shard_indices
        rows = select_rows(full, s.org_vocab_start_index, s.org_vocab_end_index)
        pad = layer.num_embeddings_per_partition - rows.out_features
        if not pad:
            return rows
        fmt = rows.fmt if pad % rows.fmt.block_rows == 0 else dataclasses.replace(rows.fmt, block_rows=1)
        return GQSALayer.concat_rows([rows, GQSALayer.empty(pad, full.in_features, fmt)])
    order = _shard_order(layer)
    rows = layer.output_partition_sizes[order.index(shard_id)]
    if rows != full.out_features:  # column-parallel: this rank's output rows
        rank = layer.tp_rank
        if shard_id in ("k", "v"):
            rank //= layer.num_kv_head_replicas
        full = select_rows(full, rank * rows, (rank + 1) * rows)
    k = layer.input_size_per_partition
    if k != full.in_features:  # row-parallel: this rank's input channels
        full = full.select_input(layer.tp_rank * k, (layer.tp_rank + 1) * k)
    return full


class GQSALinearMethod(LinearMethodBase):
    """Linear layers stored as GQSA groups; see the module docstring for the loading scheme."""

    def __init__(self, config: GQSAConfig, checkpoint_names: list[str]):
        self.config = config
        self.fmt: LayerFormat = config.quant.layer_format()
        self.checkpoint_names = checkpoint_names

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        G = self.fmt.group_size
        name = getattr(layer, "prefix", "") or "linear"
        if input_size_per_partition % G:
            raise ValueError(
                f"{name}: input size per rank {input_size_per_partition} (of {input_size}) is not a "
                f"multiple of the GQSA group size {G}; reduce tensor_parallel_size or convert the "
                f"model with a smaller --group-size")
        layer.gqsa_act_dtype = params_dtype  # the CUDA kernels take fp16 and bf16 activations
        layer.gqsa_shards = {}  # shard id -> GQSALayer for this rank
        layer.gqsa_pending = {}  # shard id -> {tensor name: tensor} until all five are in
        for t_name in TENSOR_NAMES:
            param = Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            param.weight_loader = functools.partial(self._load, layer, t_name)
            layer.register_parameter(t_name, param)
        try:
            from vllm.config import get_current_vllm_config
            layer.gqsa_dummy = get_current_vllm_config().load_config.load_format == "dummy"
        except Exception:
            layer.gqsa_dummy = False

    def _shard_name(self, layer, shard_id) -> str:
        order = _shard_order(layer)
        if shard_id is None:  # the layer as one (a fused layer's own name: vLLM's and Phi-3's)
            return self.checkpoint_names[0] if len(self.checkpoint_names) == 1 else layer.prefix
        if len(self.checkpoint_names) != len(order):
            return f"{layer.prefix}[{shard_id}]"
        return self.checkpoint_names[order.index(shard_id)]

    def _load(self, layer, t_name: str, param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        order = _shard_order(layer)
        # A fused layer whose checkpoint holds all its shards as one GQSA layer (Phi-3's qkv_proj
        # and gate_up_proj) comes without a shard id; it is split into its shards once complete.
        fused = shard_id is None and order != (None,)
        if shard_id not in order and not fused:
            raise GQSAFormatError(f"{layer.prefix}: unexpected shard {shard_id!r} for {t_name}")
        parts = layer.gqsa_pending.setdefault(shard_id, {})
        name = self._shard_name(layer, shard_id)
        if t_name in parts or shard_id in layer.gqsa_shards:
            raise GQSAFormatError(f"{name}.{t_name} appears twice in the checkpoint")
        if fused and layer.gqsa_shards:
            raise GQSAFormatError(f"{name}: the checkpoint holds this layer both whole ({t_name}) and in shards")
        parts[t_name] = loaded.detach().to("cpu")
        if len(parts) != len(TENSOR_NAMES):
            return
        del layer.gqsa_pending[shard_id]
        if not fused:
            out_features, in_features = _full_shard_shape(layer, shard_id)
            full = GQSALayer.from_tensors(parts, out_features, in_features, self.fmt, name)
            layer.gqsa_shards[shard_id] = shard_for_rank(layer, shard_id, full)
            return
        rows = [_full_shard_shape(layer, s)[0] for s in order]
        full = GQSALayer.from_tensors(parts, sum(rows), layer.input_size, self.fmt, name)
        start = 0
        for s, n in zip(order, rows):
            layer.gqsa_shards[s] = shard_for_rank(layer, s, select_rows(full, start, start + n))
            start += n

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        order = _shard_order(layer)
        device = getattr(layer, TENSOR_NAMES[0]).device
        if not layer.gqsa_shards and not layer.gqsa_pending and layer.gqsa_dummy:
            self._fill_dummy(layer, order, device)
        for shard_id in order:
            if shard_id not in layer.gqsa_shards:
                if None in layer.gqsa_pending:  # a fused checkpoint layer, incomplete
                    shard_id = None
                name = self._shard_name(layer, shard_id)
                have = sorted(layer.gqsa_pending.get(shard_id, {}))
                missing = [t for t in TENSOR_NAMES if t not in have]
                raise GQSAFormatError(f"{name}: the checkpoint lacks {', '.join(missing)} "
                                      f"for this GQSA layer")
        if layer.gqsa_pending:  # every shard is complete, and more tensors of the layer remain
            raise GQSAFormatError(f"{self._shard_name(layer, None)}: the checkpoint holds this layer both "
                                  f"whole and in shards")
        merged = GQSALayer.concat_rows([layer.gqsa_shards[s] for s in order])
        del layer.gqsa_shards, layer.gqsa_pending
        N, K = merged.out_features, merged.in_features
        assert (N, K) == _partition_shape(layer)
        for t_name in TENSOR_NAMES:
            delattr(layer, t_name)

        ok, reason = can_implement(self.fmt.bits, self.fmt.group_size, N, K)
        if ok:
            single = merged.single_rows()
            pairs = pair_pattern(single.row_ptr, single.col_idx, K, self.fmt.group_size)
            tensors = to_kernel_format(single, num_ctas=_num_ctas(device), layout=cuda_kernels.kernel_layout(),
                                       num_sms=_num_sms(device), pairs=pairs)
            # Warps per CTA of the sliced GEMV: a host-side choice, passed to the op as ints.
            layer.gqsa_sell_warps = tensors.pop("sell_warps").tolist() if "sell_warps" in tensors else None
            layer.gqsa_kernel = "kernel_format"
        else:
            tensors = merged.tensors()
            pairs, layer.gqsa_sell_warps, layer.gqsa_kernel = False, None, "reference"
        layer.gqsa_pairs = pairs
        for t_name, t in tensors.items():
            layer.register_parameter(t_name, Parameter(t.to(device), requires_grad=False))
        layer.gqsa_n_out, layer.gqsa_nnz, layer.gqsa_block_rows = N, merged.nnz, merged.fmt.block_rows
        if not ok:
            label = f"torch reference matmul ({reason})"
        elif device.type == "cuda" and layer.gqsa_act_dtype == torch.float32:
            label = "kernel format decoded in torch (the CUDA kernels take fp16 and bf16 activations, not float32)"
        elif device.type == "cuda" and cuda_kernels.available()[0]:
            compact = "xcols" in tensors
            gemv_max, tc_max = cuda_kernels.dispatch(compact, pairs)
            middle = ("sparse-tensor-core kernel (pair pattern)" if pairs else
                      f"tensor-core kernel{' on compact tiles' if compact else ''}")
            gemv = "sliced GEMV (one row per lane)" if "sell_rows" in tensors else "task-centric GEMV"
            label = (f"CUDA {gemv} for <= {gemv_max} tokens, {middle} for <= {tc_max}, "
                     f"dequantize + cuBLAS above")
        else:
            label = f"kernel format decoded in torch ({cuda_kernels.available()[1]})"
        # Every layer's choice at DEBUG; each distinct choice once at INFO.
        log = logger.info if label not in self.config.kernels_logged else logger.debug
        self.config.kernels_logged.add(label)
        log("GQSA %s [%d x %d, %d kept groups]: %s", layer.prefix, N, K, merged.nnz, label)

    def _fill_dummy(self, layer, order, device) -> None:
        """Random kept groups at the configured sparsity, for ``--load-format dummy`` benchmarks."""
        from .random_layers import random_gqsa_layer

        # An output layer is filled unpruned: gqsa-convert --quantize-output-layer's default.
        head = isinstance(layer, ParallelLMHead)
        sparsity = 0.0 if head else self.config.quant.sparsity
        pairs = not head and getattr(self.config.quant, "pattern", "groups") == "pairs"
        for i, shard_id in enumerate(order):
            N, K = _full_shard_shape(layer, shard_id)
            full = random_gqsa_layer(N, K, self.fmt, 1 - sparsity, seed=i, device=device, pairs=pairs)
            layer.gqsa_shards[shard_id] = shard_for_rank(layer, shard_id, full)

    def tie_weights(self, layer, embed_tokens):
        raise GQSAFormatError(
            f"{layer.prefix} is a GQSA layer but the model ties it to the embedding "
            "(tie_word_embeddings); a quantized output layer needs tie_word_embeddings false and a "
            "dense embedding, as gqsa-convert --quantize-output-layer writes them")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
              ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if layer.gqsa_kernel == "kernel_format":
            y = torch.ops.vllm_gqsa.gqsa_mm(x2, layer.row_ptr, layer.codes, layer.meta, layer.schedule,
                                            layer.chunks, layer.gqsa_n_out, self.fmt.group_size,
                                            getattr(layer, "xcols", None), layer.counters, layer.gqsa_pairs,
                                            getattr(layer, "sell_rows", None), getattr(layer, "slice_parts", None),
                                            layer.gqsa_sell_warps)
        else:
            y = torch.ops.vllm_gqsa.gqsa_mm_reference(
                x2, layer.row_ptr, layer.col_idx, layer.qweight, layer.scales, layer.qzeros,
                layer.gqsa_n_out, self.fmt.bits, self.fmt.group_size, layer.gqsa_block_rows)
        y = y.reshape(*x.shape[:-1], layer.gqsa_n_out)
        return y if bias is None else y + bias


def _num_ctas(device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_kernels.default_num_ctas(device)
    return CPU_NUM_CTAS


def _num_sms(device: torch.device) -> int | None:
    """The SMs the sliced GEMV's warps are chosen for (None off the GPU: ``to_kernel_format``'s default)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None
