"""Bootstrap training of a (tiny) CLIP from scratch on captioned images.

The recipe of ../shared/docs/feasibility.md: AdamW (0.9, 0.98, eps 1e-6), weight decay 0.1 on 2-D
non-embedding weights, linear warm-up then cosine decay, batch 256, lr 1e-3, open_clip's
ClipLoss, logit_scale clamped to ln(100), random horizontal flips, and the MATH attention kernel
on CPU (the default flash kernel's bf16 backward is ~2x slower). Precision follows the hardware
(``unlearning.precision``: bf16 autocast only where it is native, fp32 otherwise). The budget is a
step count, not a wall time, so a run is reproducible whatever else the machine is doing.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from open_clip.loss import ClipLoss
from pydantic import BaseModel, ConfigDict
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from unlearning.metrics import prepare_images
from unlearning.models import encode_text
from unlearning.precision import Requested, autocast, resolve_precision


class TrainConfig(BaseModel):
    """Hyperparameters of :func:`train_clip`."""

    model_config = ConfigDict(extra="forbid")

    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    precision: Requested = "auto"  # auto: bf16 only where the device runs it natively
    hflip: bool = True
    log_every: int = 50


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights only; embeddings, norms, biases, logit_scale go undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "ln" in name or "bn" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def train_clip(model: torch.nn.Module, tokenizer, images: torch.Tensor, captions: Sequence[str], config: TrainConfig = TrainConfig(),
               on_log: Callable[[int, dict], None] | None = None, progress: bool = True) -> list[dict]:
    """Train ``model`` in place with the CLIP contrastive loss.

    Args:
        images: uint8 ``N x 3 x S x S`` training images.
        captions: one caption per image.
        on_log: called every ``log_every`` steps with ``(step, metrics)``.

    Returns:
        The logged history (step, loss, lr, logit_scale, images/s).
    """
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device, stage="train")
    generator = torch.Generator().manual_seed(config.seed)
    tokens = tokenizer(list(captions))
    # fused: one kernel over all tensors; the unfused update of the 6.3 M-entry token embedding
    # alone was ~20 % of an fp32 CPU step
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=device.type in ("cpu", "cuda"))
    loss_fn = ClipLoss()
    history = []
    model.train()
    # channels_last: oneDNN's faster convolution layout on CPU; undone at the end
    model.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    kernel = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
    with kernel, tqdm(range(config.steps), desc="train CLIP", disable=not progress) as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            idx = torch.randint(len(images), (config.batch_size,), generator=generator)
            x = prepare_images(model, images[idx])
            if config.hflip:
                flip = torch.rand(len(idx), generator=generator) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1).to(device), x.flip(-1), x)
            with autocast(precision, device):
                image_features = model.encode_image(x.contiguous(memory_format=torch.channels_last), normalize=True)
                text_features = encode_text(model, tokens[idx].to(device), normalize=True)
                loss = loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp().float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % config.log_every == 0 or step == config.steps - 1:
                elapsed = time.perf_counter() - started
                row = {"step": step, "loss": loss.item(), "lr": lr_at(step, config),
                       "logit_scale": float(model.logit_scale.detach().exp()), "images_per_s": (step + 1) * config.batch_size / elapsed}
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if on_log:
                    on_log(step, row)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history
