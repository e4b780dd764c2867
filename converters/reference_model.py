# SPDX-License-Identifier: Apache-2.0
"""A GQSA checkpoint as an ordinary transformers model whose linear weights are the
reference dequantization: the accuracy oracle for perplexity and for vLLM's outputs."""

from __future__ import annotations

import torch

from vllm_gqsa.checkpoint import iter_tensors, read_quant_config, split_gqsa_tensors
from vllm_gqsa.format import TENSOR_NAMES, GQSAFormatError, GQSALayer
from vllm_gqsa.reference import dequantize

from .layout import checkpoint_names


def load_reference_model(ckpt_dir: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    qcfg = read_quant_config(ckpt_dir)
    # Read (and validate) the GQSA layers first: a folder of pickle files is refused here, unread.
    # The dense weights are transformers' to read, once.
    layers, _ = split_gqsa_tensors(dict(iter_tensors(ckpt_dir, gqsa_only=True)), qcfg)
    config = AutoConfig.from_pretrained(ckpt_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    # transformers loads the dense weights under its own names (an image-text model's differ
    # from its checkpoint's); the converted layers' weights are missing and filled in below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of those missing weights is expected, and checked below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(ckpt_dir, config=config, dtype=dtype, device_map=device,
                                                           use_safetensors=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    in_model = {saved: name for name, saved in checkpoint_names(model).items()}
    modules = dict(model.named_modules())
    fmt = qcfg.layer_format()
    filled = set()
    for name, parts in layers.items():
        weight = in_model.get(f"{name}.weight")
        if weight is None or weight.rsplit(".", 1)[0] not in modules:
            raise GQSAFormatError(f"{name}: the checkpoint has GQSA tensors for a module the model lacks")
        module = modules[weight.rsplit(".", 1)[0]]
        out_features, in_features = module.weight.shape
        layer = GQSALayer.from_tensors(parts, out_features, in_features, fmt, name)
        module.weight.data = dequantize(layer, dtype).to(module.weight.device)
        filled.add(weight)
    missing = set(info["missing_keys"]) - filled
    unexpected = [k for k in info["unexpected_keys"] if k.rsplit(".", 1)[-1] not in TENSOR_NAMES]
    if missing or unexpected:
        raise GQSAFormatError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model
