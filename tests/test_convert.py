# SPDX-License-Identifier: Apache-2.0
"""gqsa-convert end to end on tiny random models, and its errors."""

import glob
import json
import os
import tempfile

import pytest
from conftest import OTHER_FAMILIES, interrupt_solver, tiny_model_and_checkpoint
import torch

from converters import convert as convert_mod
from converters.cli import main as cli_main
from converters.convert import COMPLETE_MARKER, ConvertError, ConvertOptions, convert
from converters.reference_model import load_reference_model
from converters.tiny import build_tiny_model
from vllm_gqsa.checkpoint import iter_tensors, read_quant_config, split_gqsa_tensors
from vllm_gqsa.format import GQSALayer, is_pair_pattern
from vllm_gqsa.reference import gqsa_linear


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", *OTHER_FAMILIES])
def test_checkpoint_validates_and_logits_match_reference(arch, request):
    from transformers import AutoModelForCausalLM

    dense_dir, ckpt = tiny_model_and_checkpoint(request, arch)
    qcfg = read_quant_config(ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "gqsa"
    layers, dense = split_gqsa_tensors(dict(iter_tensors(ckpt)), qcfg)
    assert len(layers) == 2 * (4 if arch == "phi3" else 7)  # every linear of both blocks (Phi-3's fused)
    assert not any(n.endswith("proj.weight") for n in dense)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in dense

    ref = load_reference_model(ckpt, torch.float32)
    # The same model computing every linear through reference.gqsa_linear on the packed layers.
    via_ops = load_reference_model(ckpt, torch.float32)
    modules = dict(via_ops.named_modules())
    for name, parts in layers.items():
        lin = modules[name]
        packed = GQSALayer.from_tensors(parts, lin.out_features, lin.in_features, qcfg.layer_format(), name)
        lin.forward = (lambda x, p=packed, b=lin.bias: gqsa_linear(x, p, b))
    ids = torch.randint(0, 258, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(via_ops(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)(ids).logits
        cos = torch.nn.functional.cosine_similarity(ref(ids).logits.flatten(), dense.flatten(), dim=0)
    # Half the groups are gone, but the model is still the same model (an unrelated one would be
    # near 0). Norms after each attention and MLP rescale the random branches to the size of the
    # residual stream, so the pruning moves those random models' logits more than a random
    # Llama's: Gemma's (norms before and after) and more so OLMo 3's and EXAONE 4's (after only).
    print(arch, "cosine similarity of the logits to the dense model's", float(cos))
    assert cos > {"gemma2": 0.2, "gemma3": 0.2, "olmo3": 0.1, "exaone4": 0.1}.get(arch, 0.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma3", "gemma3_mm", *OTHER_FAMILIES])
def test_blocks_replayed_with_their_recorded_inputs_give_the_models_output(arch, tmp_path):
    """The converter runs the model block by block, each block with the arguments the model gives
    it. Gemma 3's sliding and full attention layers get different masks and rotary tables (its
    tiny model's window is shorter than the samples), so replaying every block with block 0's
    arguments would not reproduce the model. The image-text Gemma 3 runs its decoder on text."""
    from transformers import AutoModelForCausalLM

    from converters.convert import _block_inputs, _run_block, _to
    from converters.layout import decoder

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / arch), arch=arch, num_layers=3),
                                                 dtype=torch.float32).eval()
    _, dec = decoder(model)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inputs, block_kwargs = _block_inputs(model, ids, "cpu")
        block_kwargs = _to(block_kwargs, "cpu", torch.float32)
        for block, kwargs in zip(dec.layers, block_kwargs):
            inputs = _run_block(block, inputs, kwargs, 2)
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(dec.norm(torch.cat(inputs)), expected, rtol=1e-5, atol=1e-5)
    if arch.startswith("gemma3"):
        assert block_kwargs[0] is not block_kwargs[1] and block_kwargs[0] is block_kwargs[2]


def test_w4_without_sparsity_stays_close_to_dense(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "w4")
    report = convert(tiny_models["llama"], out, ConvertOptions(sparsity=0.0, n_samples=8, seq_len=64))
    assert report["kept_group_fraction"] == 1.0
    ids = torch.randint(0, 258, (1, 50))
    with torch.no_grad():
        q = load_reference_model(out, torch.float32)(ids).logits
        d = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)(ids).logits
    assert torch.nn.functional.cosine_similarity(q.flatten(), d.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_output_layer_converted_and_untied_from_a_dense_embedding(arch, tiny_models, head_checkpoints):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vllm_gqsa.reference import dequantize

    ckpt = head_checkpoints[arch]
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is False
    assert "lm_head" in config["quantization_config"]["target_modules"]
    qcfg = read_quant_config(ckpt)
    layers, dense = split_gqsa_tensors(dict(iter_tensors(ckpt)), qcfg)
    assert "lm_head" in layers and "lm_head.weight" not in dense
    original = load_file(os.path.join(tiny_models[arch], "model.safetensors"))
    # The embedding is a lookup table: it stays as it was, also where the head was tied to it.
    torch.testing.assert_close(dense["model.embed_tokens.weight"], original["model.embed_tokens.weight"],
                               rtol=0, atol=0)
    with open(os.path.join(ckpt, COMPLETE_MARKER)) as f:
        entry = [r for r in json.load(f)["layers"] if r["name"] == "lm_head"]
    assert len(entry) == 1 and entry[0]["shape"] == [258, 128]
    with open(os.path.join(ckpt, "README.md")) as f:
        assert "The output layer (`lm_head`) is converted too" in f.read()
    kept = {"llama": 0.5, "gemma3": 1.0}[arch]  # --output-layer-sparsity 0.5 and 0
    assert entry[0]["kept_groups"] / (258 * 128 // 16) == pytest.approx(kept, abs=0.01)

    ref = load_reference_model(ckpt, torch.float32)
    head = GQSALayer.from_tensors(layers["lm_head"], 258, 128, qcfg.layer_format(), "lm_head")
    torch.testing.assert_close(ref.lm_head.weight, dequantize(head, torch.float32))
    dense_head = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).lm_head.weight
    assert not torch.equal(ref.model.embed_tokens.weight, ref.lm_head.weight)
    # On the same hidden states, the quantized head's logits against the dense head's: quantized
    # only (Gemma), nearly the same; half pruned (Llama), the same model still.
    h = ref.model(torch.randint(0, 258, (2, 40))).last_hidden_state.detach()
    cos = torch.nn.functional.cosine_similarity((h @ ref.lm_head.weight.T).flatten(),
                                                (h @ dense_head.T).flatten(), dim=0)
    assert cos > {"llama": 0.7, "gemma3": 0.99}[arch]


@pytest.mark.parametrize("variant", ["decoder", "head"])
def test_image_text_model_converts_its_decoder_and_keeps_its_image_parts(variant, image_text_checkpoints):
    """Gemma 3 of 4B and more reads images: gqsa-convert converts its text decoder (and, if asked,
    its output layer), keeps the vision tower and projector as they were, and writes every tensor
    under the model's own checkpoint names, which vLLM reads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dense_dir, ckpt = image_text_checkpoints["dense"], image_text_checkpoints[variant]
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    q = config["quantization_config"]
    assert q["modules_to_not_convert"] == ["multi_modal_projector", "vision_tower"]
    head = variant == "head"
    assert ("lm_head" in q["target_modules"]) == head
    assert config["tie_word_embeddings"] is not head and config["text_config"]["tie_word_embeddings"] is not head
    for f in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(ckpt, f)), f

    qcfg = read_quant_config(ckpt)
    layers, dense = split_gqsa_tensors(dict(iter_tensors(ckpt)), qcfg)
    source = load_file(os.path.join(dense_dir, "model.safetensors"))
    decoder_layers = {f"language_model.model.layers.{b}.{m}" for b in range(2)
                      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(layers) == decoder_layers | ({"lm_head"} if head else set())
    # Every dense tensor under its source name, unchanged: the image parts, the embedding, the norms.
    assert set(dense) == {n for n in source if n.rsplit(".", 1)[0] not in layers and n != "lm_head.weight"}
    for name, t in dense.items():
        assert torch.equal(t, source[name]), name
    assert any(n.startswith("vision_tower.vision_model.") for n in dense)
    with open(os.path.join(ckpt, "README.md")) as f:
        assert "multi_modal_projector, vision_tower" in f.read()

    ref = load_reference_model(ckpt, torch.float32)
    ids = torch.randint(0, 258, (2, 40))
    with torch.no_grad():
        quantized = ref(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)(input_ids=ids).logits
        # The image features (after the tower and projector) are the dense model's, bit for bit.
        pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        features = ref.model.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(features, AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
                                   .model.get_image_features(pixel_values=pixels).pooler_output, rtol=0, atol=0)
        assert not torch.allclose(features[0], features[1], atol=1e-3)  # and they see the image
    cos = torch.nn.functional.cosine_similarity(quantized.flatten(), original.flatten(), dim=0)
    assert cos > 0.2  # the same model still; a random Gemma moves most under pruning (see above)


def test_image_text_decoder_converts_exactly_as_the_same_decoder_alone(image_text_checkpoints, tmp_path):
    """The image-text model's decoder, taken out as a Gemma 3 text model, converts to the same
    bits: calibration, solver, BQPO and E2E-OQP see the same decoder through either model."""
    import shutil

    from safetensors.torch import load_file, save_file

    dense = image_text_checkpoints["dense"]
    text = tmp_path / "text"
    text.mkdir()
    with open(os.path.join(dense, "config.json")) as f:
        config = json.load(f)
    with open(text / "config.json", "w") as f:
        json.dump({**config["text_config"], "architectures": ["Gemma3ForCausalLM"], "dtype": config["dtype"]}, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(dense, name), text)
    lm = "language_model."
    source = load_file(os.path.join(dense, "model.safetensors"))
    save_file({k[len(lm):]: v for k, v in source.items() if k.startswith(lm)}, str(text / "model.safetensors"),
              metadata={"format": "pt"})
    convert(str(text), str(tmp_path / "text-gqsa"), ConvertOptions(n_samples=8, seq_len=64, batch_size=4))
    alone = load_file(str(tmp_path / "text-gqsa" / "model.safetensors"))
    inside = load_file(os.path.join(image_text_checkpoints["decoder"], "model.safetensors"))
    assert any(k.endswith(".qweight") for k in alone)
    for name, t in alone.items():
        assert torch.equal(inside[lm + name], t), name


def test_output_layer_options_are_checked(tiny_models, tmp_path):
    with pytest.raises(ConvertError, match="--output-layer-sparsity"):
        convert(tiny_models["llama"], str(tmp_path / "a"),
                ConvertOptions(quantize_output_layer=True, output_layer_sparsity=1.0))
    with pytest.raises(ConvertError, match="vocab_size.*258.*--block-rows 4"):
        convert(tiny_models["llama"], str(tmp_path / "b"), ConvertOptions(quantize_output_layer=True,
                                                                          block_rows=4))
    # vLLM's Gemma 2 requires its output layer tied to the embedding: refused before any work.
    gemma2 = build_tiny_model(str(tmp_path / "gemma2"), arch="gemma2")
    with pytest.raises(ConvertError, match="Gemma2ForCausalLM only with its output layer tied"):
        convert(gemma2, str(tmp_path / "c"), ConvertOptions(quantize_output_layer=True))
    assert not os.path.exists(tmp_path / "c")
    # Without the option nothing changes, and partial folders of earlier releases still resume.
    assert "quantize_output_layer" not in ConvertOptions().fingerprint()
    assert "lm_head" not in ConvertOptions().quant_config().target_modules


def test_report_counts_bits_per_weight(tiny_checkpoints):
    with open(os.path.join(tiny_checkpoints["llama"], COMPLETE_MARKER)) as f:
        report = json.load(f)
    assert report["kept_group_fraction"] == pytest.approx(0.5, abs=0.01)
    assert 2.5 < report["bits_per_weight_quantized_layers"] < 3.5
    assert report["checkpoint_bytes"] < report["dense_bytes"]
    # The process held at least the dense model while converting it.
    assert report["peak_memory"]["host_bytes"] > report["dense_bytes"]
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_threads"] == torch.get_num_threads()
    assert env["transformers"] and env["cpu"] and "gpu" not in env
    with open(os.path.join(tiny_checkpoints["llama"], "README.md")) as f:
        card = f.read()
    assert "GiB host" in card and f"torch {torch.__version__}, transformers" in card


@pytest.mark.parametrize("group_size,block_rows", [(32, 1), (64, 2), (128, 1)])
def test_other_group_sizes(tiny_models, tmp_path, group_size, block_rows):
    out = str(tmp_path / "ckpt")
    report = convert(tiny_models["llama"], out, ConvertOptions(group_size=group_size, block_rows=block_rows,
                                                               n_samples=4, seq_len=32))
    load_reference_model(out)  # validates every layer
    assert report["kept_group_fraction"] == pytest.approx(0.5, abs=0.01)


def test_cli_errors_are_clear(tiny_models, tmp_path, capsys):
    assert cli_main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([tiny_models["llama"], str(tmp_path / "o"), "--bits", "3"]) == 2
    assert "bits=3 is not supported" in capsys.readouterr().err
    assert cli_main([tiny_models["llama"], str(tmp_path / "o"), "--group-size", "48"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    os.makedirs(tmp_path / "exists")
    assert cli_main([tiny_models["llama"], str(tmp_path / "exists")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, tiny_models):
    import shutil

    src = tmp_path / "gpt2"
    shutil.copytree(tiny_models["llama"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="unsupported architecture 'GPT2LMHeadModel'"):
        convert(str(src), str(tmp_path / "o"), ConvertOptions())


def test_group_size_must_divide_hidden(tmp_path):
    src = build_tiny_model(str(tmp_path / "m"), hidden_size=144, intermediate_size=288)
    with pytest.raises(ConvertError, match="hidden_size = 144 is not a multiple of --group-size 32"):
        convert(src, str(tmp_path / "o"), ConvertOptions(group_size=32))


def pair_pattern_layers(ckpt) -> dict[str, bool]:
    """Whether each converted layer of the checkpoint keeps one group of each aligned pair."""
    qcfg, report = read_quant_config(ckpt), json.load(open(os.path.join(ckpt, COMPLETE_MARKER)))
    layers, _ = split_gqsa_tensors(dict(iter_tensors(ckpt)), qcfg)
    shapes = {r["name"]: r["shape"] for r in report["layers"]}
    return {name: is_pair_pattern(parts["row_ptr"], parts["col_idx"], shapes[name][1] // qcfg.group_size)
            for name, parts in layers.items()}


def test_pairs_pattern_converts_every_layer_into_pairs(tiny_models, tiny_checkpoints, tmp_path, capsys):
    # --sparsity left out: the pattern's 0.5. Both training stages keep the pruning pattern.
    out = tmp_path / "pairs"
    assert cli_main([tiny_models["llama"], str(out), "--n-samples", "4", "--seq-len", "16",
                     "--bqpo-epochs", "1", "--e2e-epochs", "1", "--val-samples", "2", "--pattern", "pairs",
                     "-q"]) == 0
    assert "(block_rows 1, pattern pairs)" in capsys.readouterr().out
    report = json.loads((out / COMPLETE_MARKER).read_text())
    q = report["quantization_config"]
    assert q["pattern"] == "pairs" and q["sparsity"] == 0.5
    assert report["kept_group_fraction"] == 0.5
    assert report["training"]["bqpo"]["blocks"] and report["training"]["e2e"]
    pairs = pair_pattern_layers(str(out))
    assert len(pairs) == 14 and all(pairs.values()), pairs
    load_reference_model(str(out))
    # Row blocks too, and --sparsity 0.5 said out loud is no contradiction.
    assert cli_main([tiny_models["llama"], str(tmp_path / "r4"), *QUICK_ARGS, "-q", "--pattern", "pairs",
                     "--sparsity", "0.5", "--block-rows", "4"]) == 0
    assert all(pair_pattern_layers(str(tmp_path / "r4")).values())
    # The default is the free pattern, and partial folders of earlier releases still resume.
    assert "pattern" not in ConvertOptions().fingerprint()
    assert ConvertOptions(pattern="pairs").fingerprint()["pattern"] == "pairs"
    default = json.loads(open(os.path.join(tiny_checkpoints["llama"], "config.json")).read())
    assert default["quantization_config"]["pattern"] == "groups"
    assert not all(pair_pattern_layers(tiny_checkpoints["llama"]).values())


def test_pairs_pattern_errors_are_clear(tiny_models, tmp_path, capsys):
    assert cli_main([tiny_models["llama"], str(tmp_path / "o"), "--pattern", "pairs",
                     "--sparsity", "0.3"]) == 2
    err = capsys.readouterr().err
    assert ("error: --pattern pairs prunes exactly one group of every two (sparsity 0.5), "
            "not --sparsity 0.3") in err
    # 144 = 9 groups of 16: the last group of each row would have no partner.
    src = build_tiny_model(str(tmp_path / "m"), hidden_size=144, intermediate_size=288)
    with pytest.raises(ConvertError, match=r"hidden_size = 144 \(the input size of some layers\) is not a "
                                           r"multiple of 2 \* --group-size = 32, which --pattern pairs needs"):
        convert(src, str(tmp_path / "o"), ConvertOptions(pattern="pairs"))
    assert convert(src, str(tmp_path / "o"), ConvertOptions(**QUICK))  # the free pattern takes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "o"]


def test_quantized_input_is_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(ConvertError, match="already quantized"):
        convert(tiny_checkpoints["llama"], str(tmp_path / "o"), ConvertOptions())


def test_interrupted_conversion_leaves_no_checkpoint(tiny_models, tmp_path, monkeypatch):
    calls = []

    def failing_solve(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = convert_mod.solve_layer
    monkeypatch.setattr(convert_mod, "solve_layer", failing_solve)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_models["llama"], str(out), ConvertOptions(n_samples=4, seq_len=32))
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert all(not (p / COMPLETE_MARKER).exists() for p in leftovers)


def test_resume_continues_and_matches_an_uninterrupted_run(tiny_models, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    opts = dict(n_samples=4, seq_len=32)
    convert(tiny_models["llama"], str(tmp_path / "whole"), ConvertOptions(**opts))

    real = convert_mod.solve_layer
    calls = interrupt_solver(monkeypatch, convert_mod, 10)  # inside block 1, after block 0 was saved
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_models["llama"], str(out), ConvertOptions(**opts))
    assert not out.exists()

    calls.clear()
    monkeypatch.setattr(convert_mod, "solve_layer", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with pytest.raises(ConvertError, match="cannot resume"):
        convert(tiny_models["llama"], str(out), ConvertOptions(**opts, sparsity=0.4, resume=True))
    convert(tiny_models["llama"], str(out), ConvertOptions(**opts, resume=True))
    assert len(calls) == 7  # only block 1 was converted again
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (out / "progress.json").exists() and not (out / "blocks").exists()


def test_full_disk_fails_early(tiny_models, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    with pytest.raises(ConvertError, match="not enough free disk space"):
        convert(tiny_models["llama"], str(tmp_path / "o"), ConvertOptions())


def test_unwritable_output_fails_early(tiny_models, tmp_path, monkeypatch):
    calls = interrupt_solver(monkeypatch, convert_mod, 1)  # the solver must never be reached
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConvertError, match="cannot write to .*a_file"):
        convert(tiny_models["llama"], str(blocker / "ckpt"), ConvertOptions())
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConvertError, match="cannot write to .*locked"):
            convert(tiny_models["llama"], str(locked / "ckpt"), ConvertOptions())
    assert not calls


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_architectures_convert(arch, tmp_path):
    src = build_tiny_model(str(tmp_path / arch), arch=arch)
    out = str(tmp_path / "ckpt")
    report = convert(src, out, ConvertOptions(n_samples=4, seq_len=32))
    assert report["quantized_layers"] == 14
    model = load_reference_model(out)
    assert torch.isfinite(model(torch.randint(0, 258, (1, 16))).logits).all()


def make_hub_cache(root, repo_id: str, model_dir: str) -> None:
    """The layout huggingface_hub gives a downloaded repository, for offline tests."""
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def test_hub_model_id_from_the_offline_cache(tiny_models, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    make_hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_models["llama"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "ckpt"
    assert cli_main(["acme/tiny-llama", str(out), "--n-samples", "2", "--seq-len", "16", "-q"]) == 0
    card = (out / "README.md").read_text()
    assert "GQSA W4 S50% g16" in card and "bits per weight" in card
    assert cli_main(["acme/not-cached", str(tmp_path / "o2")]) == 2
    assert "'acme/not-cached' is no local folder, and cannot get it" in capsys.readouterr().err
    assert cli_main(["acme/tiny-llama", str(tmp_path / "o3"), "--push-to-hub", "acme/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_push_to_hub_failures_are_reported_without_a_traceback(tiny_models, tmp_path, monkeypatch, capsys):
    """--push-to-hub checks the login before converting (a Hub it cannot reach here: nothing is
    converted), and an upload that fails after the conversion names the finished checkpoint."""
    from huggingface_hub import constants

    from converters import cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "ckpt"
    assert cli_main([tiny_models["llama"], str(out), *QUICK_ARGS, "-q", "--push-to-hub", "acme/x"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub: the Hugging Face Hub did not accept this machine's login" in err, err
    assert "Traceback" not in err and not out.exists()
    # A login that passed the check, and an upload that fails later.
    monkeypatch.setattr(cli, "check_can_push", lambda: None)
    assert cli_main([tiny_models["llama"], str(out), *QUICK_ARGS, "-q", "--push-to-hub", "acme/x"]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint is written to {out}, but uploading it to acme/x failed" in err, err
    assert "Traceback" not in err and (out / "gqsa_report.json").exists()


# Fast settings for tests about what the converter refuses or writes, not about accuracy.
QUICK = dict(n_samples=4, seq_len=16, bqpo_epochs=0, e2e_epochs=0)
QUICK_ARGS = ["--n-samples", "4", "--seq-len", "16", "--bqpo-epochs", "0", "--e2e-epochs", "0"]


def tensor_names(folder) -> list[str]:
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("arch", ["gemma3", "gemma3_mm"])
def test_output_layer_tied_by_default_is_not_stored(arch, tmp_path):
    """Gemma 3 ties its output layer where config.json does not say (the class's default): the
    checkpoint leaves it out, as for an explicit tie (it crashed in safetensors, "Some tensors
    share memory", at the very end)."""
    import shutil

    src = tmp_path / "dense"
    shutil.copytree(build_tiny_model(str(tmp_path / "tied"), arch=arch), src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["tie_word_embeddings"]  # the image-text model's text_config keeps its own
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ckpt"
    report = convert(str(src), str(out), ConvertOptions(**QUICK))
    names = tensor_names(out)
    assert any(n.endswith("embed_tokens.weight") for n in names)
    assert not any(n.startswith("lm_head.") for n in names)
    # The dense model's output layer is its embedding: counted once, as in its own file.
    assert report["dense_bytes"] <= os.path.getsize(src / "model.safetensors")
    load_reference_model(str(out))


def test_output_layer_quantized_and_skipped_is_refused(tiny_models, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConvertError, match="--quantize-output-layer and --skip lm_head"):
        convert(tiny_models["llama"], str(out), ConvertOptions(**QUICK, quantize_output_layer=True,
                                                               skip_modules=("lm_head",)))
    with pytest.raises(ConvertError, match="--output-layer-sparsity applies only with --quantize-output-layer"):
        convert(tiny_models["llama"], str(out), ConvertOptions(**QUICK, output_layer_sparsity=0.5))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_training_skips_what_is_left_dense(tiny_models, tmp_path):
    """BQPO passes over a block left dense whole, and E2E-OQP over a model left dense whole."""
    opts = dict(n_samples=4, seq_len=16, val_samples=2)
    report = convert(tiny_models["llama"], str(tmp_path / "block"),
                     ConvertOptions(**opts, skip_modules=("model.layers.0",), bqpo_epochs=1, e2e_epochs=1))
    assert [r["block"] for r in report["training"]["bqpo"]["blocks"]] == [1]
    assert "e2e" in report["training"]
    assert not any(r["name"].startswith("model.layers.0.") for r in report["layers"])
    report = convert(tiny_models["llama"], str(tmp_path / "all"),
                     ConvertOptions(**opts, skip_modules=("model",), bqpo_epochs=1, e2e_epochs=1))
    assert report["quantized_layers"] == 0 and "e2e" not in report["training"]
    assert report["training"]["bqpo"]["blocks"] == []
    load_reference_model(str(tmp_path / "all"))


def test_cli_refuses_bad_input_without_a_traceback(tiny_models, tmp_path, capsys):
    """Each bad input is one `error:` line and exit status 2, and leaves no partial folder."""
    empty, short, binary = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "binary.txt"
    empty.write_text("")
    short.write_text("hello")
    binary.write_bytes(b"\xff\xfe\x00text")
    out = tmp_path / "out"
    for args, message in [
        (["--calib-data", str(empty)], "has 0 tokens, fewer than one sample of 16"),
        (["--calib-data", str(short)], "has 5 tokens, fewer than one sample of 16"),
        (["--calib-data", str(binary)], "is not UTF-8 text"),
        (["--batch-size", "0"], "--batch-size 0 must be 1 or more"),
        (["--device", "cuda:99"], "--device cuda:99: this machine has"),
        (["--device", "foo"], "unknown --device 'foo'"),
    ]:
        assert cli_main([tiny_models["llama"], str(out), *QUICK_ARGS, *args]) == 2, args
        err = capsys.readouterr().err
        assert "gqsa-convert: error: " in err and message in err and "Traceback" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "empty.txt", "short.txt"], args
    if not torch.cuda.is_available():
        assert cli_main([tiny_models["llama"], str(out), "--device", "cuda"]) == 2
        assert "--device cuda: this machine has 0 CUDA GPU(s)" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("truncated weights", "cannot load the model in"),
    ("no weights", "cannot load the model in"),
    ("config not JSON", "config.json is not valid JSON"),
    ("config a list", "config.json holds a JSON list, not an object"),
])
def test_cli_refuses_a_damaged_model_folder(damage, message, tiny_models, tmp_path, capsys):
    """Damaged input folders are one `error:` line, not a traceback, and leave nothing behind."""
    import shutil

    dense = str(tmp_path / "dense")
    shutil.copytree(tiny_models["llama"], dense)
    weights = os.path.join(dense, "model.safetensors")
    if damage == "truncated weights":
        os.truncate(weights, os.path.getsize(weights) // 2)
    elif damage == "no weights":
        os.remove(weights)
    else:
        with open(os.path.join(dense, "config.json"), "w") as f:
            f.write("{" if damage == "config not JSON" else "[1]")
    assert cli_main([dense, str(tmp_path / "out"), *QUICK_ARGS]) == 2
    err = capsys.readouterr().err
    assert "gqsa-convert: error: " in err and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cli_refuses_weights_that_are_not_finite(value, tmp_path, capsys):
    """A damaged model (a NaN or an infinity in one weight) is refused, naming the tensor, instead
    of becoming a checkpoint that validates and computes garbage."""
    from safetensors.torch import load_file, save_file

    dense = build_tiny_model(str(tmp_path / "dense"), arch="llama")
    weights = load_file(os.path.join(dense, "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, os.path.join(dense, "model.safetensors"), metadata={"format": "pt"})
    assert cli_main([dense, str(tmp_path / "out"), *QUICK_ARGS]) == 2
    err = capsys.readouterr().err
    assert ("error: model.layers.1.mlp.down_proj.weight holds 1 non-finite value(s)" in err
            and "Traceback" not in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no output, no partial folder


def test_resume_publishes_a_checkpoint_finished_before_a_kill(tiny_models, tmp_path, monkeypatch):
    """A run killed while cleaning up after writing its checkpoint (the blocks removed, not yet
    progress.json) leaves a finished partial folder: --resume moves it into place, converting
    nothing."""
    real_remove, out = os.remove, tmp_path / "ckpt"

    def killed_remove(path, *args, **kwargs):
        if str(path).endswith("progress.json"):
            raise KeyboardInterrupt
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(convert_mod.os, "remove", killed_remove)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_models["llama"], str(out), ConvertOptions(**QUICK))
    monkeypatch.setattr(convert_mod.os, "remove", real_remove)
    partial = tmp_path / ".ckpt.partial"
    assert not out.exists() and (partial / COMPLETE_MARKER).exists() and not (partial / "blocks").exists()
    with pytest.raises(ConvertError, match="cannot resume"):  # progress.json still checks the options
        convert(tiny_models["llama"], str(out), ConvertOptions(**QUICK, sparsity=0.4, resume=True))
    calls = interrupt_solver(monkeypatch, convert_mod, 1)  # nothing is converted again
    report = convert(tiny_models["llama"], str(out), ConvertOptions(**QUICK, resume=True))
    assert not calls and not partial.exists()
    assert report == json.loads((out / COMPLETE_MARKER).read_text())
    assert not (out / "progress.json").exists() and not (out / "blocks").exists()
    load_reference_model(str(out))


def test_output_that_is_or_holds_the_input_is_refused(tiny_models, tmp_path):
    import shutil

    src = tmp_path / "wrap" / "llama"
    shutil.copytree(tiny_models["llama"], src)
    for out, what in ((tmp_path / "wrap", "contains"), (src, "is")):
        with pytest.raises(ConvertError, match=f"output .* {what} the input model"):
            convert(str(src), str(out), ConvertOptions(**QUICK, overwrite=True))
        assert (src / "model.safetensors").exists()
    # An output inside the input deletes nothing.
    convert(str(src), str(src / "gqsa"), ConvertOptions(**QUICK))
    load_reference_model(str(src / "gqsa"))
    assert (src / "model.safetensors").exists()


def test_e2e_checkpoint_from_another_folder(tiny_models, tmp_path, monkeypatch, capsys):
    """The report holds the calibration text's absolute path, so E2E-OQP on the checkpoint finds
    it from any folder; its errors are one line, and leave no partial folder."""
    from converters.e2e_checkpoint import main as e2e_main

    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    convert(tiny_models["llama"], str(ckpt), ConvertOptions(**QUICK, calib_data="calib.txt"))
    report = json.loads((ckpt / COMPLETE_MARKER).read_text())
    assert report["calibration"]["data"] == str(tmp_path / "calib.txt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert e2e_main([str(ckpt), str(tmp_path / "bad"), "--device", "foo"]) == 2
    assert "e2e_checkpoint: error: unknown --device 'foo'" in capsys.readouterr().err
    assert e2e_main([str(tmp_path / "nope"), str(tmp_path / "bad")]) == 2
    assert "not a finished GQSA checkpoint" in capsys.readouterr().err
    assert e2e_main([str(ckpt), str(tmp_path), "--overwrite"]) == 2  # would delete the checkpoint
    assert "contains the input model" in capsys.readouterr().err and ckpt.exists()
    assert not any(p.name.startswith((".bad", "bad")) for p in tmp_path.iterdir())
    assert e2e_main([str(ckpt), str(tmp_path / "e2e"), "--e2e-epochs", "1", "--val-samples", "2"]) == 0
    assert json.loads((tmp_path / "e2e" / COMPLETE_MARKER).read_text())["training"]["e2e"]["epochs"] == 1


def test_cli_options_are_honoured_or_refused(tiny_models, image_text_checkpoints, tmp_path, capsys, caplog):
    import logging

    # --demo's own calibration sizes fill in only what is not given.
    out = tmp_path / "demo"
    demo_models = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "gqsa-demo-*")))  # noqa: E731
    before = demo_models()
    assert cli_main(["--demo", str(out), "--seq-len", "16", "--bqpo-epochs", "0", "--e2e-epochs", "0",
                     "-q"]) == 0
    assert demo_models() == before  # the tiny model built for the demo is removed after it
    assert json.loads((out / COMPLETE_MARKER).read_text())["calibration"]["seq_len"] == 16
    assert json.loads((out / COMPLETE_MARKER).read_text())["calibration"]["n_samples"] == 16
    # -q: no progress bars, even where logging was set up before (as pytest does).
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert cli_main([tiny_models["llama"], str(tmp_path / "quiet"), *QUICK_ARGS, "-q"]) == 0
    assert "GQSA blocks" not in capsys.readouterr().err
    # A --skip entry that names nothing is refused, naming it.
    assert cli_main([tiny_models["llama"], str(tmp_path / "typo"), *QUICK_ARGS, "-q",
                     "--skip", "model.layers.0.mlp.down_prj"]) == 2
    err = capsys.readouterr().err
    assert "error: --skip model.layers.0.mlp.down_prj: the model has no module" in err
    assert "such as model.layers.0.mlp.down_proj" in err
    # An image-text model's --skip takes the checkpoint's names, not those in memory.
    with pytest.raises(ConvertError, match="the checkpoint's is language_model.model.layers.0"):
        convert(image_text_checkpoints["dense"], str(tmp_path / "mm"),
                ConvertOptions(**QUICK, skip_modules=("model.language_model.layers.0",)))
    report = convert(image_text_checkpoints["dense"], str(tmp_path / "mm"),
                     ConvertOptions(**QUICK, skip_modules=("language_model.model.layers.0",)))
    assert report["layers"] and not any(".layers.0." in r["name"] for r in report["layers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "mm", "quiet"]
    logging.getLogger("converters").setLevel(logging.NOTSET)  # as before -q set it


def test_publishing_clears_a_folder_left_by_a_run_killed_while_publishing(tiny_models, tmp_path):
    """Publishing renames an existing output to OUT.old, then the new one to OUT: a run killed
    between the two leaves OUT.old, which the next publication removes."""
    (tmp_path / "ckpt.old").mkdir()
    convert(tiny_models["llama"], str(tmp_path / "ckpt"), ConvertOptions(**QUICK))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_calibration_longer_than_the_model_warns(tiny_models, tmp_path, caplog):
    max_positions = json.loads(open(os.path.join(tiny_models["llama"], "config.json")).read())["max_position_embeddings"]
    convert(tiny_models["llama"], str(tmp_path / "long"), ConvertOptions(**{**QUICK, "seq_len": max_positions + 16}))
    assert f"--seq-len {max_positions + 16} is longer than the model's {max_positions} positions" in caplog.text


def test_owl_rule_keeps_the_mean_and_favours_blocks_with_outliers():
    from converters.owl import block_sparsities, outlier_ratio

    s = block_sparsities([0.01, 0.03, None, 0.02], 0.5, 0.08)
    assert s[2] == 0.5  # nothing converted there
    assert sum(s[i] for i in (0, 1, 3)) / 3 == pytest.approx(0.5)
    assert s[1] < s[3] < s[0] and s[0] - s[1] == pytest.approx(0.16)  # the most outliers: the least pruned
    assert block_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    # One weight of 100 equal ones scaled to 10x its input channel's norm: 1% outliers.
    w = torch.ones(10, 10)
    w[3, 4] = 10
    assert outlier_ratio([w], [torch.ones(10)]) == pytest.approx(0.01)
    assert outlier_ratio([w], [torch.ones(10) * 4]) == pytest.approx(0.01)  # scale-free


def test_owl_gives_blocks_their_own_sparsity(tiny_models, tmp_path, capsys):
    from converters.owl import block_sparsities

    out = tmp_path / "owl"
    assert cli_main([tiny_models["llama"], str(out), *QUICK_ARGS, "--owl-lambda", "0.1", "-q"]) == 0
    assert "OWL lambda 0.1)" in capsys.readouterr().out
    report = json.loads((out / COMPLETE_MARKER).read_text())
    per_block = report["owl"]["block_sparsity"]
    assert report["owl"]["lambda"] == 0.1 and len(per_block) == 2 and per_block[0] != per_block[1]
    assert sum(per_block) / 2 == pytest.approx(0.5, abs=1e-4)
    assert per_block == [round(s, 4) for s in block_sparsities(
        [0.0, 1.0] if per_block[0] > per_block[1] else [1.0, 0.0], 0.5, 0.1)]  # two blocks: 0.5 -+ 0.1
    for r in report["layers"]:  # every layer pruned at its block's sparsity
        block = int(r["name"].split(".layers.")[1].split(".")[0])
        total = r["shape"][0] * r["shape"][1] // 16
        assert r["kept_groups"] / total == pytest.approx(1 - per_block[block], abs=0.02), r
    load_reference_model(str(out))
    # Off by default, and kept out of the resume fingerprint then (older partial folders resume).
    assert "owl_lambda" not in ConvertOptions().fingerprint()
    assert ConvertOptions(owl_lambda=0.08).fingerprint()["owl_lambda"] == 0.08
    assert "owl" not in json.loads(open(os.path.join(tiny_models["llama"], "config.json")).read())


@pytest.mark.parametrize("args, message", [
    (["--owl-lambda", "-0.1"], "--owl-lambda -0.1 must be 0 (off) or more"),
    (["--owl-lambda", "0.3"], "--owl-lambda 0.3 could move a block's sparsity by up to 0.6"),
    (["--owl-lambda", "0.08", "--pattern", "pairs"], "--pattern pairs keeps one group of every two"),
])
def test_owl_errors_are_clear(args, message, tiny_models, tmp_path, capsys):
    assert cli_main([tiny_models["llama"], str(tmp_path / "o"), *QUICK_ARGS, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_mlp_sparsity_moves_groups_between_layer_types_at_the_same_size(tiny_models, tmp_path, capsys):
    out = tmp_path / "mlp"
    assert cli_main([tiny_models["llama"], str(out), *QUICK_ARGS, "--mlp-sparsity", "0.4", "-q"]) == 0
    assert "MLP S40%)" in capsys.readouterr().out
    report = json.loads((out / COMPLETE_MARKER).read_text())
    assert report["mlp_sparsity"] == 0.4
    weights = {"mlp": 0, "attn": 0}
    kept = {"mlp": 0, "attn": 0}
    for r in report["layers"]:
        kind = "mlp" if ".mlp." in r["name"] else "attn"
        weights[kind] += r["shape"][0] * r["shape"][1]
        kept[kind] += r["kept_groups"] * 16
    assert kept["mlp"] / weights["mlp"] == pytest.approx(0.6, abs=0.02)
    attention = (0.5 * (weights["mlp"] + weights["attn"]) - 0.4 * weights["mlp"]) / weights["attn"]
    assert attention > 0.55  # the attention layers pruned harder than the mean
    assert kept["attn"] / weights["attn"] == pytest.approx(1 - attention, abs=0.02)
    assert report["kept_group_fraction"] == pytest.approx(0.5, abs=0.02)  # the size of the default
    load_reference_model(str(out))
    # Off by default, and kept out of the resume fingerprint then (older partial folders resume).
    assert "mlp_sparsity" not in ConvertOptions().fingerprint()
    assert ConvertOptions(mlp_sparsity=0.4).fingerprint()["mlp_sparsity"] == 0.4


@pytest.mark.parametrize("args, message", [
    (["--mlp-sparsity", "1"], "--mlp-sparsity 1.0 must be in [0, 1)"),
    (["--mlp-sparsity", "0.05"], "attention layers would need sparsity"),
    (["--mlp-sparsity", "0.4", "--pattern", "pairs"], "--mlp-sparsity: --pattern pairs keeps one group of every two"),
    (["--mlp-sparsity", "0.4", "--skip", "model.layers.0.self_attn.q_proj", "--skip", "model.layers.0.self_attn.k_proj",
      "--skip", "model.layers.0.self_attn.v_proj", "--skip", "model.layers.0.self_attn.o_proj"],
     "block 0 converts no attention layers"),
])
def test_mlp_sparsity_errors_are_clear(args, message, tiny_models, tmp_path, capsys):
    assert cli_main([tiny_models["llama"], str(tmp_path / "o"), *QUICK_ARGS, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
