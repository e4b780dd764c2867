# SPDX-License-Identifier: Apache-2.0
"""Calibration samples: fixed-length token windows drawn from a text file."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def read_text(path: str) -> str:
    """Text of a file, or of every ``*.txt`` file in a folder (sorted)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
        if not names:
            raise FileNotFoundError(f"no .txt file in calibration folder {path}")
        return "\n".join(read_text(os.path.join(path, n)) for n in names)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration data {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:  # its own message names no file
        raise ValueError(f"calibration data {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         f"pass a plain text file") from None


def calibration_samples(tokenizer, path: str | None, n_samples: int, seq_len: int, seed: int = 0,
                        vocab_size: int | None = None) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids: random windows of the tokenized text at ``path``.

    Without a path, random token ids are used (fine for checking the pipeline, poor for
    accuracy); a warning says so.
    """
    g = torch.Generator().manual_seed(seed)
    if path is None:
        logger.warning("no --calib-data given: calibrating on random tokens; pass a text file "
                       "(e.g. WikiText-2 validation) for a model worth serving")
        high = vocab_size or tokenizer.vocab_size
        return torch.randint(0, high, (n_samples, seq_len), generator=g)
    ids = tokenizer(read_text(path), return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:  # an empty file too
        raise ValueError(f"calibration text {path} has {ids.numel()} tokens, fewer than one "
                         f"sample of {seq_len}; use a longer text or a smaller --seq-len")
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
