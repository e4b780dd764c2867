# SPDX-License-Identifier: Apache-2.0
"""The accuracy baselines prune what they claim to prune."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from baselines import sparsegpt_nm, wanda_nm  # noqa: E402
from converters.solver import accumulate_hessian  # noqa: E402


@pytest.mark.parametrize("prune", [sparsegpt_nm, wanda_nm])
def test_two_of_every_four_are_zero(prune):
    X = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    H, _ = accumulate_hessian(None, X, 0)
    W = torch.randn(32, 64)
    Wp = prune(W, H)
    zeros = (Wp.reshape(32, 16, 4) == 0).sum(-1)
    assert torch.all(zeros >= 2)


def test_sparsegpt_beats_wanda_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    H, _ = accumulate_hessian(None, X, 0)
    W = torch.randn(32, 64, generator=g)
    err = lambda Wp: float(((X @ (W - Wp).T) ** 2).sum())  # noqa: E731
    assert err(sparsegpt_nm(W, H)) < err(wanda_nm(W, H))


def test_rtn_groups_is_exact_on_the_grid_and_bounded_elsewhere():
    from baselines import rtn_groups

    W = torch.randn(8, 200)  # a partial last group of 72 columns
    Q = rtn_groups(W, bits=4, group=128)
    assert Q.shape == W.shape
    # quantized weights are fixed points (up to the float rounding of a recomputed scale)
    torch.testing.assert_close(rtn_groups(Q, bits=4, group=128), Q, rtol=0, atol=1e-5)
    for g0 in (0, 128):
        Wg, Qg = W[:, g0:g0 + 128], Q[:, g0:g0 + 128]
        step = (Wg.amax(1).clamp(min=0) - Wg.amin(1).clamp(max=0)) / 15
        assert torch.all((Wg - Qg).abs() <= step.unsqueeze(1) / 2 + 1e-6)


def test_awq_keeps_the_block_function_and_beats_round_to_nearest(tiny_models):
    """Scale folding alone leaves the block's output unchanged; with quantization, AWQ's block
    output is closer to full precision than plain round-to-nearest."""
    from transformers import AutoModelForCausalLM

    from baselines import awq_block, rtn_groups
    from converters.convert import _block_inputs, _run_block

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()

    samples = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    model = load()
    inputs, block_kwargs = _block_inputs(model, samples, torch.device("cpu"))
    block, kwargs = model.model.layers[0], block_kwargs[0]
    with torch.no_grad():
        ref = torch.cat(_run_block(block, inputs, kwargs, 4))
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        feats = {m: [] for m in linears}
        hooks = [m.register_forward_hook(lambda mod, a, _o: feats[mod].append(a[0].reshape(-1, a[0].shape[-1])))
                 for m in linears]
        _run_block(block, inputs, kwargs, 4)
        for h in hooks:
            h.remove()
        awq_block(block, {m: torch.cat(v) for m, v in feats.items()}, torch.Generator().manual_seed(0))
        folded = torch.cat(_run_block(block, inputs, kwargs, 4))
        torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-4)
        for m in linears:
            m.weight.data = rtn_groups(m.weight.data, clip=getattr(m, "gqsa_awq_clip", None))
        awq_err = (torch.cat(_run_block(block, inputs, kwargs, 4)) - ref).pow(2).mean()

        rtn_block = load().model.layers[0]
        for m in rtn_block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = rtn_groups(m.weight.data)
        rtn_err = (torch.cat(_run_block(rtn_block, inputs, kwargs, 4)) - ref).pow(2).mean()
    assert awq_err < rtn_err


def test_awq_refuses_gemma_blocks(tiny_models):
    """AWQ folds its scales into the norm before each layer group, which Gemma's (1 + w) norms
    and its separate pre-MLP norm do not allow: it says so instead of changing the block."""
    from transformers import AutoModelForCausalLM

    from baselines import awq_scale_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"], dtype=torch.float32)
    with pytest.raises(ValueError, match="Gemma3DecoderLayer normalizes differently"):
        awq_scale_groups(model.model.layers[0])


def test_no_eval_run_records_time_and_peak_memory(tiny_models, tmp_path):
    """One method per process gives that method's own peak; --no-eval skips the perplexity."""
    import json

    from baselines import main

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "base.json"
    assert main([tiny_models["llama"], "--methods", "wanda-2:4", "--calib-data", str(text),
                 "--n-samples", "4", "--seq-len", "32", "--text", str(text), "--no-eval",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())["methods"]["wanda-2:4"]
    assert "perplexity" not in r
    assert r["peak_memory"]["host_bytes"] > 0 and r["seconds"] >= 0


def test_gpu_accuracy_script_steps_on_the_cpu(tiny_models, tmp_path):
    """benchmarks/gpu_accuracy.sh, whose steps gave the H200 accuracy results, run on the CPU on a
    tiny model: each step writes its results, and a conversion stopped by its time limit says so
    and is finished by running the step again."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = os.path.join(root, "LICENSE")  # more than one 2048-token window of the byte tokenizer
    # LIMIT: the interrupt comes 20 ms in, within Python's start or its standard library's imports.
    # At 0.5 s it came within third-party imports, and once the conversion still ran to the end.
    env = dict(os.environ, CALIB=text, TEXT=text, N_SAMPLES="4", SEQ_LEN="32", DEVICE="cpu",
               MAX_WINDOWS="1", VLLM="0", LIMIT="0.02", PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    work, out = tmp_path / "work", tmp_path / "out"

    def step(name):
        r = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_accuracy.sh"), name, tiny_models["llama"],
                            str(work), str(out)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    step("dense")
    assert "run this step again" in step("gqsa")  # stopped at once
    env["LIMIT"] = "500"
    step("gqsa")
    step("baselines")
    report = json.loads((out / "gqsa_report.json").read_text())
    assert report["device"] == "cpu" and report["training"]["bqpo"]["epochs"] == 2  # the defaults
    for name in ("dense_reference", "gqsa_reference"):
        assert json.loads((out / f"{name}.json").read_text())["results"][0]["windows"] == 1
    methods = json.loads((out / "baselines.json").read_text())["methods"]
    assert sorted(methods) == ["gptq-w2g128", "sparsegpt-2:4"]
