# SPDX-License-Identifier: Apache-2.0
"""Perplexity from an engine's prompt logprobs scores the same tokens as the reference's."""

import math
import os
import subprocess
import sys

import pytest
import torch

from converters.perplexity import perplexity, prompt_nll, result, windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")


def sample_text() -> str:
    if os.path.exists(TEXT):
        with open(TEXT, encoding="utf-8") as f:
            return f.read(4000)
    return "The quick brown fox jumps over the lazy dog. " * 80


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def engine_logprobs(model, window: torch.Tensor) -> list:
    """What vLLM's ``prompt_logprobs=0`` returns for a prompt: None at the first position, then
    each prompt token's logprob given the tokens before it."""
    from vllm.logprobs import Logprob

    with torch.no_grad():
        logp = model(input_ids=window[None]).logits.float().log_softmax(-1)[0]
    return [None] + [{int(window[i]): Logprob(logprob=float(logp[i - 1, window[i]]), rank=1)}
                     for i in range(1, window.numel())]


def test_prompt_logprobs_give_the_reference_perplexity(tiny_llama):
    model, tok = tiny_llama
    text, seq_len = sample_text(), 128
    ref = perplexity(model, tok, text, seq_len, max_windows=3)
    wins, total = windows(tok, text, seq_len, max_windows=3)
    got = result([prompt_nll(w, engine_logprobs(model, w)) for w in wins], seq_len, total)
    assert got["windows"] == ref["windows"] == 3 and got["tokens_scored"] == ref["tokens_scored"]
    assert math.isclose(got["perplexity"], ref["perplexity"], rel_tol=1e-5), (got, ref)
    assert got["window_nll"] == pytest.approx(ref["window_nll"], rel=1e-5)


def test_prompt_logprobs_that_do_not_fit_the_window_are_refused(tiny_llama):
    model, tok = tiny_llama
    w = windows(tok, sample_text(), 32, max_windows=1)[0][0]
    logprobs = engine_logprobs(model, w)
    with pytest.raises(ValueError, match="prompt positions"):
        prompt_nll(w, logprobs[:-1])
    other = dict(logprobs[5])
    other[int(w[5]) + 1] = other.pop(int(w[5]))  # the logprob of some other token
    with pytest.raises(ValueError, match="position 5"):
        prompt_nll(w, logprobs[:5] + [other] + logprobs[6:])


@pytest.mark.parametrize("flag", [["--max-num-batched-tokens", "16"], ["--as-dequantized"]])
def test_engine_options_are_refused_for_the_reference(flag):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "perplexity.py"), "--text", __file__,
                        *flag, "model"], capture_output=True, text=True)
    assert r.returncode == 2 and f"{flag[0]} is for --engine vllm" in r.stderr

