"""Bootstrap training of a (tiny) CLIP from scratch on captioned images.

The recipe of ../shared/docs/feasibility.md: AdamW (0.9, 0.98, eps 1e-6), weight decay 0.1 on 2-D
non-embedding weights, linear warm-up then cosine decay, batch 256, lr 1e-3, open_clip's
ClipLoss, logit_scale clamped to ln(100), random horizontal flips, and bf16 autocast with the
MATH attention kernel (on CPU the default flash kernel's bf16 backward is ~2x slower). The budget
is a step count, not a wall time, so a run is reproducible whatever else the machine is doing.
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


class TrainConfig(BaseModel):
    """Hyperparameters of :func:`train_clip`."""

    model_config = ConfigDict(extra="forbid")

    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    bf16: bool = True
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


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CPU and CUDA (MATH sdpa on CPU), or nothing."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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
    generator = torch.Generator().manual_seed(config.seed)
    tokens = tokenizer(list(captions))
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    history = []
    model.train()
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
            with autocast_for(device, config.bf16):
                image_features, text_features, logit_scale = model(x, tokens[idx].to(device))
                loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
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
    model.eval()
    return history
