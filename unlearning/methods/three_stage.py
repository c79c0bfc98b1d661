"""Targeted forgetting of image subgroups (Zhang et al., CVPR 2025; methods.md section 2), in three stages.

1. **Forgetting.** Score each layer weight (matrix or conv kernel) by its relative Fisher
   information: the mean squared gradient of the image-text cosine similarity on forget pairs
   divided by the same on retain pairs. Only the ``top_k_tensors`` highest are updated (in full,
   or through LoRA adapters, ``lora_rank``), to push each forget image's similarity to the
   target's prompt down, until the shared stop rule holds (forget accuracy on ``data.forget_val``
   at most ``stop_forget_accuracy``).
2. **Reminding.** On retain data: the CLIP contrastive loss plus knowledge distillation from the
   frozen original, and a weight EMA whose average becomes the model. For BatchNorm towers, the
   retain images first get a learned per-sample perturbation δ that makes each BatchNorm layer's
   batch mean/std match its running statistics (DeepInversion style), through the model
   ``align_through`` names, so reminding sees inputs closer to the pre-training distribution.
3. **Restoring.** Soup with the original, θ = α·θ_unlearned + (1 - α)·θ_original (:func:`soup`),
   with α from ``soup_alphas`` picked on the calibration split (``retain_val`` + ``forget_val``) by
   :func:`choose_alpha`: the α with the highest retain accuracy among those whose forget accuracy
   stays at or below max(stop threshold, forget accuracy at α = 1) (ties go to the larger α), where
   a calibration image counts as forgotten only ``soup_margin`` (cosine; ``subgroup_soup_margin``
   for a subgroup) below its best other class.

``three_stage:paper`` (:class:`ThreeStagePaperConfig`) follows what we could read of the paper
(LoRA on the selected layers, the similarity-threshold forget loss, reminding on the siblings with
KD only, alignment through the original model); what the paper leaves open is listed there.

Where the paper is silent (methods.md 2.3, 6), our choices (all configurable):
- Relative Fisher: squared gradients of the mean similarity over chunks of ``fisher_chunk`` pairs
  stand in for per-sample ones (chunk 1 is exact); a tensor's score is the ratio of element means.
  Forget texts are the target's class prompt, retain texts each image's class prompt, in the
  training templates. Candidates are layer weights only (the tensors LoRA adapts): per-channel
  norm gains are too global.
- KD loss (:func:`reminding_terms`): KL(original ‖ current) of zero-shot logits over the *retained*
  class prompts at temperature ``distill_temperature`` (× T²); the target's column is dropped so
  the teacher cannot hand the forgotten class back.
- Alignment: ``align_steps`` of Adam on δ (lr ``align_lr``, L2 penalty ``align_l2``) for a pool of
  ``align_pool`` retain images; skipped (summary ``alignment: "skipped: no BatchNorm"``) for towers
  without BatchNorm, such as ViTs.
- EMA decay, step counts, learning rates and the α grid, sized for a tiny CLIP on 2 CPU cores.

``three_stage`` deviates further; one line of why each (docs/methods.md has the measurements):
- No LoRA (``lora_rank`` 0): the tiny model's tensors are small, a rank would be a large part of them.
- Forget loss relu(cos_target - max_other cos + ``forget_margin``) (``forget_loss="margin"``): the
  zero-shot decision is relative, and a fixed floor let reminding bring the target straight back.
- Reminding keeps that loss as a guard (``remind_forget_weight``): without it reminding restored
  the forgotten subgroup.
- Half of each retain batch from the siblings (``sibling_share`` 0.5), KD weight 5 for a subgroup
  (``subgroup_distill_weight``): the siblings drifted to other shapes.
- A subgroup's calibration images must be forgotten by a cosine margin (``subgroup_soup_margin``):
  the zero-shot prediction alone let the α search stop where unseen images come back.
- Alignment through the unlearned model (``align_through``): reminding trains that model, so its
  inputs are matched to the network they are fed through; BatchNorm's running statistics are the
  original's either way (the model stays in eval mode).
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from unlearning.methods.base import LabelledImages, MethodResult, register
from unlearning.methods.common import (
    accuracy,
    class_text_features,
    image_features,
    sample_batch,
    zero_shot_logits,
)
from unlearning.methods.lora import add_lora, merge_lora, weight
from unlearning.methods.loop import BudgetConfig, class_prompts, forget_batch, forget_check, optimise, retain_batch, run_summary
from unlearning.metrics import encode_images, prepare_images, zero_shot_classifier
from unlearning.models import state_copy


class ThreeStageConfig(BudgetConfig):
    """Three-stage hyperparameters; ``lr``/``max_steps``/``batch_size`` budget the forgetting stage.

    The values behind each "ours" are in docs/methods.md."""

    lr: float = 1e-4
    max_steps: int = 60
    batch_size: int = 64
    # Stage 1: forgetting
    fisher_samples: int = 64
    fisher_chunk: int = 8
    top_k_tensors: int = 24  # of the tiny RN's 40 layer weights: fewer cost the siblings more
    # 0: update the selected tensors in full (ours); > 0: train rank-r LoRA adapters on them, merged at the end
    lora_rank: int = Field(0, ge=0)
    lora_alpha: float = 8.0  # the adapters' update is scaled by lora_alpha / lora_rank
    # "margin" (ours): relu(cos_target - max_other cos + forget_margin); "threshold" (paper): relu(cos_target - forget_threshold)
    forget_loss: Literal["margin", "threshold"] = "margin"
    forget_margin: float = 0.1
    forget_threshold: float = 0.0  # δ of the paper's loss (its value is not given)
    # Stage 2: reminding
    remind_steps: int = 60
    remind_lr: float = 1e-4
    distill_weight: float = 1.0
    subgroup_distill_weight: float = 5.0  # ours: the KD weight for a subgroup target (siblings drifted at 1)
    distill_temperature: float = 2.0
    remind_forget_weight: float = 5.0  # ours; paper 0 (reminds on retain data only)
    remind_scope: Literal["selected", "all"] = "selected"
    ema_decay: float = 0.9
    # the model the retain images are aligned through: "unlearned" (ours; the model reminding trains)
    # or "original" (the frozen original, whose BatchNorm statistics the alignment matches)
    align_through: Literal["unlearned", "original"] = "unlearned"
    align_steps: int = 20
    align_lr: float = 0.05
    align_l2: float = 1e-3
    align_pool: int = 256
    # Stage 3: restoring
    soup_alphas: list[float] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    # Ours: a calibration forget image counts as forgotten only when its best other class beats the
    # target by this cosine margin (0: the zero-shot prediction alone); the second value for a subgroup target.
    soup_margin: float = Field(0.0, ge=0.0)
    subgroup_soup_margin: float = Field(0.05, ge=0.0)

    @model_validator(mode="after")
    def _lora_on_the_selected_tensors(self) -> "ThreeStageConfig":
        if self.lora_rank and self.remind_scope != "selected":
            raise ValueError("lora_rank > 0 adapts the Fisher-selected tensors only, and remind_scope='all' would remind "
                             "every tensor in full — set remind_scope to 'selected', or lora_rank to 0")
        return self


class ThreeStagePaperConfig(ThreeStageConfig):
    """What we could read of the paper (methods.md 2.2): LoRA on the Fisher-selected layers, the
    forget loss "similarity below δ", reminding on the retain set (the sibling subgroups) with the
    CLIP loss, KD and a weight EMA, alignment through the original model, souping on a calibration set.

    The paper gives no rank, δ, KD form, EMA decay, learning rates, step counts or α rule (methods.md 6);
    those keep our values except: rank 4 with alpha 8 (LoRA on tensors this small), lr 1e-3 for both
    stages (a LoRA update starts from B = 0 and needs a larger step than full updates), δ = 0, exact
    per-sample Fisher (``fisher_chunk`` 1), KD weight 1 for every kind, α chosen on the zero-shot
    prediction alone (no margin).
    """

    lr: float = 1e-3
    fisher_chunk: int = 1
    lora_rank: int = Field(4, ge=0)
    forget_loss: Literal["margin", "threshold"] = "threshold"
    remind_lr: float = 1e-3
    subgroup_distill_weight: float = 1.0
    remind_forget_weight: float = 0.0
    sibling_share: float = 1.0  # the paper's retain set is the sibling subgroups
    align_through: Literal["unlearned", "original"] = "original"
    subgroup_soup_margin: float = Field(0.0, ge=0.0)


def soup(original_state: dict[str, torch.Tensor], unlearned_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Weight souping θ = α·θ_unlearned + (1 - α)·θ_original, per state-dict entry.

    Floating tensors (weights and BatchNorm running mean/var, whose interpolation stays a valid
    mean/variance) are interpolated; integer buffers (BatchNorm's ``num_batches_tracked``) cannot be,
    and come from the side with the larger weight. α = 0 and α = 1 return exact copies of either
    side (no arithmetic, so even -0.0 and NaN survive bit for bit).

    Args:
        original_state: state dict of the original model.
        unlearned_state: state dict of the unlearned model (same keys).
        alpha: weight of the unlearned model.
    """
    if alpha in (0.0, 1.0):
        return {k: v.clone() for k, v in (unlearned_state if alpha == 1.0 else original_state).items()}
    out = {}
    for key, original in original_state.items():
        unlearned = unlearned_state[key]
        if original.is_floating_point():
            out[key] = torch.lerp(original, unlearned.to(original.dtype), alpha)
        else:
            out[key] = (unlearned if alpha >= 0.5 else original).clone()
    return out


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KD loss: KL(teacher ‖ student) of the softened logits, per image, scaled by T² (Hinton et al.).

    Args:
        student_logits / teacher_logits: ``N x C`` zero-shot logits of the same images.
        temperature: softmax temperature T.
    """
    return F.kl_div((student_logits / temperature).log_softmax(dim=1), (teacher_logits / temperature).log_softmax(dim=1),
                    log_target=True, reduction="batchmean") * temperature**2


def reminding_terms(model: torch.nn.Module, teacher: torch.nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str],
                    classnames: Sequence[str], templates: Sequence[str], temperature: float) -> dict[str, torch.Tensor]:
    """The reminding stage's losses on a retain batch, from one pass of the student's image tower.

    Args:
        model: the student (gradients flow).
        teacher: the frozen original.
        images: uint8 or already-normalised float retain images.
        texts: their captions (for the CLIP loss).
        classnames / templates: the retained class prompts the KD logits are taken over.
        temperature: KD temperature.

    Returns:
        ``{"retain_clip_loss": CLIP loss of the pairs, "distillation": KD from the teacher's zero-shot logits}``.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        teacher_logits = zero_shot_logits(teacher, images, class_text_features(teacher, tokenizer, classnames, templates))
    image = image_features(model, images)
    text = F.normalize(model.encode_text(tokenizer(list(texts)).to(device)), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=device)
    student_logits = scale * image @ class_text_features(model, tokenizer, classnames, templates).T
    return {"retain_clip_loss": (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2,
            "distillation": distillation_kl(student_logits, teacher_logits, temperature)}


def _similarity(model: torch.nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Cosine similarity of each image to its paired text (differentiable)."""
    device = next(model.parameters()).device
    text = F.normalize(model.encode_text(tokenizer(list(texts)).to(device)), dim=-1)
    return (image_features(model, images) * text).sum(dim=-1)


def _is_layer_weight(name: str, parameter: torch.nn.Parameter) -> bool:
    """Candidates for selection: the weight matrices / conv kernels of layers, the tensors LoRA adapts
    (not norms, biases, embeddings, or ``logit_scale``)."""
    return parameter.ndim >= 2 and "embedding" not in name


def relative_fisher(model: torch.nn.Module, tokenizer, forget: tuple[torch.Tensor, list[str]], retain: tuple[torch.Tensor, list[str]],
                    chunk: int) -> dict[str, float]:
    """Per parameter tensor: mean squared gradient of the pair similarity on forget / the same on retain.

    Args:
        forget / retain: (images, paired texts).
        chunk: pairs per gradient; squared chunk gradients stand in for per-sample ones.

    Returns:
        ``{parameter name: relative Fisher}`` for every trainable layer weight (matrix or conv kernel).
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and _is_layer_weight(n, p)}

    def fisher(images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        total = {n: torch.zeros((), device=p.device) for n, p in named.items()}
        starts = range(0, len(images), chunk)
        for start in starts:
            sim = _similarity(model, tokenizer, images[start:start + chunk], texts[start:start + chunk]).mean()
            grads = torch.autograd.grad(sim, list(named.values()), allow_unused=True)
            for n, g in zip(named, grads):
                if g is not None:
                    total[n] += g.pow(2).mean()
        return {n: v / len(starts) for n, v in total.items()}

    on_forget, on_retain = fisher(*forget), fisher(*retain)
    floor = 1e-12 * max(float(v) for v in on_retain.values())  # tensors the retain set never touches
    return {n: float(on_forget[n] / (on_retain[n] + floor)) for n in named}


def align_to_batchnorm(model: torch.nn.Module, images: torch.Tensor, steps: int, lr: float, l2: float,
                       batch_size: int) -> torch.Tensor | None:
    """DeepInversion-style input alignment: learn δ per image so that the BatchNorm inputs of each
    batch have the layers' running mean and std.

    Args:
        images: uint8 retain images.
        steps / lr: Adam on δ (in normalised pixel space).
        l2: weight of the mean squared δ penalty, which keeps the images close to the originals.
        batch_size: images whose statistics are matched together.

    Returns:
        The aligned, normalised float images, or None when the vision tower has no BatchNorm.
    """
    layers = [m for m in model.visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return None
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0])) for m in layers]
    aligned = []
    try:
        for start in range(0, len(images), batch_size):
            x = prepare_images(model, images[start:start + batch_size])
            delta = torch.zeros_like(x, requires_grad=True)
            optimizer = torch.optim.Adam([delta], lr=lr)
            for _ in range(steps):
                captured.clear()
                model.encode_image(x + delta)
                loss = l2 * delta.pow(2).mean()
                for bn, a in zip(layers, captured):
                    mean, std = a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False).add(bn.eps).sqrt()
                    loss = loss + torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(std - (bn.running_var + bn.eps).sqrt())
                # Only δ learns here: take its gradient alone so no parameter gradient is left behind.
                (delta.grad,) = torch.autograd.grad(loss, [delta])
                optimizer.step()
            aligned.append((x + delta).detach())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(aligned)


@contextlib.contextmanager
def _train_only(model: torch.nn.Module, names: set[str]):
    """Freeze every parameter not in ``names`` (no gradients computed for them), then restore."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    try:
        yield [p for n, p in model.named_parameters() if n in names]
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def _forget_similarity_loss(model: torch.nn.Module, tokenizer, data, config: ThreeStageConfig, generator: torch.Generator) -> torch.Tensor:
    """Stage 1's objective on a batch of forget images, by ``config.forget_loss``:

    - "margin": push each image's cosine similarity to the target's prompt down to a floor δ = its
      best retained class prompt's similarity - ``forget_margin``, i.e. the mean of
      relu(cos_target - max_other cos + margin); zero once every image ranks another class first;
    - "threshold": the paper's, the mean of relu(cos_target - ``forget_threshold``).
    """
    images = sample_batch(data.forget, config.batch_size, generator).images
    sims = image_features(model, images) @ class_text_features(model, tokenizer, data.classnames, data.templates).T
    if config.forget_loss == "threshold":
        return F.relu(sims[:, data.forget_index] - config.forget_threshold).mean()
    return F.relu(margin_over_others(sims, data.forget_index) + config.forget_margin).mean()


def aligned_pool(model: torch.nn.Module, original: torch.nn.Module, pool: LabelledImages,
                 config: ThreeStageConfig) -> tuple[LabelledImages, str]:
    """The retain pool aligned to the BatchNorm statistics through the model ``config.align_through``
    names (:func:`align_to_batchnorm`), and a line saying what was done."""
    through = original if config.align_through == "original" else model
    aligned = align_to_batchnorm(through, pool.images, config.align_steps, config.align_lr, config.align_l2, config.batch_size)
    if aligned is None:
        return pool, "skipped: no BatchNorm"
    return (LabelledImages(aligned, pool.texts, pool.labels),
            f"{len(pool)} retain images, {config.align_steps} steps, through the {config.align_through} model")


def _remind(model, original, tokenizer, target, data, config: ThreeStageConfig, params: list[torch.nn.Parameter],
            tracked: list[str], generator: torch.Generator, progress, first_step: int) -> tuple[list[dict], str, dict[str, torch.Tensor]]:
    """Stage 2: align a retain pool to the BatchNorm statistics, then fine-tune ``params`` on it with
    the CLIP loss + KD (+ the optional forgetting guard).

    Returns:
        The history, the alignment line, and the EMA of the weights ``tracked`` (parameter names;
        with LoRA adapters on, of the adapted weights), for the caller to load.
    """
    pool, alignment = aligned_pool(model, original, retain_batch(target, data, config.align_pool, generator, config.sibling_share),
                                   config)
    retained = [c for i, c in enumerate(data.classnames) if i != data.forget_index]
    distill_weight = config.for_kind("distill_weight", target.kind)
    ema = {name: weight(model, name).detach().clone() for name in tracked}

    def update_ema():
        with torch.no_grad():
            for name, average in ema.items():
                average.lerp_(weight(model, name), 1 - config.ema_decay)

    def reminding_loss():
        batch = sample_batch(pool, config.batch_size, generator)
        terms = reminding_terms(model, original, tokenizer, batch.images, batch.texts, retained, data.templates,
                                config.distill_temperature)
        loss = terms["retain_clip_loss"] + distill_weight * terms["distillation"]
        if config.remind_forget_weight:
            terms["forget_similarity_loss"] = _forget_similarity_loss(model, tokenizer, data, config, generator)
            loss = loss + config.remind_forget_weight * terms["forget_similarity_loss"]
        return loss, terms

    history = optimise(params, reminding_loss, config.model_copy(update={"lr": config.remind_lr}), progress=progress,
                       stage="reminding", steps=config.remind_steps, after_step=update_ema, first_step=first_step)
    return history, alignment, ema


def margin_over_others(sims: torch.Tensor, index: int) -> torch.Tensor:
    """Per row: column ``index`` minus the largest other column (> 0: ``index`` ranks first)."""
    others = torch.cat([sims[:, :index], sims[:, index + 1:]], dim=1)
    return sims[:, index] - others.max(dim=1).values


@torch.no_grad()
def forget_margins(model: torch.nn.Module, tokenizer, images: torch.Tensor, classnames: Sequence[str], templates: Sequence[str],
                   index: int) -> torch.Tensor:
    """Each image's cosine similarity to class ``index``'s prompt minus its best other class's
    (> 0: the zero-shot prediction is still that class)."""
    sims = encode_images(model, images) @ zero_shot_classifier(model, tokenizer, classnames, templates).to(images.device)
    return margin_over_others(sims, index).cpu()


def choose_alpha(table: Sequence[dict], threshold: float) -> dict:
    """Stage 3's rule (module docstring): among the soup α whose share of calibration forget images
    still within the soup margin of the target (``remembered``) stays at or below max(``threshold``,
    that share at α = 1), the one with the highest calibration retain accuracy (ties go to the larger α).

    Args:
        table: one row per α with ``alpha``, ``remembered`` and ``retain_accuracy``; must hold α = 1.
        threshold: the stop rule's forget accuracy.
    """
    # Never forget less than the unsouped model does (it may miss the threshold: then souping may
    # still win retained accuracy back at no cost to forgetting).
    allowed = max(threshold, max(table, key=lambda row: row["alpha"])["remembered"])
    return max((row for row in table if row["remembered"] <= allowed), key=lambda row: (row["retain_accuracy"], row["alpha"]))


def calibration_row(model: torch.nn.Module, tokenizer, data, margin: float) -> tuple[dict, torch.Tensor]:
    """The calibration scores :func:`choose_alpha` reads, for the model as it is, and the calibration
    forget images' :func:`forget_margins` they come from.

    ``forget_accuracy``: share of calibration forget images still predicted as the target;
    ``remembered``: share within ``margin`` (cosine) of it; ``retain_accuracy``: calibration retain accuracy.
    """
    forget_cal, retain_cal = data.forget_val or data.forget, data.retain_val or data.retain
    margins = forget_margins(model, tokenizer, forget_cal.images, data.classnames, data.templates, data.forget_index)
    row = {"forget_accuracy": float((margins > 0).float().mean()), "remembered": float((margins > -margin).float().mean()),
           "retain_accuracy": accuracy(model, tokenizer, retain_cal, data.classnames, data.templates)}
    return row, margins


def _restore(model, original, tokenizer, target, data, threshold: float, config: ThreeStageConfig) -> list[dict]:
    """Stage 3: try each soup α on the calibration split and keep the one :func:`choose_alpha` picks.

    Returns:
        One row per α (calibration scores, ``chosen``); the model is left at the chosen α.
    """
    unlearned_state, original_state = state_copy(model), state_copy(original)
    margin = config.for_kind("soup_margin", target.kind)
    table = []
    for alpha in sorted(set(config.soup_alphas) | {1.0}, reverse=True):
        model.load_state_dict(soup(original_state, unlearned_state, alpha))
        row, _ = calibration_row(model, tokenizer, data, margin)
        table.append({"alpha": alpha, **row})
    best = choose_alpha(table, threshold)
    for row in table:
        row["chosen"] = row is best
    model.load_state_dict(soup(original_state, unlearned_state, best["alpha"]))
    return table


_PAPER = "Zhang et al., Targeted Forgetting of Image Subgroups in CLIP Models, CVPR 2025 (arXiv 2506.03117)"


@register("three_stage", ThreeStageConfig, target_kinds=("subgroup", "class"), needs_forget_data=True, needs_retain_data=True,
          needs_original=True, paper=_PAPER)
def three_stage(model, tokenizer, target, data, config: ThreeStageConfig, original=None, progress=None) -> MethodResult:
    """Forget ``target`` by Fisher-selected forgetting, reminding, and souping (module docstring).

    Args:
        model: the CLIP to unlearn, changed in place (kept in ``eval()``).
        tokenizer: its tokenizer.
        target: a subgroup or class target.
        data: ``forget`` and ``retain`` images; ``forget_val`` + ``retain_val`` are the stop set and
            the α-calibration split (``forget`` / ``retain`` stand in when they are missing).
        config: a :class:`ThreeStageConfig`.
        original: the frozen original (KD teacher, soup endpoint).
        progress: called with each history row.
    """
    original.eval()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    score, threshold = forget_check(model, tokenizer, target, data, config)
    seconds = {}

    # Stage 1: relative Fisher picks the tensors, then only they push the forget similarity down.
    forget_images, forget_texts = forget_batch(target, data, config.fisher_samples, generator)
    retain = retain_batch(target, data, config.fisher_samples, generator, config.sibling_share)
    ranking = relative_fisher(model, tokenizer, (forget_images, forget_texts), (retain.images, class_prompts(data, retain, generator)),
                              config.fisher_chunk)
    selected = sorted(ranking, key=ranking.get, reverse=True)[: config.top_k_tensors]

    def forgetting_step():
        loss = _forget_similarity_loss(model, tokenizer, data, config, generator)
        return loss, {"forget_similarity_loss": loss}

    reminded = set(selected) if config.remind_scope == "selected" else {n for n, p in model.named_parameters() if n != "logit_scale"}
    trained = set(selected)
    try:
        if config.lora_rank:  # only the adapters train, in both stages; merged before souping
            adapters = add_lora(model, selected, config.lora_rank, config.lora_alpha, generator)
            trained = {n for n, p in model.named_parameters() if any(p is a for a in adapters)}
        with _train_only(model, trained) as params:
            history = optimise(params, forgetting_step, config, score, threshold, progress, stage="forgetting")
        seconds["forgetting"] = time.perf_counter() - started
        # Stage 2 (see _remind), on the same adapters where there are any.
        with _train_only(model, trained if config.lora_rank else reminded) as params:
            reminding, alignment, ema = _remind(model, original, tokenizer, target, data, config, params, sorted(reminded),
                                                generator, progress, first_step=history[-1]["step"])
    finally:
        merge_lora(model)  # a plain open_clip model again, whatever happened
    with torch.no_grad():  # the weight EMA becomes the model
        for name, average in ema.items():
            model.get_parameter(name).copy_(average)
    history += reminding
    seconds["reminding"] = time.perf_counter() - started - seconds["forgetting"]

    table = _restore(model, original, tokenizer, target, data, threshold, config)
    seconds["restoring"] = time.perf_counter() - started - seconds["forgetting"] - seconds["reminding"]
    for row in table:
        history.append({"stage": "restoring", **row})
        if progress:
            progress(history[-1])
    best = next(row for row in table if row["chosen"])
    summary = run_summary(history, threshold, started)
    summary.update(selected_tensors={n: round(ranking[n], 3) for n in selected}, lora_rank=config.lora_rank, alignment=alignment,
                   alpha=best["alpha"],
                   soup=table, forget_accuracy=best["forget_accuracy"], stopped=best["forget_accuracy"] <= threshold,
                   stage_seconds={k: round(v, 2) for k, v in seconds.items()})
    return MethodResult(model, history, summary)


register("three_stage:paper", ThreeStagePaperConfig, target_kinds=("subgroup", "class"), needs_forget_data=True,
         needs_retain_data=True, needs_original=True, paper=f"{_PAPER} (as far as the paper can be read)")(three_stage)
