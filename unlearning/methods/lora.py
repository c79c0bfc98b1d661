"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen weight tensors, merged back into plain weights.

An adapted weight reads W0 + (alpha / rank) · B A, with W0 frozen, B zero at the start (the model is
unchanged until a step) and only A and B trained. The adapter is a torch parametrisation of the
weight, not a replacement module, so it works for every weight a module reads as an attribute: the
weights of Linear and Conv2d layers, and also those that nn.MultiheadAttention and open_clip's
attention pool read directly instead of calling their projection layers. A conv kernel
(out x in x kh x kw) is adapted as the matrix out x (in·kh·kw).

:func:`merge_lora` folds every adapter into its weight and removes it, so the model is a plain
open_clip model again (same class, same state-dict keys).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.nn.utils import parametrize


class LowRankDelta(torch.nn.Module):
    """The parametrisation W -> W + scale · (up @ down).view(W.shape).

    Args:
        shape: the adapted weight's shape (at least 2-D).
        rank: the rank of the update (capped by the weight's matrix dimensions).
        alpha: the update is scaled by ``alpha / rank``.
        generator: draws ``down`` (nn.Linear's default initialisation, U(±1/sqrt(fan_in))).
    """

    def __init__(self, shape: torch.Size, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if len(shape) < 2:
            raise ValueError(f"LoRA adapts matrices and conv kernels, not a tensor of shape {tuple(shape)}")
        if rank < 1:
            raise ValueError(f"lora rank must be at least 1, not {rank}")
        rows, columns = shape[0], math.prod(shape[1:])
        rank = min(rank, rows, columns)
        self.shape = tuple(shape)
        self.scale = alpha / rank
        self.down = torch.nn.Parameter((torch.rand(rank, columns, generator=generator) * 2 - 1) / math.sqrt(columns))
        self.up = torch.nn.Parameter(torch.zeros(rows, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * self.up @ self.down).view(self.shape).to(weight.dtype)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attribute = name.rpartition(".")
    return model.get_submodule(path), attribute


def weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor the model computes with for parameter ``name``: the adapted one where an adapter sits."""
    module, attribute = _owner(model, name)
    return getattr(module, attribute)


def add_lora(model: torch.nn.Module, names: Iterable[str], rank: int, alpha: float,
             generator: torch.Generator | None = None) -> list[torch.nn.Parameter]:
    """Put a :class:`LowRankDelta` on each parameter ``names`` (as ``named_parameters`` spells them).

    Returns:
        The adapters' parameters (the only ones to train); the adapted weights stay as they were.
    """
    adapters = []
    for name in names:
        module, attribute = _owner(model, name)
        original = getattr(module, attribute)
        delta = LowRankDelta(original.shape, rank, alpha, generator).to(device=original.device, dtype=original.dtype)
        parametrize.register_parametrization(module, attribute, delta)
        adapters += [delta.down, delta.up]
    return adapters


def merge_lora(model: torch.nn.Module) -> None:
    """Fold every adapter into its weight and remove it: the model is plain again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attribute in list(module.parametrizations):
                parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
