# SPDX-License-Identifier: Apache-2.0
"""Where a model's text decoder is, and what its weights are called in its checkpoints.

A causal LM (Llama, Qwen, Gemma 3 text) is ``model.layers`` with its embedding and final
norm beside them. An image-text model (Gemma 3 of 4B and more) holds the same decoder as
``model.language_model``, next to parts that read images (``vision_tower``,
``multi_modal_projector``); gqsa-convert converts the decoder and leaves those parts dense.

transformers may name a module's weights otherwise in memory than in the model's own
checkpoint files (Gemma 3's ``model.language_model.layers`` are ``language_model.model.layers``
on the Hub), and vLLM reads the Hub's names. The converter works with the names in memory and
writes the checkpoint under the names transformers saves, which for a model loaded from a
folder are that folder's own.
"""

from __future__ import annotations

import re

import torch

# Image-text models whose text decoder gqsa-convert converts; the other parts stay dense.
IMAGE_TEXT_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)


def text_config(config: dict) -> dict:
    """The decoder's part of a ``config.json``: its ``text_config`` in an image-text model."""
    return config.get("text_config", config)


def decoder(model) -> tuple[str, torch.nn.Module]:
    """The text decoder (the module with ``layers``, ``embed_tokens`` and ``norm``) and its name."""
    inner = model.model
    if hasattr(inner, "language_model"):
        return "model.language_model", inner.language_model
    return "model", inner


def checkpoint_names(model) -> dict[str, str]:
    """Each ``model.state_dict()`` name mapped to the name transformers saves that weight under."""
    names = list(model.state_dict(keep_vars=True))
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: save_pretrained's reversal of the class's key mapping
        return {n: _saved_name_v4(model, n) for n in names}
    # Renaming only: one-element tensors carry each name's index through transformers' rules.
    marked = revert_weight_conversion(model, {n: torch.tensor([i]) for i, n in enumerate(names)})
    if len(marked) != len(names) or any(t.numel() != 1 for t in marked.values()):
        raise ValueError(f"{type(model).__name__}: transformers stores its weights merged or split "
                         "on disk, which gqsa-convert does not support")
    return {names[int(t)]: saved for saved, t in marked.items()}


def _saved_name_v4(model, name: str) -> str:
    mapping = getattr(model, "_checkpoint_conversion_mapping", {})
    for pattern, replacement in {v: k for k, v in mapping.items()}.items():
        replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))
        name, replaced = re.subn(pattern, replacement, name)
        if replaced:
            break
    return name


def checkpoint_module(names: dict[str, str], module: str) -> str:
    """The checkpoint name of a module (a linear layer) from its weight's."""
    return names[f"{module}.weight"].rsplit(".", 1)[0]


def rename(names: dict[str, str], name: str) -> str:
    """A tensor name in memory -> in the checkpoint; a GQSA tensor (``X.qweight``) follows its
    layer's weight (``X.weight``)."""
    if name in names:
        return names[name]
    module, tensor = name.rsplit(".", 1)
    return f"{checkpoint_module(names, module)}.{tensor}"


def dense_parts(model, names: dict[str, str]) -> tuple[str, ...]:
    """The checkpoint names of an image-text model's parts outside its text decoder and output
    layer (``vision_tower``, ``multi_modal_projector``); none for a causal LM."""
    prefix, _ = decoder(model)
    head = model.get_output_embeddings()
    head_weights = {f"{n}.weight" for n, m in model.named_modules() if m is head}
    parts = set()
    for name, saved in names.items():
        if not name.startswith(prefix + ".") and name not in head_weights:
            parts.add(saved.split(".", 1)[0])
    return tuple(sorted(parts))
