# SPDX-License-Identifier: Apache-2.0
"""Reading GQSA checkpoint folders safely: safetensors only, every layer validated."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from .format import TENSOR_NAMES, GQSAFormatError, GQSAQuantConfig

UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_quant_config(ckpt_dir: str) -> GQSAQuantConfig:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise GQSAFormatError(f"{ckpt_dir} has no config.json")
    with open(path) as f:
        config = json.load(f)
    if "quantization_config" not in config:
        raise GQSAFormatError(f"{path} has no quantization_config: not a GQSA checkpoint")
    return GQSAQuantConfig.from_dict(config["quantization_config"])


def safetensors_files(ckpt_dir: str) -> list[str]:
    """The checkpoint's safetensors files. Pickle-based weight files are refused, never opened:
    unpickling runs code from the file."""
    names = sorted(os.listdir(ckpt_dir))
    files = [os.path.join(ckpt_dir, n) for n in names if n.endswith(".safetensors")]
    if not files:
        unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
        if unsafe:
            raise GQSAFormatError(f"{ckpt_dir} holds only pickle weight files ({', '.join(unsafe)}); "
                                  "GQSA checkpoints are read from safetensors only")
        raise GQSAFormatError(f"{ckpt_dir} has no .safetensors file")
    return files


def iter_tensors(ckpt_dir: str, gqsa_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors by name; with ``gqsa_only``, only those named like a GQSA layer's
    (the others are never read). A name in two files is refused, as vLLM's loader refuses it."""
    seen: dict[str, str] = {}
    for path in safetensors_files(ckpt_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in seen:
                        raise GQSAFormatError(f"{name} is in both {seen[name]} and "
                                              f"{os.path.basename(path)}")
                    seen[name] = os.path.basename(path)
                    if not gqsa_only or name.rpartition(".")[2] in TENSOR_NAMES:
                        yield name, f.get_tensor(name)
        except GQSAFormatError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise GQSAFormatError(f"{path} is not a readable safetensors file: {e}") from e


def split_gqsa_tensors(tensors: dict[str, torch.Tensor], qcfg: GQSAQuantConfig
                       ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Separate GQSA layer tensors (grouped by module name) from ordinary ones."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    dense = {}
    for name, t in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in TENSOR_NAMES and qcfg.is_quantized(module):
            layers.setdefault(module, {})[suffix] = t
        else:
            dense[name] = t
    return layers, dense
