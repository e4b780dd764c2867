# SPDX-License-Identifier: Apache-2.0
"""Perplexity over non-overlapping windows of a text, the usual WikiText-2 protocol."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, max_windows: int | None = None,
               device: str = "cpu", desc: str = "perplexity") -> dict:
    """Mean token NLL over windows of ``seq_len`` tokens, as a perplexity.

    ``max_windows`` evaluates only the first windows (a stated prefix of the text) when the
    whole text would take too long.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    nll, count = 0.0, 0
    for i in tqdm(range(n_windows), desc=desc, unit="window"):
        x = ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += loss.item()
        count += seq_len - 1
    return {"perplexity": math.exp(nll / count), "windows": n_windows, "seq_len": seq_len,
            "tokens_scored": count, "tokens_in_text": ids.numel()}
