"""Baselines (methods.md section 4): gradient ascent, GradDiff, fine-tune on retain.

They run in the shared loop (:mod:`unlearning.methods.loop`), so a budget means the same for them
as for the paper methods.

- ``gradient_ascent``: maximise the zero-shot cross-entropy of forget images against the class
  prompts (class/subgroup) or the in-batch CLIP loss of forget pairs (association).
- ``graddiff``: the same ascent plus ordinary CLIP-loss descent on retain pairs.
- ``finetune``: CLIP-loss descent on retain pairs only; forgetting can only come from drift.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from unlearning.methods.base import ForgetTarget, MethodResult, UnlearningData, register
from unlearning.methods.common import class_text_features, clip_contrastive_loss, zero_shot_logits
# The loop used to live here: its names stay importable from this module.
from unlearning.methods.loop import (  # noqa: F401
    BudgetConfig,
    LossFn,
    association_recall,
    class_prompts,
    forget_batch,
    forget_check,
    forget_labels,
    optimise,
    retain_batch,
    run_summary,
    sibling_indices,
    updatable_parameters,
    worst_class_accuracy,
)


def _ascent_loss(model: torch.nn.Module, tokenizer, target: ForgetTarget, data: UnlearningData, size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """The forget-set task loss that the ascent baselines *maximise* (returned un-negated)."""
    images, texts, labels = forget_batch(target, data, size, generator, with_labels=True)
    if target.kind == "association":
        return clip_contrastive_loss(model, tokenizer, images, texts)
    classes = class_text_features(model, tokenizer, data.classnames, data.templates)
    return F.cross_entropy(zero_shot_logits(model, images, classes), labels.to(classes.device))


def _run_baseline(model, tokenizer, target, data, config: BudgetConfig, progress, ascent: bool, retain: bool) -> MethodResult:
    """One baseline: ascent on forget and/or CLIP-loss descent on retain, inside the shared loop."""
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()

    def loss_fn():
        terms = {}
        if ascent:
            terms["forget_task_loss"] = _ascent_loss(model, tokenizer, target, data, config.batch_size, generator)
        if retain:
            batch = retain_batch(target, data, config.batch_size, generator, config.sibling_share)
            terms["retain_clip_loss"] = clip_contrastive_loss(model, tokenizer, batch.images, batch.texts)
        loss = terms.get("retain_clip_loss", 0.0) - terms.get("forget_task_loss", 0.0)
        return loss, terms

    score, threshold = forget_check(model, tokenizer, target, data, config)
    history = optimise(updatable_parameters(model), loss_fn, config, score, threshold, progress)
    return MethodResult(model, history, run_summary(history, threshold, started))


_ALL_TARGETS = ("class", "subgroup", "association")


@register("gradient_ascent", BudgetConfig, target_kinds=_ALL_TARGETS, joint_kinds=_ALL_TARGETS, needs_forget_data=True, needs_retain_data=False,
          needs_original=False, paper="baseline: gradient ascent (NegGrad) on the forget set")
def gradient_ascent(model, tokenizer, target, data, config, original=None, progress=None) -> MethodResult:
    """Maximise the forget set's zero-shot CE (class/subgroup) or CLIP loss (association).

    Args:
        model: the CLIP to unlearn, changed in place (kept in ``eval()``).
        tokenizer: its tokenizer.
        target: what to forget.
        data: needs ``forget``; ``forget_val`` (and ``retain_val`` for associations) feed the stop rule.
        config: a :class:`BudgetConfig`.
        original: unused.
        progress: called with each history row.
    """
    return _run_baseline(model, tokenizer, target, data, config, progress, ascent=True, retain=False)


@register("graddiff", BudgetConfig, target_kinds=_ALL_TARGETS, joint_kinds=_ALL_TARGETS, needs_forget_data=True, needs_retain_data=True,
          needs_original=False, paper="baseline: GradDiff (ascent on forget + descent on retain)")
def graddiff(model, tokenizer, target, data, config, original=None, progress=None) -> MethodResult:
    """Gradient ascent on the forget set plus CLIP-loss descent on retain pairs (weight 1 each).

    Args: as :func:`gradient_ascent`; also needs ``data.retain``.
    """
    return _run_baseline(model, tokenizer, target, data, config, progress, ascent=True, retain=True)


@register("finetune", BudgetConfig, target_kinds=_ALL_TARGETS, joint_kinds=_ALL_TARGETS, needs_forget_data=False, needs_retain_data=True,
          needs_original=False, paper="baseline: fine-tune on retain only")
def finetune(model, tokenizer, target, data, config, original=None, progress=None) -> MethodResult:
    """CLIP-loss descent on retain pairs only; the stop rule still watches the forget set.

    Args: as :func:`gradient_ascent`, but needs ``data.retain`` only; without forget images there
    is no stop rule and the whole budget runs.
    """
    return _run_baseline(model, tokenizer, target, data, config, progress, ascent=False, retain=True)
