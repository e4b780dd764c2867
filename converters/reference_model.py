# SPDX-License-Identifier: Apache-2.0
"""A GQSA checkpoint as an ordinary transformers model whose linear weights are the
reference dequantization: the accuracy oracle for perplexity and for vLLM's outputs."""

from __future__ import annotations

import torch

from vllm_gqsa.checkpoint import iter_tensors, read_quant_config, split_gqsa_tensors
from vllm_gqsa.format import GQSAFormatError, GQSALayer
from vllm_gqsa.reference import dequantize


def load_reference_model(ckpt_dir: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = read_quant_config(ckpt_dir)
    config = AutoConfig.from_pretrained(ckpt_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    modules = dict(model.named_modules())
    layers, state = split_gqsa_tensors(dict(iter_tensors(ckpt_dir)), qcfg)
    fmt = qcfg.layer_format()
    for name, parts in layers.items():
        if name not in modules:
            raise GQSAFormatError(f"{name}: the checkpoint has GQSA tensors for a module the model lacks")
        out_features, in_features = modules[name].weight.shape
        layer = GQSALayer.from_tensors(parts, out_features, in_features, fmt, name)
        state[f"{name}.weight"] = dequantize(layer, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        missing = [m for m in missing if m != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise GQSAFormatError(f"checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.to(device)
