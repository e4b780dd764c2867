# SPDX-License-Identifier: Apache-2.0
"""Perplexity over non-overlapping windows of a text, the usual WikiText-2 protocol."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> tuple[list[torch.Tensor], int]:
    """The text's token windows of ``seq_len`` (the first ``max_windows`` of them, when given: a
    stated prefix of the text when the whole would take too long), and the text's token count."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)], ids.numel()


def result(window_nll: list[float], seq_len: int, tokens_in_text: int) -> dict:
    """The perplexity over the windows, with each window's NLL so that runs over different numbers
    of windows can be compared on their common prefix."""
    count = len(window_nll) * (seq_len - 1)
    return {"perplexity": math.exp(sum(window_nll) / count), "windows": len(window_nll), "seq_len": seq_len,
            "tokens_scored": count, "tokens_in_text": tokens_in_text,
            "window_nll": [round(v, 4) for v in window_nll]}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, max_windows: int | None = None,
               device: str = "cpu", desc: str = "perplexity") -> dict:
    """Mean token NLL over windows of ``seq_len`` tokens, as a perplexity: every token of a window
    but the first is scored, given the tokens before it in the window."""
    wins, total = windows(tokenizer, text, seq_len, max_windows)
    nll = []
    for w in tqdm(wins, desc=desc, unit="window"):
        x = w.unsqueeze(0).to(device)
        logits = model(input_ids=x).logits.float()
        nll.append(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item())
    return result(nll, seq_len, total)


def prompt_nll(window: torch.Tensor, prompt_logprobs: list) -> float:
    """A window's NLL from an inference engine's prompt logprobs (vLLM's ``prompt_logprobs``: for
    each position a mapping from token id to an object with ``.logprob``, None at position 0), over
    the same tokens as :func:`perplexity` scores."""
    if len(prompt_logprobs) != window.numel() or prompt_logprobs[0] is not None:
        raise ValueError(f"expected {window.numel()} prompt positions with none at the first, "
                         f"got {len(prompt_logprobs)}")
    nll = 0.0
    for pos in range(1, window.numel()):
        token = int(window[pos])
        if token not in prompt_logprobs[pos]:
            raise ValueError(f"position {pos}: no logprob for the prompt's own token {token}")
        nll -= prompt_logprobs[pos][token].logprob
    return nll
