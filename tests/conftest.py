# SPDX-License-Identifier: Apache-2.0
import os

import pytest
import torch

from converters.tiny import build_tiny_model
from vllm_gqsa.format import LayerFormat, pack_layer


def random_layer(N, K, fmt=LayerFormat(), density=0.5, seed=0, empty_rows=(), full_rows=()):
    """A random GQSA layer with uneven rows: some empty, some full."""
    g = torch.Generator().manual_seed(seed)
    G, R, bits = fmt.group_size, fmt.block_rows, fmt.bits
    NB, KG = N // R, K // G
    keep = torch.rand(NB, KG, generator=g) < density
    for b in empty_rows:
        keep[b] = False
    for b in full_rows:
        keep[b] = True
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32).to(torch.uint8)
    zeros = torch.randint(0, maxq + 1, (N, KG), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(N, KG, generator=g) * 0.02 + 0.001).half().float()
    return pack_layer(codes, scales, zeros, keep, fmt)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(str(root / arch), arch=arch) for arch in ("llama", "qwen2", "gemma3")}


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_models, tmp_path_factory):
    """Each tiny model converted at W4S50% g16 (fast settings)."""
    from converters.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch, path in tiny_models.items():
        out[arch] = str(root / arch)
        convert(path, out[arch], ConvertOptions(n_samples=8, seq_len=64, batch_size=4))
    return out


# The families beyond the three above: each converted only where a test asks for it.
OTHER_FAMILIES = ("gemma2", "granite", "olmo3", "exaone4", "seed_oss", "ernie4_5", "phi3")


@pytest.fixture(scope="session")
def other_families(tmp_path_factory):
    """``get(arch, output_layer=False)``: the tiny model of one of ``OTHER_FAMILIES`` and it
    converted like ``tiny_checkpoints`` (with ``output_layer``, its output layer quantized too), as
    (dense, checkpoint) folders, built on first use."""
    from converters.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("families")
    made = {}

    def get(arch: str, output_layer: bool = False) -> tuple[str, str]:
        # Both conversions at once, before any test serves the family: once vLLM's Transformers
        # backend (vLLM 0.3x, OLMo 3 and Seed-OSS) has built a model in this process, transformers
        # builds that model with vLLM's layers, which need vLLM's config.
        if arch not in made:
            dense = str(root / f"{arch}-dense")
            build_tiny_model(dense, arch=arch)
            for head in ((False, True) if arch != "gemma2" else (False,)):  # vLLM's Gemma 2 is tied
                convert(dense, str(root / f"{arch}{'-head' * head}"),
                        ConvertOptions(n_samples=8, seq_len=64, batch_size=4, quantize_output_layer=head))
            made[arch] = dense
        return made[arch], str(root / f"{arch}{'-head' * output_layer}")

    return get


def tiny_model_and_checkpoint(request, arch: str) -> tuple[str, str]:
    """(dense, checkpoint) folders of any family's tiny model, from the fixtures above."""
    if arch in OTHER_FAMILIES:
        return request.getfixturevalue("other_families")(arch)
    return request.getfixturevalue("tiny_models")[arch], request.getfixturevalue("tiny_checkpoints")[arch]


@pytest.fixture(scope="session")
def head_checkpoints(tiny_models, tmp_path_factory):
    """Tiny models converted with their output layer: Llama's (untied) with half its groups
    pruned, Gemma 3's, and a Qwen2 and a Phi-3 tied to their embeddings (as the small Qwen2.5
    models and Phi-4-mini are) quantized only."""
    from converters.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("head")
    models = {**tiny_models,
              **{f"{arch}-tied": build_tiny_model(str(root / f"{arch}-tied-dense"), arch, tie_word_embeddings=True)
                 for arch in ("qwen2", "phi3")}}
    out = {}
    for arch, sparsity in (("llama", 0.5), ("gemma3", 0.0), ("qwen2-tied", 0.0), ("phi3-tied", 0.0)):
        out[arch] = str(root / arch)
        convert(models[arch], out[arch], ConvertOptions(n_samples=8, seq_len=64, batch_size=4,
                                                        quantize_output_layer=True,
                                                        output_layer_sparsity=sparsity))
    return out


@pytest.fixture(scope="session")
def image_text_checkpoints(tmp_path_factory):
    """A tiny Gemma 3 image-text model (a SigLIP tower and the gemma3 decoder) and it converted
    twice: its decoder only, and its decoder and output layer (quantized only)."""
    from converters.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("image_text")
    out = {"dense": build_tiny_model(str(root / "dense"), arch="gemma3_mm")}
    for name, head in (("decoder", False), ("head", True)):
        out[name] = str(root / name)
        convert(out["dense"], out[name], ConvertOptions(n_samples=8, seq_len=64, batch_size=4,
                                                        quantize_output_layer=head))
    return out


def pytest_report_header(config):
    return f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, cpus: {os.cpu_count()}"


def interrupt_solver(monkeypatch, convert_mod, at_call: int) -> list:
    """Makes the converter's ``solve_layer`` raise KeyboardInterrupt on call ``at_call`` (an
    interrupted conversion); returns the list that counts the calls."""
    real, calls = convert_mod.solve_layer, []

    def failing_solve(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "solve_layer", failing_solve)
    return calls
