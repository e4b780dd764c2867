# SPDX-License-Identifier: Apache-2.0
"""E2E-OQP, end-to-end optimization of quantization parameters: GQSA's second training stage.

After every block is converted, the integer codes, the zero points and the pruning pattern
are frozen and only the scales of the GQSA layers train, on the model's own causal-LM loss
over the calibration samples (EfficientQAT's E2E-QP). Zero points stay frozen because the
format stores them as ``bits``-bit integers: a continuously trained zero point would have to
be rounded back, undoing what it learned. Embeddings, norms and the LM head stay frozen.

The last calibration samples are held out; the scales are kept only if they lower the
held-out loss (measured with the float16 scales that get written), best epoch first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vllm_gqsa.format import GQSALayer
from .bqpo import _set_module, cosine_schedule
from . import show_progress
from .fake_quant import ScaleOnlyLinear

MAX_GRAD_NORM = 0.3  # EfficientQAT E2E-QP's gradient clipping


@dataclass
class ScaleTraining:
    epochs: int
    lr: float
    batch_size: int  # calibration sequences per optimizer step
    seed: int


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _mean_loss(model, samples: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        total = sum(float(_lm_loss(model, samples[i:i + batch_size])) * len(samples[i:i + batch_size])
                    for i in range(0, len(samples), batch_size))
    return total / len(samples)


def _checkpointing(model, enable: bool) -> None:
    """Turn transformers' activation checkpointing on (non-reentrant) or off: the
    `activation_checkpointing_*` methods from transformers 5.25, the `gradient_checkpointing_*`
    ones they replace before that (removed in 6)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train_scales(model, layers: dict[str, GQSALayer], samples: torch.Tensor, n_val: int,
                 cfg: ScaleTraining, device, eval_batch_size: int = 4) -> tuple[dict[str, GQSALayer], dict]:
    """Train the scales of the GQSA layers ``layers`` (full module names) of ``model`` on the LM
    loss of ``samples`` ``[n, seq_len]``, the last ``n_val`` held out.

    The model is used in float32 on ``device`` and given back as it came (dtype, device and
    modules). Returns the layers to keep (new scales, or the given layers if training did not
    lower the held-out loss) and a record of the losses.
    """
    n_train = len(samples) - n_val
    if n_train < 1 or n_val < 1:
        raise ValueError(f"E2E-OQP needs training and held-out samples, got {len(samples)} samples "
                         f"with {n_val} held out")
    originals = {n: model.get_submodule(n) for n in layers}
    # Every tensor's own dtype and flag, to give the model back as it came (a bf16 model keeps
    # float32 rotary buffers, for one).
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {n: ScaleOnlyLinear(layers[n], originals[n].bias) for n in layers}
    train, val = samples[:n_train].to(device), samples[n_train:].to(device)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    was_training = model.training
    # Recompute each decoder layer's activations (and dequantized weights) in the backward pass
    # instead of keeping them for the whole model: without this, Qwen2.5-1.5B's stage needed more
    # than 24 GB on the CPU.
    checkpointing = getattr(model, "supports_gradient_checkpointing", False)
    if checkpointing:
        _checkpointing(model, True)
    try:
        for n, m in trainable.items():
            _set_module(model, n, m)
        model.to(device, torch.float32)  # after the swap: the dense copies are not converted
        model.eval()
        start = best = _mean_loss(model, val, eval_batch_size)
        best_layers, best_epoch, history = layers, 0, []
        params = [m.scales for m in trainable.values()]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        schedule = cosine_schedule(optimizer, cfg.epochs * steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="E2E-OQP", unit="step",
                   disable=not show_progress())  # off with gqsa-convert -q
        with torch.enable_grad():
            for epoch in range(1, cfg.epochs + 1):
                order = torch.randperm(n_train, generator=g)
                train_loss = 0.0
                model.train(checkpointing)  # transformers checkpoints layers in training mode only
                for i in range(0, n_train, cfg.batch_size):
                    idx = order[i:i + cfg.batch_size].to(device)
                    loss = _lm_loss(model, train[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                    optimizer.step()
                    schedule.step()
                    train_loss += loss.item() * len(idx)
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{best:.4f}")
                model.eval()
                val_loss = _mean_loss(model, val, eval_batch_size)
                history.append({"epoch": epoch, "train_loss": train_loss / n_train, "val_loss": val_loss})
                if val_loss < best:
                    best, best_epoch = val_loss, epoch
                    best_layers = {n: m.pack() for n, m in trainable.items()}
                bar.set_postfix(val=f"{val_loss:.4f}", start=f"{start:.4f}")
        bar.close()
    finally:
        if checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
        for n, m in originals.items():
            _set_module(model, n, m)
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            t.data = t.data.to("cpu", dtypes.get(n, t.dtype))
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, True))
    return best_layers, {"val_loss_start": start, "val_loss_best": best, "best_epoch": best_epoch,
                         "kept_trained": best_epoch > 0, "history": history}
