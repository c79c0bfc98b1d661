"""The optimisation loop every method in this package shares, and the batches and stop rule it runs on.

All methods here optimise with :func:`optimise`, so a budget means the same thing for each of them:
Adam at ``config.lr`` (each method's default is its own tuned value), at most ``config.max_steps``
steps of ``config.batch_size`` images, and one stop rule (:func:`forget_check`) checked every
``config.eval_every`` steps:

- class / subgroup targets: zero-shot accuracy of the stop images (``data.forget_val``, else
  ``data.forget``) over ``data.classnames`` with the *training* templates is at or below
  ``config.stop_forget_accuracy``;
- association targets: image->text Recall@``recall_k`` of the stop pairs against the distinct
  captions of the stop pairs and ``data.retain_val`` is at or below ``config.stop_forget_recall``.

``logit_scale`` is never updated: ascent would otherwise just shrink the temperature.

Joint data (several targets, ``data.forget_targets``): each forget image is paired with, or ascended
on, its own class (its label); a subgroup's siblings are those of every target; the stop rule holds
once the *worst* target's stop images are at the threshold (associations: the pooled pairs' recall).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from pydantic import Field

from unlearning.methods.base import (
    ForgetTarget,
    LabelledImages,
    MethodConfig,
    ProgressFn,
    UnlearningData,
)
from unlearning.methods.common import accuracy, sample_batch
from unlearning.metrics import encode_images, encode_texts, zero_shot_classifier

LossFn = Callable[[], tuple[torch.Tensor, dict]]


class BudgetConfig(MethodConfig):
    """The shared budget plus the association stop rule (see the module docstring)."""

    recall_k: int = 5
    stop_forget_recall: float = 0.05
    # At least this many steps even once the stop rule holds: for terms that do more than lower
    # the forget score (cliperase's relabel). 0: stop as soon as it holds.
    min_steps: int = Field(0, ge=0)
    # Subgroup targets: share of each retain batch drawn from the sibling subgroups (same class,
    # other attribute value), the retained knowledge most at risk (docs/methods.md).
    sibling_share: float = 0.5
    # Keep going after the stop rule first holds, for this fraction of the steps taken so far: the
    # stop set is small, and forgetting exactly it does not carry over to unseen images (docs/methods.md).
    overshoot: float = 0.0


def updatable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every trainable parameter except ``logit_scale`` (kept fixed by all methods)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and name != "logit_scale"]


def class_prompts(data: UnlearningData, batch: LabelledImages, generator: torch.Generator) -> list[str]:
    """Each image's class prompt in a random training template ("a picture of a circle."); the
    caption for images without a class."""
    picks = torch.randint(len(data.templates), (len(batch),), generator=generator).tolist()
    return [data.templates[t].format(data.classnames[c]) if c >= 0 else text
            for t, c, text in zip(picks, batch.labels.tolist(), batch.texts)]


def forget_labels(data: UnlearningData, batch: LabelledImages) -> torch.Tensor:
    """The forgotten class of each forget image: its label where that is one of ``data.forget_indices``
    (joint data), else the target's ``forget_index``."""
    indices = torch.tensor(data.forget_indices, dtype=torch.long)
    return torch.where(torch.isin(batch.labels, indices), batch.labels, torch.full_like(batch.labels, data.forget_index))


def forget_batch(target: ForgetTarget, data: UnlearningData, size: int, generator: torch.Generator,
                 with_labels: bool = False, class_weights: dict[int, float] | None = None,
                 ) -> tuple[torch.Tensor, list[str]] | tuple[torch.Tensor, list[str], torch.Tensor]:
    """A batch of forget images with the text each is paired with: its (own, for joint data) class
    prompt for class-like targets (so the evaluation prompts never enter a loss), its own caption
    for associations; ``with_labels`` also returns the class index of each (see :func:`forget_labels`).

    ``class_weights``: joint data only, a weight per forgotten class index; each image is drawn
    with its class's weight (with replacement) instead of uniformly."""
    if class_weights:
        by_class = torch.zeros(int(data.forget.labels.max()) + 1)
        for index, weight in class_weights.items():
            if 0 <= index < len(by_class):
                by_class[index] = weight
        weights = by_class[data.forget.labels.clamp(min=0)] * (data.forget.labels >= 0)
        batch = data.forget.subset(torch.multinomial(weights, size, replacement=True, generator=generator))
    else:
        batch = sample_batch(data.forget, size, generator)
    if target.kind == "association":
        return (batch.images, batch.texts, batch.labels) if with_labels else (batch.images, batch.texts)
    as_target = LabelledImages(batch.images, batch.texts, forget_labels(data, batch))
    texts = class_prompts(data, as_target, generator)
    return (batch.images, texts, as_target.labels) if with_labels else (batch.images, texts)


def sibling_indices(target: ForgetTarget, data: UnlearningData) -> list[int]:
    """For subgroup targets: the indices of the sibling subgroups (same class, another value) of
    every target the data forgets, the forgotten ones left out."""
    targets = data.forget_targets or [target]
    forgotten = set(data.forget_indices)
    return [i for i, name in enumerate(data.classnames)
            if i not in forgotten and any(t.kind == "subgroup" and name.endswith(f" {t.class_name}") for t in targets)]


def retain_batch(target: ForgetTarget, data: UnlearningData, size: int, generator: torch.Generator, sibling_share: float) -> LabelledImages:
    """A batch of retain images; for a subgroup target, ``sibling_share`` of it from the siblings."""
    if target.kind != "subgroup" or not sibling_share:
        return sample_batch(data.retain, size, generator)
    siblings = sibling_indices(target, data)
    is_sibling = torch.isin(data.retain.labels, torch.tensor(siblings, dtype=torch.long))
    if not bool(is_sibling.any()):
        return sample_batch(data.retain, size, generator)
    n_siblings = round(sibling_share * size)
    picks = [sample_batch(data.retain.subset(torch.where(is_sibling)[0]), n_siblings, generator),
             sample_batch(data.retain, size - n_siblings, generator)]
    return LabelledImages(torch.cat([b.images for b in picks]), picks[0].texts + picks[1].texts, torch.cat([b.labels for b in picks]))


@torch.no_grad()
def association_recall(model: torch.nn.Module, tokenizer, forget: LabelledImages, others: LabelledImages | None, k: int) -> float:
    """Image->text Recall@k of the forget pairs against the distinct captions of forget + ``others``
    (the benchmark's ``forget_R@5``, on whatever split is given)."""
    from unlearning.evaluation import caption_recall  # imported here: unlearning.evaluation imports this package

    bank = sorted(set(forget.texts) | set(others.texts if others else []))
    return caption_recall(encode_images(model, forget.images), forget.texts, bank, encode_texts(model, tokenizer, bank), k)


def forget_check(model: torch.nn.Module, tokenizer, target: ForgetTarget, data: UnlearningData,
                 config: BudgetConfig, per_class: dict[int, float] | None = None) -> tuple[Callable[[], float] | None, float]:
    """The stop rule: a function giving the current forget score (None without any forget images,
    e.g. fine-tuning with retain data only), and the threshold to reach.

    ``per_class``: for joint class-like data, filled with each forgotten class's accuracy at every check."""
    stop_set = data.forget_val or data.forget
    if not stop_set:
        return None, config.stop_forget_accuracy
    if target.kind == "association":
        def score() -> float:
            return association_recall(model, tokenizer, stop_set, data.retain_val, config.recall_k)
        return score, config.stop_forget_recall

    if len(data.forget_indices) > 1:
        def score() -> float:
            return worst_class_accuracy(model, tokenizer, stop_set, data.forget_indices, data.classnames, data.templates, per_class)
        return score, config.stop_forget_accuracy

    def score() -> float:
        return accuracy(model, tokenizer, stop_set, data.classnames, data.templates)
    return score, config.stop_forget_accuracy


@torch.no_grad()
def worst_class_accuracy(model: torch.nn.Module, tokenizer, data: LabelledImages, indices: list[int], classnames: list[str],
                         templates: list[str], per_class: dict[int, float] | None = None) -> float:
    """The highest zero-shot accuracy, over the classes ``indices``, of ``data``'s images of that
    class (classes without an image are skipped; NaN when none has one); ``per_class`` gets each one."""
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates)
    feats = encode_images(model, data.images)
    predictions = (feats @ classifier.to(feats.device)).argmax(dim=-1).cpu()
    scores = {i: float((predictions[data.labels == i] == i).float().mean()) for i in indices if bool((data.labels == i).any())}
    if per_class is not None:
        per_class.update(scores)
    return max(scores.values()) if scores else float("nan")


def optimise(params: list[torch.nn.Parameter], loss_fn: LossFn, config: MethodConfig, score: Callable[[], float] | None = None,
             threshold: float = 0.0, progress: ProgressFn | None = None, stage: str = "unlearn", steps: int | None = None,
             after_step: Callable[[], None] | None = None, first_step: int = 0) -> list[dict]:
    """Adam on ``params`` until ``score() <= threshold`` or the step budget runs out.

    Args:
        loss_fn: returns the loss to minimise and a dict of its terms (logged).
        score: the forget accuracy of the stop rule; ``None`` runs all ``steps`` without stopping.
        steps: the step budget (default ``config.max_steps``).
        after_step: called after each optimiser step (e.g. a weight EMA).
        first_step: step number of the first row, so that stages of one method number on.

    Returns:
        History rows: step, stage, loss terms, and ``forget_accuracy`` where it was evaluated.
    """
    steps = config.max_steps if steps is None else steps
    optimizer = torch.optim.Adam(params, lr=config.lr, fused=True)  # fused: ~7x faster steps on CPU
    started = time.perf_counter()
    history = []

    def log(row: dict) -> None:
        row.update(stage=stage, seconds=round(time.perf_counter() - started, 3))
        history.append(row)
        if progress:
            progress(row)

    min_steps = getattr(config, "min_steps", 0)
    if score is not None:
        log({"step": first_step, "forget_accuracy": score()})
        if history[-1]["forget_accuracy"] <= threshold and not min_steps:
            return history
    overshoot = getattr(config, "overshoot", 0.0)
    stop_at = None  # the step to stop at, once the stop rule has held
    for step in range(1, steps + 1):
        loss, terms = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step:
            after_step()
        row = {"step": first_step + step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        checking = score is not None and (step % config.eval_every == 0 or step == steps)
        if checking:
            row["forget_accuracy"] = score()
        log(row)
        if checking and row["forget_accuracy"] <= threshold and stop_at is None:
            stop_at = step + math.ceil(overshoot * step)
        if stop_at is not None and step >= max(stop_at, min_steps):
            break
    return history


def run_summary(history: list[dict], threshold: float, started: float) -> dict:
    """Optimiser steps taken, the last forget accuracy, whether the stop rule was met, and the wall time."""
    scores = [row["forget_accuracy"] for row in history if "forget_accuracy" in row]
    final = scores[-1] if scores else float("nan")
    return {"steps": sum(1 for row in history if "loss" in row), "forget_accuracy": final,
            "stopped": bool(scores) and min(scores) <= threshold, "seconds": round(time.perf_counter() - started, 3)}
