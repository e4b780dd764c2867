# SPDX-License-Identifier: Apache-2.0
"""BQPO, block-wise quantization-pruning optimization: GQSA's first training stage.

After the solver has pruned and quantized the target layers of one decoder block, the
block is trained to reproduce the dense block: the loss is the mean squared error between
the quantized block's output, fed the outputs of the already-converted blocks, and the
dense block's output, fed the dense model's stream (EfficientQAT's Block-AP). The pruning
mask is fixed; the kept weights, scales and zero points train through a straight-through
estimator (see :mod:`.fake_quant`), with AdamW, no weight decay, one learning rate for the
weights and a larger one for the quantization parameters, and a cosine decay to 1/20 of
them (EfficientQAT's recipe).

The last calibration samples are held out: their loss is measured before training and after
every epoch, and the block keeps the best state, which is the solver's result if training
never beat it. Shuffling is seeded per block, so a resumed conversion retrains a block
exactly as an uninterrupted one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vllm_gqsa.format import GQSALayer
from . import show_progress
from .fake_quant import FakeQuantLinear

MIN_LR_FACTOR = 20  # cosine decay down to lr / 20, as EfficientQAT


@dataclass
class BlockTraining:
    epochs: int
    lr_weight: float
    lr_quant: float
    batch_size: int  # calibration sequences per optimizer step
    seed: int


def cosine_schedule(optimizer, total_steps: int):
    def factor(step):
        t = min(step / max(total_steps, 1), 1.0)
        return 1 / MIN_LR_FACTOR + (1 - 1 / MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _set_module(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _forward(block, x, kwargs):
    y = block(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def _mse(block, inputs, targets, kwargs, batch_size) -> float:
    """Mean squared error per element over the samples, accumulated in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            y = _forward(block, torch.cat(inputs[i:i + batch_size]), kwargs)
            t = torch.cat(targets[i:i + batch_size])
            total += float(((y - t).double() ** 2).sum())
            count += t.numel()
    return total / count


def train_block(block, layers: dict[str, GQSALayer], inputs: list[torch.Tensor],
                targets: list[torch.Tensor], kwargs: dict, n_val: int, cfg: BlockTraining,
                latents: dict[str, torch.Tensor] | None = None, eval_batch_size: int = 8,
                desc: str = "BQPO") -> tuple[dict[str, GQSALayer], dict]:
    """Train the quantized linear layers ``layers`` (names relative to ``block``) of ``block``.

    ``inputs`` are the block's inputs on the quantized stream, ``targets`` the dense block's
    outputs; the last ``n_val`` of each are held out. ``latents`` are the solver's unrounded
    weights (see :class:`.fake_quant.FakeQuantLinear`), by layer name. The block's own modules
    are left as they were; returns the layers to keep (the given ones if training did not lower
    the held-out loss) and a record of the losses.
    """
    n_train = len(inputs) - n_val
    if n_train < 1 or n_val < 1:
        raise ValueError(f"BQPO needs training and held-out samples, got {len(inputs)} samples "
                         f"with {n_val} held out")
    originals = {n: block.get_submodule(n) for n in layers}
    device = originals[next(iter(layers))].weight.device
    trainable = {n: FakeQuantLinear(layers[n].to(device), originals[n].bias,
                                    None if latents is None else latents[n].to(device)) for n in layers}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    train_x, train_y = inputs[:n_train], targets[:n_train]
    val_x, val_y = inputs[n_train:], targets[n_train:]
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    try:
        for n, m in trainable.items():
            _set_module(block, n, m)
        start = best = _mse(block, val_x, val_y, kwargs, eval_batch_size)
        best_layers, best_epoch = layers, 0
        history = []
        optimizer = torch.optim.AdamW([
            {"params": [m.weight for m in trainable.values()], "lr": cfg.lr_weight},
            {"params": [p for m in trainable.values() for p in (m.scale, m.zero)], "lr": cfg.lr_quant},
        ], weight_decay=0.0)
        schedule = cosine_schedule(optimizer, cfg.epochs * steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", leave=False,
                   disable=not show_progress())  # off with gqsa-convert -q
        with torch.enable_grad():
            for epoch in range(1, cfg.epochs + 1):
                order = torch.randperm(n_train, generator=g).tolist()
                train_loss = 0.0
                for i in range(0, n_train, cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    y = _forward(block, torch.cat([train_x[j] for j in idx]), kwargs)
                    loss = torch.nn.functional.mse_loss(y, torch.cat([train_y[j] for j in idx]))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    train_loss += loss.item() * len(idx)
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4g}", val=f"{best:.4g}")
                val = _mse(block, val_x, val_y, kwargs, eval_batch_size)
                history.append({"epoch": epoch, "train_loss": train_loss / n_train, "val_loss": val})
                if val < best:
                    best, best_epoch = val, epoch
                    best_layers = {n: m.pack() for n, m in trainable.items()}
                bar.set_postfix(val=f"{val:.4g}", start=f"{start:.4g}")
        bar.close()
    finally:
        for n, m in originals.items():
            _set_module(block, n, m)
        for p in frozen:
            p.requires_grad_(True)
    return best_layers, {"val_loss_start": start, "val_loss_best": best, "best_epoch": best_epoch,
                         "kept_trained": best_epoch > 0, "history": history}
