# SPDX-License-Identifier: Apache-2.0
"""The ``sparse24`` baseline method (fp16 2:4) through vLLM's real loader on the CPU."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")

from vllm_cpu import free_port, linear_layers, load_vllm_model, setup_cpu_vllm  # noqa: E402
from vllm_gqsa.sparse24 import backend, compress_cutlass, prune_2_4  # noqa: E402

FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def test_prune_2_4_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.0, 0.0, 5.0, -6.0]])
    assert torch.equal(prune_2_4(w), torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, 5.0, -6.0]]))
    already = prune_2_4(torch.randn(8, 32))
    assert torch.equal(prune_2_4(already), already), "a 2:4 weight keeps its pattern"
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2_4(torch.randn(3, 6))


def test_cutlass_compression_round_trips():
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    w = prune_2_4(torch.randn(64, 128, dtype=torch.float16))
    packed, meta = compress_cutlass(w)
    assert packed.shape == (64, 64)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)


def test_backend_is_checked(monkeypatch):
    assert backend(torch.device("cpu")) == "cusparselt"  # auto: CUTLASS on compute capability 8.x only
    monkeypatch.setenv("VLLM_GQSA_SPARSE24_BACKEND", "cutlass")
    assert backend() == "cutlass"
    monkeypatch.setenv("VLLM_GQSA_SPARSE24_BACKEND", "cusparselt")
    assert backend() == "cusparselt"
    monkeypatch.setenv("VLLM_GQSA_SPARSE24_BACKEND", "magic")
    with pytest.raises(ValueError, match="VLLM_GQSA_SPARSE24_BACKEND='magic'"):
        backend()


def test_vllm_loads_a_sparse24_model_and_layers_are_pruned_dense(tiny_models, tmp_path):
    src = tiny_models["llama"]
    ckpt = tmp_path / "sparse24"
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "sparse24"}
    (ckpt / "config.json").write_text(json.dumps(cfg))

    setup_cpu_vllm()
    from vllm.config import ModelConfig

    assert ModelConfig(model=str(ckpt)).quantization == "sparse24"
    model, _ = load_vllm_model(str(ckpt), port=free_port())
    hf = load_file(str(ckpt / "model.safetensors"))
    layers = linear_layers(model)
    assert layers
    torch.manual_seed(0)
    for name, layer in layers.items():
        parent, module = name.rsplit(".", 2)[0], ".".join(name.split(".")[-2:])
        parts = FUSED.get(module, (module,))
        dense = torch.cat([hf[f"{parent}.{p}.weight"] for p in parts]).float()
        expected_w = prune_2_4(dense)
        assert torch.equal(layer.weight, expected_w), name
        assert ((layer.weight.reshape(layer.weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
        x = torch.randn(3, layer.input_size)
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        torch.testing.assert_close(y, x @ expected_w.T, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 2:4 kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("kernel", ["cutlass", "cusparselt"])
def test_2_4_ops_match_the_pruned_dense_matmul(kernel, dtype, M):
    if kernel == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch builds its CUTLASS 2:4 kernel for compute capability 8.x only")
    from vllm_gqsa.sparse24 import sparse24_cutlass_mm, sparse24_mm  # noqa: F401  (registers the ops)

    w = prune_2_4(torch.randn(256, 512, device="cuda", dtype=dtype))
    x = torch.randn(M, 512, device="cuda", dtype=dtype)
    if kernel == "cutlass":
        op, args = torch.ops.vllm_gqsa.sparse24_cutlass_mm, (x, *compress_cutlass(w))
    else:
        op, args = torch.ops.vllm_gqsa.sparse24_mm, (x, torch._cslt_compress(w), 256)
    y = op(*args)
    ref = x.float() @ w.float().T
    assert y.shape == (M, 256) and y.dtype == dtype
    assert (y.float() - ref).norm() / ref.norm() < 1e-2
    torch.library.opcheck(op, args)
