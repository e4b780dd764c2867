# SPDX-License-Identifier: Apache-2.0
"""The vLLM plugin on the CPU: registration, vLLM's real loader, tensor and pipeline parallelism
over gloo, torch.compile, and broken checkpoints."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("vllm")

from conftest import OTHER_FAMILIES, tiny_model_and_checkpoint  # noqa: E402
from vllm_cpu import (check_tensor_parallel, combine_column_shards, free_port, linear_layers, load_vllm_model, run_tp,  # noqa: E402
                      setup_cpu_vllm)
from vllm_gqsa.checkpoint import iter_tensors, read_quant_config, split_gqsa_tensors  # noqa: E402
from vllm_gqsa.format import GQSAFormatError, GQSALayer  # noqa: E402
from vllm_gqsa.reference import dequantize  # noqa: E402


def reference_weights(ckpt: str, model) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Dense weight and bias of every vLLM linear layer, from the checkpoint via the reference."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    qcfg = read_quant_config(ckpt)
    tensors = dict(iter_tensors(ckpt))
    layers, dense = split_gqsa_tensors(tensors, qcfg)
    out = {}
    for name, layer in linear_layers(model).items():
        names = layer.quant_method.checkpoint_names if hasattr(layer.quant_method, "checkpoint_names") \
            else [name]
        assert not isinstance(layer.quant_method, UnquantizedLinearMethod)
        ws, bs = [], []
        for n in names:
            parts = layers[n]
            rows = int(parts["row_ptr"].numel() - 1) * qcfg.block_rows
            ws.append(dequantize(GQSALayer.from_tensors(parts, rows, layer.input_size,
                                                        qcfg.layer_format(), n)))
            bs.append(dense.get(f"{n}.bias"))
        bias = torch.cat(bs) if all(b is not None for b in bs) else None
        out[name] = (torch.cat(ws), bias)
    return out


def test_entry_point_registers_gqsa():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("gqsa") == "vllm_gqsa:register"
    setup_cpu_vllm()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert "gqsa" in QUANTIZATION_METHODS
    assert get_quantization_config("gqsa").__name__ == "GQSAConfig"


@pytest.mark.parametrize("flag", [None, "gqsa"])
def test_model_config_picks_gqsa_from_checkpoint(tiny_checkpoints, flag):
    setup_cpu_vllm()
    from vllm.config import ModelConfig

    assert ModelConfig(model=tiny_checkpoints["llama"], quantization=flag).quantization == "gqsa"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", *OTHER_FAMILIES])
def test_vllm_loader_builds_model_and_layers_match_reference(arch, request):
    _, ckpt = tiny_model_and_checkpoint(request, arch)
    model, _ = load_vllm_model(ckpt, port=free_port())
    refs = reference_weights(ckpt, model)
    # Every GQSA layer of the checkpoint is served, once: vLLM's own model classes stack q/k/v and
    # gate/up into one layer each (Phi-3's checkpoint has them stacked already); its Transformers
    # backend (which serves OLMo 3 and Seed-OSS from vLLM 0.3x on) keeps them apart.
    layers, _ = split_gqsa_tensors(dict(iter_tensors(ckpt, gqsa_only=True)), read_quant_config(ckpt))
    served = [n for layer in linear_layers(model).values() for n in layer.quant_method.checkpoint_names]
    assert sorted(served) == sorted(layers) and len(layers) == 2 * (4 if arch == "phi3" else 7)
    if type(model).__name__ != "TransformersForCausalLM":
        assert set(refs) == {f"model.layers.{i}.{n}" for i in range(2) for n in
                             ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, layer in linear_layers(model).items():
            for M in (1, 5, 19):
                x = torch.randn(M, layer.input_size)
                y = layer(x)
                y = y[0] if isinstance(y, tuple) else y
                w, b = refs[name]
                expected = x @ w.T + (b if b is not None else 0)
                torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4, msg=name)


def test_custom_op_compiles_fullgraph(tiny_checkpoints):
    model, _ = load_vllm_model(tiny_checkpoints["llama"], port=free_port())
    layer = model.model.layers[0].mlp.gate_up_proj
    eager = lambda x: layer.quant_method.apply(layer, x)  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for M in (1, 3, 12):
            x = torch.randn(M, layer.input_size)
            torch.testing.assert_close(compiled(x), eager(x))


def test_ops_pass_opcheck(tiny_checkpoints):
    model, _ = load_vllm_model(tiny_checkpoints["llama"], port=free_port())
    layer = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, layer.input_size)
    assert hasattr(layer, "sell_rows"), "a G = 16 layer loads in the sliced layout"
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_mm.default,
                          (x, layer.row_ptr, layer.codes, layer.meta, layer.schedule,
                           layer.chunks, layer.gqsa_n_out, 16, None, layer.counters, False, layer.sell_rows,
                           layer.slice_parts, layer.gqsa_sell_warps))
    from conftest import random_layer
    from vllm_gqsa.format import LayerFormat

    ref = random_layer(24, 96, LayerFormat(2, 32, 2))
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_mm_reference.default,
                          (torch.randn(4, 96), ref.row_ptr, ref.col_idx,
                           ref.qweight, ref.scales, ref.qzeros, 24, 2, 32, 2))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_tensor_parallel_shards_combine_to_the_unsharded_output(arch, world_size, request, tmp_path):
    # Qwen2: q/k/v biases, and at TP=4 replicated KV heads. Phi-3: q/k/v and gate/up fused in the
    # checkpoint, split into vLLM's shards and then per rank.
    _, ckpt = tiny_model_and_checkpoint(request, arch)
    check_tensor_parallel(ckpt, world_size, tmp_path)


def head_reference(ckpt: str, vocab: int = 258, hidden: int = 128) -> torch.Tensor:
    qcfg = read_quant_config(ckpt)
    parts = split_gqsa_tensors(dict(iter_tensors(ckpt)), qcfg)[0]["lm_head"]
    return dequantize(GQSALayer.from_tensors(parts, vocab, hidden, qcfg.layer_format(), "lm_head"))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2-tied", "phi3-tied",
                                  *(a for a in OTHER_FAMILIES if a != "gemma2")])  # vLLM's Gemma 2 is tied
def test_vllm_computes_logits_with_a_gqsa_output_layer(arch, request):
    from vllm_gqsa.quantization import GQSALinearMethod

    if arch in OTHER_FAMILIES:
        _, ckpt = request.getfixturevalue("other_families")(arch, output_layer=True)
    else:
        ckpt = request.getfixturevalue("head_checkpoints")[arch]
    model, _ = load_vllm_model(ckpt, port=free_port())
    head = model.lm_head
    assert isinstance(head.quant_method, GQSALinearMethod) and head is not model.model.embed_tokens
    w = head_reference(ckpt)
    emb = dict(iter_tensors(ckpt))["model.embed_tokens.weight"]
    torch.testing.assert_close(model.model.embed_tokens.weight[:258], emb, rtol=0, atol=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for M in (1, 4, 19):
            x = torch.randn(M, 128)
            # vLLM pads the vocabulary (258 -> 320 rows); the padding rows hold no groups.
            y = head.quant_method.apply(head, x)
            assert y.shape == (M, 320) and not y[:, 258:].any()
            torch.testing.assert_close(model.compute_logits(x), x @ w.T, rtol=1e-4, atol=1e-4)


def test_output_layer_in_row_blocks_that_vllms_padding_cuts(tmp_path):
    """vLLM pads the vocabulary to a multiple of 64 rows per rank (258 -> 320): 3-row blocks do
    not divide that, so the output layer loads as single rows (the same weights); the decoder
    layers keep their blocks."""
    from converters.convert import ConvertOptions, convert
    from converters.tiny import build_tiny_model

    dense = build_tiny_model(str(tmp_path / "dense"), hidden_size=96, intermediate_size=192, num_heads=3,
                             num_kv_heads=3)
    ckpt = str(tmp_path / "r3-head")
    convert(dense, ckpt, ConvertOptions(block_rows=3, quantize_output_layer=True, n_samples=4, seq_len=32,
                                        batch_size=4))
    model, _ = load_vllm_model(ckpt, port=free_port())
    assert model.lm_head.gqsa_block_rows == 1
    assert model.model.layers[0].mlp.gate_up_proj.gqsa_block_rows == 3
    torch.manual_seed(0)
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(x), x @ head_reference(ckpt, 258, 96).T,
                                   rtol=1e-4, atol=1e-4)


def test_image_text_checkpoint_maps_onto_vllms_layers(image_text_checkpoints):
    """vLLM's Gemma 3 image-text model renames the checkpoint's weights (its hf_to_vllm_mapper)
    and asks the quantization config about each linear layer under its own name: every GQSA
    layer of the checkpoint must be one the config calls GQSA there, and every layer of the
    vision tower must stay dense. vLLM's module for that model imports torchvision, whose CPU
    build is not on PyPI; without it this takes vLLM 0.26's mapper, as written there. (vLLM's
    engine serves these checkpoints in the GPU tests.)"""
    setup_cpu_vllm()
    from vllm.model_executor.models.utils import WeightsMapper

    from vllm_gqsa.quantization import GQSAConfig

    try:
        from vllm.model_executor.models.gemma3_mm import Gemma3ForConditionalGeneration as model_cls

        mapper, packed = model_cls.hf_to_vllm_mapper, model_cls.packed_modules_mapping
    except ImportError:
        mapper = WeightsMapper(orig_to_new_prefix={
            "model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."})
        packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def in_vllm(name: str) -> str:
        return mapper.apply_list([name])[0].rsplit(".", 1)[0]

    for variant in ("decoder", "head"):
        ckpt = image_text_checkpoints[variant]
        with open(os.path.join(ckpt, "config.json")) as f:
            cfg = GQSAConfig.from_config(json.load(f)["quantization_config"])
        cfg.packed_modules_mapping = dict(packed)
        cfg.apply_vllm_mapper(mapper)
        layers, dense = split_gqsa_tensors(dict(iter_tensors(ckpt)), read_quant_config(ckpt))
        assert len(layers) == 14 + (variant == "head")
        for name in layers:
            assert cfg.quant.is_quantized(in_vllm(f"{name}.qweight")), name
        vision = [n for n in dense if n.startswith("vision_tower.") and n.endswith("proj.weight")]
        assert len(vision) == 2 * 4  # q, k, v and out of both tower layers
        for name in vision:
            assert not cfg.quant.is_quantized(in_vllm(name)), name
        # vLLM's fused layers, by the names vLLM gives them.
        tower_qkv = cfg.checkpoint_names("vision_tower.vision_model.encoder.layers.0.self_attn.qkv_proj")
        decoder_qkv = cfg.checkpoint_names("language_model.model.layers.0.self_attn.qkv_proj")
        assert not any(cfg.quant.is_quantized(n) for n in tower_qkv)
        assert all(cfg.quant.is_quantized(n) for n in decoder_qkv)
        assert cfg.quant.is_quantized("language_model.lm_head") == (variant == "head")


def test_tied_config_with_a_gqsa_output_layer_is_refused(head_checkpoints, tmp_path):
    ckpt = str(tmp_path / "tied")
    shutil.copytree(head_checkpoints["llama"], ckpt)
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["tie_word_embeddings"] = True
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(GQSAFormatError, match="tie_word_embeddings"):
        load_vllm_model(ckpt, port=free_port())


def test_dummy_weights_fill_a_gqsa_output_layer_unpruned(head_checkpoints, tmp_path):
    """``--load-format dummy`` (the speed benchmarks) fills the output layer as gqsa-convert
    --quantize-output-layer does by default, unpruned, and the decoder layers at the sparsity."""
    ckpt = str(tmp_path / "config-only")
    shutil.copytree(head_checkpoints["llama"], ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    model, _ = load_vllm_model(ckpt, port=free_port(), load_format="dummy")
    assert model.lm_head.gqsa_nnz == 258 * 128 // 16  # every group of the vocabulary's rows
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.gqsa_nnz == pytest.approx(256 * 128 // 16 * 0.5, rel=0.1)


def test_dense_output_layer_under_a_gqsa_name_is_refused(head_checkpoints, tmp_path):
    """config.json says the output layer is GQSA, the weights hold a dense one: loading stops and
    names it (vLLM's loader finds no parameter for ``lm_head.weight``)."""
    from safetensors.torch import load_file, save_file

    ckpt = str(tmp_path / "dense-head")
    shutil.copytree(head_checkpoints["llama"], ckpt)
    path = os.path.join(ckpt, "model.safetensors")
    sd = {k: v for k, v in load_file(path).items() if not k.startswith("lm_head.")}
    sd["lm_head.weight"] = torch.zeros(258, 128)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_vllm_model(ckpt, port=free_port())


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_output_layer_ranks_combine_to_the_logits(world_size, head_checkpoints, tmp_path):
    ckpt = head_checkpoints["llama"]
    x = torch.randn(3, 128)
    ranks = run_tp(ckpt, world_size, tmp_path, {"lm_head": x})
    outs = [r["lm_head"] for r in ranks]
    # Each rank computes its share of the 320 padded rows; the vocabulary is their first 258.
    assert all(o.shape == (3, 320 // world_size) for o in outs)
    got = torch.cat(outs, -1)
    torch.testing.assert_close(got[:, :258], x @ head_reference(ckpt).T, rtol=1e-4, atol=1e-4)
    assert not got[:, 258:].any()


@pytest.mark.slow
@pytest.mark.parametrize("stages, world_size", [(2, 2), (2, 4)], ids=["pp2", "pp2-tp2"])
def test_pipeline_stages_serve_each_layer_once(stages, world_size, head_checkpoints, tmp_path):
    """Pipeline parallelism: each stage loads and serves only its own decoder layers (the last
    one the GQSA output layer too), which together are the whole model's, with its outputs."""
    ckpt = head_checkpoints["llama"]
    full, _ = load_vllm_model(ckpt, port=free_port())
    layers = linear_layers(full)
    torch.manual_seed(2)
    inputs = {n: torch.randn(3, l.input_size) for n, l in layers.items()}
    inputs["lm_head"] = torch.randn(3, 128)
    with torch.no_grad():
        expected = {n: l(inputs[n])[0] for n, l in layers.items()}
    expected["lm_head"] = inputs["lm_head"] @ head_reference(ckpt).T
    ranks = run_tp(ckpt, world_size, tmp_path, inputs, pipeline_stages=stages)
    per_stage = world_size // stages
    held = [set(r) for r in ranks[::per_stage]]  # the first rank of each stage
    assert all(set(r) == held[i // per_stage] for i, r in enumerate(ranks))  # the same in a stage
    assert not held[0] & held[1] and held[0] | held[1] == set(expected)
    assert "lm_head" in held[-1] and "model.layers.0.self_attn.qkv_proj" in held[0]
    for stage in range(stages):
        outs = ranks[stage * per_stage:(stage + 1) * per_stage]
        for name in held[stage]:
            parts = [o[name] for o in outs]
            if name == "lm_head":
                got = torch.cat(parts, -1)[:, :258]
            elif name.endswith(("o_proj", "down_proj")) or per_stage == 1:
                got = parts[0]
            else:
                got = combine_column_shards(name, parts, ckpt)
            torch.testing.assert_close(got, expected[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_tensor_parallel_cuts_row_blocks_into_single_rows(tiny_models, tmp_path):
    """With 64-row blocks, two ranks get 32 of k_proj's and v_proj's 64 rows each: those shards
    are cut into single rows, and the rank's fused qkv_proj (q keeps its blocks) with them."""
    from converters.convert import ConvertOptions, convert

    ckpt = str(tmp_path / "r64")
    convert(tiny_models["llama"], ckpt, ConvertOptions(block_rows=64, n_samples=2, seq_len=16))
    full = check_tensor_parallel(ckpt, 2, tmp_path, seed=3)
    assert full.model.layers[0].self_attn.qkv_proj.gqsa_block_rows == 64


@pytest.mark.slow
def test_tensor_parallel_refuses_split_inside_a_group(tiny_models, tmp_path):
    from converters.convert import ConvertOptions, convert

    ckpt = str(tmp_path / "g64")
    convert(tiny_models["llama"], ckpt, ConvertOptions(group_size=64, n_samples=2, seq_len=16))
    with pytest.raises(RuntimeError, match="input size per rank 32 .* group size 64; reduce "
                                           "tensor_parallel_size"):
        run_tp(ckpt, 4, tmp_path, {})


def broken_copy(src: str, dst, mutate) -> str:
    shutil.copytree(src, dst)
    from safetensors.torch import load_file, save_file

    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)
    return str(dst)


def test_out_of_range_index_fails_loading_with_the_layer_name(tiny_checkpoints, tmp_path):
    def mutate(t):
        t["model.layers.1.mlp.up_proj.col_idx"][3] = 200

    ckpt = broken_copy(tiny_checkpoints["llama"], tmp_path / "bad", mutate)
    with pytest.raises(GQSAFormatError, match=r"model.layers.1.mlp.up_proj: col_idx\[3\] = 200 is out "
                                              r"of range \[0, 8\)"):
        load_vllm_model(ckpt, port=free_port())


def test_missing_tensor_fails_loading(tiny_checkpoints, tmp_path):
    ckpt = broken_copy(tiny_checkpoints["llama"], tmp_path / "bad",
                       lambda t: t.pop("model.layers.0.self_attn.k_proj.scales"))
    with pytest.raises(GQSAFormatError, match="model.layers.0.self_attn.k_proj: the checkpoint lacks scales"):
        load_vllm_model(ckpt, port=free_port())


def test_bf16_model_stays_bf16(tiny_checkpoints):
    model, _ = load_vllm_model(tiny_checkpoints["llama"], port=free_port(), dtype="bfloat16")
    refs = reference_weights(tiny_checkpoints["llama"], model)
    with torch.no_grad():
        for name, layer in linear_layers(model).items():
            x = torch.randn(4, layer.input_size, dtype=torch.bfloat16)
            y = layer(x)
            y = y[0] if isinstance(y, tuple) else y
            assert y.dtype == torch.bfloat16, name
            w, _ = refs[name]
            torch.testing.assert_close(y.float(), x.float() @ w.T, rtol=0.02, atol=0.02, msg=name)


def test_dummy_weights_in_the_pair_pattern_take_the_sparse_tensor_core_path(tiny_checkpoints, tmp_path):
    """A config with ``pattern: pairs`` gets dummy layers in the pair pattern, which the loader
    detects for the sparse-tensor-core kernel; a groups config does not."""
    for pattern in ("pairs", "groups"):
        ckpt = str(tmp_path / pattern)
        shutil.copytree(tiny_checkpoints["llama"], ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
        with open(os.path.join(ckpt, "config.json")) as f:
            config = json.load(f)
        config["quantization_config"].update(pattern=pattern, sparsity=0.5)
        with open(os.path.join(ckpt, "config.json"), "w") as f:
            json.dump(config, f)
        model, _ = load_vllm_model(ckpt, port=free_port(), load_format="dummy")
        for name, layer in linear_layers(model).items():
            assert layer.gqsa_pairs == (pattern == "pairs"), name
            if pattern == "pairs":
                assert layer.gqsa_nnz == layer.gqsa_n_out * layer.input_size // 32, name


@pytest.mark.parametrize("bits,block_rows,path", [(2, 2, "reference"), (4, 2, "kernel_format"),
                                                  (4, 64, "kernel_format")])
def test_other_formats_load_and_match_the_reference(tiny_models, tmp_path, bits, block_rows, path):
    """2-bit layers serve through the reference op; 4-bit row blocks are repacked into the CUDA
    kernels' format (single rows), which on the CPU is decoded in torch. Row blocks of 64 give
    compact tiles (``xcols``) where they save the tensor-core kernel chunks: here down_proj, whose
    1024 inputs make 4 chunks of channels."""
    from converters.convert import ConvertOptions, convert
    from converters.tiny import build_tiny_model

    model_dir = tiny_models["llama"]
    if block_rows == 64:
        model_dir = build_tiny_model(str(tmp_path / "wide-mlp"), intermediate_size=1024)
    ckpt = str(tmp_path / f"w{bits}r{block_rows}")
    convert(model_dir, ckpt, ConvertOptions(bits=bits, block_rows=block_rows, n_samples=2, seq_len=16))
    model, _ = load_vllm_model(ckpt, port=free_port())
    refs = reference_weights(ckpt, model)
    with torch.no_grad():
        for name, layer in linear_layers(model).items():
            assert layer.gqsa_kernel == path, name
            assert hasattr(layer, "xcols") == (block_rows == 64 and "down_proj" in name), name
            x = torch.randn(3, layer.input_size)
            torch.testing.assert_close(layer(x)[0], x @ refs[name][0].T, rtol=1e-4, atol=1e-4, msg=name)
