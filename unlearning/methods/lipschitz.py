"""Lipschitz forgetting with synthetic samples (Kravets & Namboodiri, WACV 2025; methods.md section 1).

The paper's recipe (reference code ``train_forget.py``, ``clip_forget_losses.py``), registered as
``lipschitz:paper`` (:class:`LipschitzPaperConfig`):

A. Synthesise 64 forget images from noise by gradient ascent on the target's text similarity
   (:mod:`unlearning.synthetic`, :meth:`SynthesisConfig.paper`); no real image of the class is used.
B. Minimise the joint Lipschitz loss K = (||e_t - e_x~|| + ||e_x - e_x~||) / (2 ||x - x~||), summed
   over the batch and the 25 noise draws and divided by 2 x draws, on raw projected features, with
   x~ = clamp(x + N(0, sigma^2)) to the batch min/max and e_x~ computed without gradient. Each step
   pulls the target's text embedding and its images' embeddings towards embeddings of noise.
C. After each backward pass keep only the top-k parameter tensors by mean |grad| in each tower
   (``model.visual``, ``model.transformer``); token/positional embeddings, ln_final,
   text_projection and logit_scale lie outside both and are never updated. Adam (lr 5e-5,
   betas (0.9, 0.98), eps 1e-6, weight decay 0.2) then skips every tensor without a gradient.
D. One optimiser step per epoch (64 images, batch 64). Check the training set's synthetic-forget
   accuracy after every step and stop at <= 0.1; at the end of each epoch keep the model if that
   accuracy fell, else roll model and optimiser back to the epoch's start and escalate sigma
   (0.1 ... 2) and k together along a schedule; at most 30 epochs.

``lipschitz`` (:class:`LipschitzConfig`) is our variant for a 32-px CLIP; every deviation is a
config field whose comment says "ours", and docs/methods.md gives the measurements behind each:

1. Synthesis grows images for longer from smooth noise, scored through zoom and colour jitter:
   the paper's images stay adversarial noise on this model and forgetting them did not transfer.
2. ``k_visual`` is 0: visual updates hurt other classes before the target.
3. sigma 2, 3, 4: the model still sees the class through weaker noise.
4. A data-free text anchor (``anchor_weight``) keeps other prompts in place; the paper has none.
5. Stop on held-out synthetic images at accuracy 0 and mean target probability <= 1 %
   (``stop_set``, ``stop_forget_prob``): accuracy alone stopped with real images left.
6. lr 1e-3, 4 draws, k_text 4/8/12, 30 steps per epoch: the paper's budget moved nothing here.
7. The noise embeddings the text is pulled to lose part of their component along the target
   prompt (``noise_target_removal``): noise itself looks like some shapes to this model.
8. The loss is the mean over batch and draws (``loss_reduction="mean"``), 2/B of the paper's sum /
   (2 x draws): with Adam only the balance against the coupled weight decay and the anchor
   changes, and every weight above was tuned with the mean.
9. An epoch that keeps the accuracy but lowers the mean target probability counts as better
   (``best_by_probability``): with accuracy 0 as the goal, ties are common.

Real images are used only when asked: ``use_real_forget`` or ``stop_set="forget_val"``.
"""

from __future__ import annotations

import copy
import time
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from unlearning.methods.base import ForgetTarget, LabelledImages, MethodConfig, MethodResult, ProgressFn, UnlearningData, register
from unlearning.methods.common import text_anchors, text_drift
from unlearning.metrics import encode_images, prepare_images, zero_shot_classifier
from unlearning.models import state_copy
from unlearning.synthetic import SynthesisConfig, synthesize

# Parameter tensors the reference code never updates in an RN visual tower (frozen_params.FREEZE_RN:
# convolutions, downsample branches, the attention-pool positional embedding; BatchNorm is frozen).
RN_FROZEN = ("conv", "downsample", "bn", "attnpool.positional_embedding")


class LipschitzConfig(MethodConfig):
    """Hyperparameters of :func:`run`. Paper values unless the comment says "ours" (module doc: why)."""

    lr: float = 1e-3  # ours; paper 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    batch_size: int = 64
    max_steps: int = 100  # ours: a step budget on top of max_epochs
    max_epochs: int = 30
    steps_per_epoch: int = Field(30, ge=1)  # ours; paper 1 (64 images in batches of 64)
    n_noise: int = 4  # ours; paper 25 (README run)
    sigma_schedule: list[float] = Field(default_factory=lambda: [2.0, 3.0, 4.0])  # ours; paper 0.1 ... 2
    k_visual_schedule: list[int] = Field(default_factory=lambda: [0, 0, 0])  # ours; paper (RN50) 5, 7, 10, ...
    k_text_schedule: list[int] = Field(default_factory=lambda: [4, 8, 12])  # ours; paper (RN50) 5, 7, 12, ...
    frozen_visual: list[str] | None = None  # substrings of visual names never updated; None: RN_FROZEN for a ResNet
    normalize_features: bool = False  # the paper compares raw projected features
    # ours; 0 = paper: share of the target prompt's own direction taken out of the noise embeddings
    # the text is pulled towards (module doc, point 7)
    noise_target_removal: float = Field(1.5, ge=0.0)
    subgroup_noise_target_removal: float = Field(1.0, ge=0.0)  # ours: the same for a subgroup target (module doc, point 7)
    anchor_weight: float = 1.0  # ours; 0 = paper: keep other prompts' embeddings in place (see anchor_prompts)
    subgroup_anchor_weight: float = 0.3  # ours: the anchor's weight for a subgroup target (module doc, point 4)
    anchor_random_words: int = 128  # ours: random vocabulary words among the anchored prompts
    stop_forget_accuracy: float = 0.0  # ours; paper 0.1 (README run)
    stop_forget_prob: float = 0.01  # ours: also require the stop set's mean target probability this low
    stop_set: Literal["heldout", "train", "forget_val"] = "heldout"  # ours; paper "train"
    n_stop_images: int = 32  # synthetic images held out of the loss for the stop rule
    use_real_forget: bool = False  # use data.forget (real images) instead of synthesising
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    # ours; paper "paper": "mean" averages K over batch and draws; "paper" sums it and divides by
    # 2 x draws (clip_forget_losses.py), B/2 times the mean (module doc, point 8)
    loss_reduction: Literal["mean", "paper"] = "mean"
    best_by_probability: bool = True  # ours; paper False: a lower target probability breaks accuracy ties (point 9)

    @model_validator(mode="after")
    def _schedules_match(self) -> "LipschitzConfig":
        lengths = {len(self.sigma_schedule), len(self.k_visual_schedule), len(self.k_text_schedule)}
        if len(lengths) != 1 or not self.sigma_schedule:
            raise ValueError("sigma_schedule, k_visual_schedule and k_text_schedule must be non-empty and equally long "
                             "(one escalation level per entry)")
        if self.use_real_forget and self.stop_set == "heldout":
            raise ValueError("stop_set='heldout' holds out synthetic images, and use_real_forget trains on real ones "
                             "— with use_real_forget set stop_set to 'train' or 'forget_val'")
        return self

    def data_needs(self) -> tuple[str, ...]:
        return (("forget",) if self.use_real_forget else ()) + (("forget_val",) if self.stop_set == "forget_val" else ())


# The reference code's RN50 k schedules (train_utils.set_param_schedules), as many entries as sigma
# levels. Visual: our tiny RN has the same 8 candidate tensors as RN50 (the attention pool's q/k/v/c
# weights and biases), so the values are kept (k >= 8 keeps all 8). Text: RN50's text transformer
# has 12 blocks of 12 tensors, ours 4 of 12, so k is scaled by 48/144 (5, 7, 12, 18, 25, 30, 35 ->
# 2, 2, 4, 6, 8, 10, 12): the same share of the tower at each level.
PAPER_SIGMAS = [0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0]
PAPER_K_VISUAL = [5, 7, 10, 13, 15, 20, 25]
PAPER_K_TEXT = [2, 2, 4, 6, 8, 10, 12]


class LipschitzPaperConfig(LipschitzConfig):
    """The reference recipe (``train.sh 1 1 0 1 25 0.1 ... RN50``): every "ours" of
    :class:`LipschitzConfig` set back to the paper's value."""

    lr: float = 5e-5
    max_steps: int = 30  # one step per epoch for max_epochs: no extra cap
    steps_per_epoch: int = Field(1, ge=1)
    n_noise: int = 25
    sigma_schedule: list[float] = Field(default_factory=lambda: list(PAPER_SIGMAS))
    k_visual_schedule: list[int] = Field(default_factory=lambda: list(PAPER_K_VISUAL))
    k_text_schedule: list[int] = Field(default_factory=lambda: list(PAPER_K_TEXT))
    noise_target_removal: float = Field(0.0, ge=0.0)
    subgroup_noise_target_removal: float = Field(0.0, ge=0.0)
    anchor_weight: float = 0.0
    subgroup_anchor_weight: float = 0.0
    stop_forget_accuracy: float = 0.1
    stop_forget_prob: float = 1.0  # no probability condition
    stop_set: Literal["heldout", "train", "forget_val"] = "train"
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig.paper)
    loss_reduction: Literal["mean", "paper"] = "paper"
    best_by_probability: bool = False


def perturb(model: torch.nn.Module, x: torch.Tensor, sigma: float, n_noise: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies x~ = clamp(x + N(0, sigma^2)) of a batch and their embeddings e_x~ (no grad).

    The clamp bounds are the min and max of the whole batch (``AddGaussianNoise`` in the reference).

    Args:
        model: the CLIP being unlearned.
        x: normalised model input ``B x 3 x S x S``.
        sigma: noise standard deviation, in normalised pixel units.
        n_noise: noise draws per image.
        generator: source of the noise.

    Returns:
        ``x~`` as ``n_noise x B x 3 x S x S`` and raw projected ``e_x~`` as ``n_noise x B x D``.
    """
    noise = torch.randn((n_noise, *x.shape), generator=generator).to(x) * sigma
    x_noisy = (x.unsqueeze(0) + noise).clamp(x.min(), x.max())
    with torch.no_grad():
        e_noisy = model.encode_image(x_noisy.flatten(0, 1)).view(n_noise, x.shape[0], -1)
    return x_noisy, e_noisy


def without_direction(features: torch.Tensor, direction: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """``features`` less ``share`` of their component along ``direction`` (share 1: projected onto
    the orthogonal complement, 2: mirrored through it)."""
    unit = F.normalize(direction, dim=-1)
    return features - share * (features @ unit).unsqueeze(-1) * unit


def lipschitz_loss(model: torch.nn.Module, text_tokens: torch.Tensor, x: torch.Tensor, x_noisy: torch.Tensor,
                   e_noisy: torch.Tensor, normalize: bool = False, text_noisy: torch.Tensor | None = None,
                   reduction: Literal["mean", "paper"] = "mean") -> torch.Tensor:
    """The joint visual/textual Lipschitz loss (``clip_forget_losses.lipschitz_loss_joint``).

    K = (||e_t - e_x~|| + ||e_x - e_x~||) / (2 ||x - x~||) per image and draw. e_t and e_x carry
    gradients; e_x~ (from :func:`perturb`) does not, so each step pulls the target's text and
    clean-image embeddings towards the embeddings of noisy images, which is what erases the class.

    Args:
        model: the CLIP being unlearned.
        text_tokens: tokenised target prompt(s), ``T x L``; the text term is averaged over them.
        x: normalised model input ``B x 3 x S x S``.
        x_noisy, e_noisy: from :func:`perturb`.
        normalize: compare L2-normalised embeddings instead of the raw projected features.
        text_noisy: the e_x~ the text term pulls towards, if not ``e_noisy`` (see :func:`without_direction`).
        reduction: "mean": K averaged over draws and images; "paper": summed and divided by
            2 x draws, as the reference code does (B/2 times the mean for a batch of B).
    """
    def embed(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=-1) if normalize else f

    e_t, e_x, e_n = embed(model.encode_text(text_tokens)), embed(model.encode_image(x)), embed(e_noisy)
    e_n_text = e_n if text_noisy is None else embed(text_noisy)
    d_in = (x.unsqueeze(0) - x_noisy).flatten(2).norm(dim=-1)  # draws x B
    d_text = (e_t.view(1, -1, 1, e_t.shape[-1]) - e_n_text.unsqueeze(1)).norm(dim=-1).mean(dim=1)
    d_image = (e_x.unsqueeze(0) - e_n).norm(dim=-1)
    k = (d_text + d_image) / (2 * d_in)
    if reduction == "paper":
        return k.sum() / (2 * k.shape[0])
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'paper', not {reduction!r}")
    return k.mean()


def tower_parameters(model: torch.nn.Module, frozen_visual: Sequence[str] | None = None) -> dict[str, dict[str, torch.nn.Parameter]]:
    """The tensors the mask chooses among, per tower: ``model.visual`` and ``model.transformer``.

    Token/positional embeddings, ln_final, text_projection and logit_scale live outside both towers
    and are never updated.

    Args:
        model: an open_clip CLIP.
        frozen_visual: substrings of visual parameter names to leave out; None: the reference's
            RN50 list (:data:`RN_FROZEN`) for a ResNet tower, nothing for a ViT.
    """
    if frozen_visual is None:
        frozen_visual = RN_FROZEN if hasattr(model.visual, "attnpool") else ()
    visual = {f"visual.{n}": p for n, p in model.visual.named_parameters() if not any(f in n for f in frozen_visual)}
    text = {f"transformer.{n}": p for n, p in model.transformer.named_parameters()}
    return {"visual": visual, "text": text}


def keep_top_k(towers: dict[str, dict[str, torch.nn.Parameter]], k: dict[str, int]) -> list[str]:
    """Keep the gradients of the ``k[tower]`` tensors with the largest mean |grad| in each tower; set
    every other gradient to None so Adam neither steps nor decays them. Returns the kept names."""
    kept = []
    for tower, params in towers.items():
        scored = sorted(((p.grad.abs().mean().item(), name) for name, p in params.items() if p.grad is not None), reverse=True)
        keep = {name for _, name in scored[: k[tower]]}
        for name, p in params.items():
            if name not in keep:
                p.grad = None
        kept += sorted(keep)
    return kept


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the model's and the optimiser's state, for :func:`restore`."""
    return state_copy(model), copy.deepcopy(optimizer.state_dict())


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: tuple[dict, dict]) -> None:
    """Put model and optimiser back, bit for bit, to a :func:`snapshot` (which stays reusable)."""
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(copy.deepcopy(saved[1]))  # load_state_dict may alias the tensors it is given


def _labelled(images: torch.Tensor, index: int, name: str) -> LabelledImages:
    return LabelledImages(images, [name] * len(images), torch.full((len(images),), index, dtype=torch.long))


@torch.no_grad()
def _forget_score(model: torch.nn.Module, tokenizer, stop: LabelledImages, classnames: Sequence[str], templates: Sequence[str],
                  target: int) -> tuple[float, float]:
    """(accuracy, mean target probability) of the stop set: accuracy decides, probability breaks ties."""
    logits = model.logit_scale.exp().clamp(max=100) * encode_images(model, stop.images) @ zero_shot_classifier(model, tokenizer, classnames, templates)
    return float((logits.argmax(dim=-1) == target).float().mean()), float(logits.softmax(dim=-1)[:, target].mean())


_PAPER = "Kravets & Namboodiri, Zero-Shot Class Unlearning in CLIP with Synthetic Samples, WACV 2025"


@register("lipschitz", LipschitzConfig, target_kinds=["class", "subgroup"], needs_forget_data=False,
          needs_retain_data=False, needs_original=False, paper=_PAPER)
def run(model: torch.nn.Module, tokenizer, target: ForgetTarget, data: UnlearningData, config: LipschitzConfig,
        original: torch.nn.Module | None = None, progress: ProgressFn | None = None) -> MethodResult:
    """Forget ``data.classnames[data.forget_index]`` by minimising the Lipschitz loss on synthetic images.

    Args:
        model: the CLIP to unlearn (changed in place, kept in eval mode).
        tokenizer: its tokenizer.
        target: a class or subgroup target; ``data.forget_index`` points at it in ``data.classnames``.
        data: ``classnames``, ``forget_index`` and the training ``templates``. Real ``forget`` images
            are used only with ``use_real_forget``, real ``forget_val`` only with ``stop_set="forget_val"``.
        config: :class:`LipschitzConfig`.
        original: unused (the anchor's reference embeddings are computed here, before any step).
        progress: called with every history row.

    Returns:
        The result; ``artifacts["synthetic_images"]`` holds the synthetic set (training + stop images).
    """
    if data.forget_index is None:
        raise ValueError("lipschitz needs data.forget_index (the target's index in data.classnames)")
    started = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    index, templates = data.forget_index, data.templates
    name = data.classnames[index]

    # Step A: the forget set (synthetic unless told otherwise) and the stop set.
    synthetic_images = None
    n_stop = config.n_stop_images if config.stop_set == "heldout" else 0
    if config.use_real_forget and data.forget is not None:
        forget = data.forget
    else:
        n_train = config.synthesis.n_images
        synthetic = synthesize(model, tokenizer, data.classnames, index, config.synthesis.model_copy(update={"n_images": n_train + n_stop}),
                               templates)
        synthetic_images = synthetic.images
        forget = _labelled(synthetic.images[:n_train], index, name)
    if config.stop_set == "heldout":
        if synthetic_images is None:
            raise ValueError("stop_set='heldout' holds out synthetic images: it cannot be used with use_real_forget")
        stop = _labelled(synthetic_images[-n_stop:], index, name)
    elif config.stop_set == "forget_val":
        if data.forget_val is None:
            raise ValueError("stop_set='forget_val' needs data.forget_val (real held-out images of the target)")
        stop = data.forget_val
    else:
        stop = forget
    synthesis_seconds = time.perf_counter() - started

    # Steps B-D: the loss, the top-k mask, and the keep-best / roll-back-and-escalate loop.
    text_tokens = tokenizer([t.format(name) for t in templates]).to(device)
    with torch.no_grad():  # the target prompt's direction before any step (point 7 of the module doc)
        target_direction = model.encode_text(text_tokens).mean(dim=0)
    anchor_weight = config.for_kind("anchor_weight", target.kind)
    removal = config.for_kind("noise_target_removal", target.kind)
    anchors = (text_anchors(model, tokenizer, data.classnames, index, templates, config.anchor_random_words, generator)
               if anchor_weight else [])
    towers = tower_parameters(model, config.frozen_visual)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)  # gradients only for the mask's candidates, set per level below
    optimizer = torch.optim.Adam([p for params in towers.values() for p in params.values()], lr=config.lr,
                                 betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)

    history: list[dict] = []
    best = _forget_score(model, tokenizer, stop, data.classnames, templates, index)
    best_state, level, step = None, 0, 0

    def forgotten(score: tuple[float, float]) -> bool:
        return score[0] <= config.stop_forget_accuracy and score[1] <= config.stop_forget_prob

    done = forgotten(best)
    for epoch in range(config.max_epochs):
        if done:
            break
        epoch_start = snapshot(model, optimizer)
        sigma = config.sigma_schedule[level]
        k = {"visual": config.k_visual_schedule[level], "text": config.k_text_schedule[level]}
        for tower, params in towers.items():  # a tower with k = 0 needs no backward pass
            for p in params.values():
                p.requires_grad_(k[tower] > 0)
        for _ in range(config.steps_per_epoch):
            batch = torch.randperm(len(forget), generator=generator)[: config.batch_size]
            x = prepare_images(model, forget.images[batch])
            x_noisy, e_noisy = perturb(model, x, sigma, config.n_noise, generator)
            optimizer.zero_grad(set_to_none=True)
            text_noisy = without_direction(e_noisy, target_direction, removal) if removal else None
            loss = lipschitz_loss(model, text_tokens, x, x_noisy, e_noisy, config.normalize_features, text_noisy,
                                  config.loss_reduction)
            for tokens, anchor in anchors:
                loss = loss + anchor_weight * text_drift(model, tokens, anchor)
            loss.backward()
            kept = keep_top_k(towers, k)
            optimizer.step()
            step += 1
            score = _forget_score(model, tokenizer, stop, data.classnames, templates, index)
            row = {"step": step, "epoch": epoch, "loss": loss.item(), "synthetic_forget_acc": score[0], "synthetic_forget_prob": score[1],
                   "sigma": sigma, "k_visual": k["visual"], "k_text": k["text"], "layers": kept}
            history.append(row)
            if progress:
                progress(row)
            done = forgotten(score) or step >= config.max_steps
            if done:
                break
        if score[0] < best[0] or (config.best_by_probability and score < best):  # lower accuracy, then lower probability
            best, best_state = score, state_copy(model)
        else:  # the epoch did not help: undo it and escalate noise and layer count together
            restore(model, optimizer, epoch_start)
            level += 1
            if level == len(config.sigma_schedule):
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(requires_grad[n])
    summary = {"steps": step, "epochs": history[-1]["epoch"] + 1 if history else 0, "synthetic_forget_acc": best[0], "synthetic_forget_prob": best[1],
               "final_sigma": config.sigma_schedule[min(level, len(config.sigma_schedule) - 1)],
               "anchor_weight": anchor_weight, "noise_target_removal": removal,
               "synthesis_seconds": round(synthesis_seconds, 2), "seconds": round(time.perf_counter() - started, 2)}
    artifacts = {"synthetic_images": synthetic_images} if synthetic_images is not None else {}
    return MethodResult(model, history, summary, artifacts)


register("lipschitz:paper", LipschitzPaperConfig, target_kinds=["class", "subgroup"], needs_forget_data=False,
         needs_retain_data=False, needs_original=False, paper=f"{_PAPER} (the authors' recipe)")(run)
