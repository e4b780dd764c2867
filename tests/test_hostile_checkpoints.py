# SPDX-License-Identifier: Apache-2.0
"""Broken and hostile GQSA checkpoints, loaded through vLLM's real loader: each must fail at load
with an error naming the layer and the fault, before any kernel runs, and nothing in the
checkpoint may run code."""

import json
import os
import pickle
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from test_plugin import broken_copy  # noqa: E402
from vllm_cpu import free_port, load_vllm_model  # noqa: E402
from vllm_gqsa.format import GQSAFormatError  # noqa: E402

LAYER = "model.layers.1.mlp.down_proj"


def mutate_case(name):
    def set_(key, fn):
        def m(t):
            t[f"{LAYER}.{key}"] = fn(t[f"{LAYER}.{key}"])
        return m

    def neg(x):
        x = x.clone()
        x[0] = x[1]  # a duplicate column: not strictly increasing
        return x

    def nan(x):
        x = x.clone()
        x[2, 0] = float("nan")
        return x

    def overrun(x):
        x = x.clone()
        x[-1] += 1
        return x

    def decrease(x):
        x = x.clone()
        x[3] = x[2] - 1
        return x

    return {
        "col_idx out of range": (set_("col_idx", lambda x: torch.full_like(x, 255)), "out of range"),
        "duplicate column": (set_("col_idx", neg), "strictly increasing"),
        "NaN scale": (set_("scales", nan), "not finite"),
        "Inf scale": (set_("scales", lambda x: x.masked_fill(torch.arange(x.numel()).reshape(x.shape) == 0,
                                                                float("inf"))), "not finite"),
        "row_ptr overruns": (set_("row_ptr", overrun), r"row_ptr\[-1\]"),
        "row_ptr decreases": (set_("row_ptr", decrease), "row_ptr decreases"),
        "scales wrong dtype": (set_("scales", lambda x: x.float()), "scales has dtype"),
        "qweight wrong shape": (set_("qweight", lambda x: x[:-1]), "qweight has shape"),
        "col_idx wrong width": (set_("col_idx", lambda x: x.to(torch.int32)), "col_idx has dtype"),
        "row_ptr int64": (set_("row_ptr", lambda x: x.long()), "row_ptr has dtype"),
        "missing qzeros": (lambda t: t.pop(f"{LAYER}.qzeros"), "lacks qzeros"),
    }[name]


CASES = ["col_idx out of range", "duplicate column", "NaN scale", "Inf scale", "row_ptr overruns",
         "row_ptr decreases", "scales wrong dtype", "qweight wrong shape", "col_idx wrong width",
         "row_ptr int64", "missing qzeros"]


@pytest.mark.parametrize("case", CASES)
def test_broken_layer_fails_at_load_naming_layer_and_fault(case, tiny_checkpoints, tmp_path):
    mutate, fault = mutate_case(case)
    ckpt = broken_copy(tiny_checkpoints["llama"], tmp_path / "bad", mutate)
    with pytest.raises(GQSAFormatError, match=f"{LAYER}.*{fault}"):
        load_vllm_model(ckpt, port=free_port())


def test_extra_tensor_is_refused(tiny_checkpoints, tmp_path):
    def add(t):
        t[f"{LAYER}.payload"] = torch.zeros(4)

    ckpt = broken_copy(tiny_checkpoints["llama"], tmp_path / "bad", add)
    with pytest.raises(Exception, match="payload"):
        load_vllm_model(ckpt, port=free_port())


def test_layer_both_whole_and_in_shards_is_refused(tiny_checkpoints, tmp_path):
    """q/k/v stored separately, plus part of the same layer stored whole (as Phi-3 stores it)."""
    qkv = "model.layers.1.self_attn.qkv_proj"

    def add(t):
        t[f"{qkv}.qweight"] = t["model.layers.1.self_attn.q_proj.qweight"].clone()

    ckpt = broken_copy(tiny_checkpoints["llama"], tmp_path / "bad", add)
    with pytest.raises(GQSAFormatError, match=f"{qkv}.*both whole \\(qweight\\) and in shards"):
        load_vllm_model(ckpt, port=free_port())


def test_truncated_safetensors_fails_cleanly(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as e:
        load_vllm_model(str(ckpt), port=free_port())
    assert not isinstance(e.value, (SystemExit, KeyboardInterrupt))


@pytest.mark.parametrize("field,value,fault", [
    ("bits", 3, "bits=3"), ("group_size", 12, "group_size=12"), ("format_version", 99, "format_version 99"),
    ("sparsity", 1.5, "sparsity"), ("block_rows", -1, "block_rows"), ("bits", float("nan"), "bits must be a number"),
])
def test_impossible_quantization_config_is_refused(field, value, fault, tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=fault):
        load_vllm_model(str(ckpt), port=free_port())


def test_tensor_in_two_files_is_refused(tiny_checkpoints, tmp_path):
    """vLLM's loader refuses a tensor stored twice; so does the reader behind the reference
    model and the benchmarks, instead of taking either copy."""
    from safetensors.torch import load_file, save_file

    from vllm_gqsa.checkpoint import iter_tensors

    ckpt = tmp_path / "dup"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    scales = load_file(str(ckpt / "model.safetensors"))[f"{LAYER}.scales"]
    save_file({f"{LAYER}.scales": scales}, str(ckpt / "extra.safetensors"))
    with pytest.raises(GQSAFormatError, match=f"{LAYER}.scales is in both extra.safetensors and model.safetensors"):
        dict(iter_tensors(str(ckpt)))


class _Exploit:
    """Unpickling this runs code: it must never happen when loading a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_never_run_code(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    os.remove(ckpt / "model.safetensors")
    marker = tmp_path / "pwned"
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Exploit(str(marker))}, f)
    with pytest.raises(Exception):
        load_vllm_model(str(ckpt), port=free_port())
    assert not marker.exists()
    from converters.reference_model import load_reference_model

    with pytest.raises(GQSAFormatError, match="pickle"):
        load_reference_model(str(ckpt))
    assert not marker.exists()
