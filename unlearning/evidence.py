"""Evidence of forgetting beyond accuracy: membership inference and relearning.

Low forget accuracy can hide knowledge that is still there. Two checks look deeper:

- :func:`forget_membership_auc`: can a loss-based attacker tell the forget samples from unseen samples
  of the same distribution? 0.5 is the goal; well above it, the model still treats the forget set
  as familiar; well below, the forget set stands out by being too unfamiliar.
- :func:`relearn_test`: how fast does the target come back when an attacker fine-tunes on a few
  forget images? Compared with the original model under the same attack, shallow forgetting
  recovers in a handful of steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData
from unlearning.methods.common import accuracy, class_text_features, clip_contrastive_loss, zero_shot_logits
from unlearning.metrics import membership_inference_auc


def forget_membership_auc(model: torch.nn.Module, tokenizer, forget: LabelledImages, unseen: LabelledImages,
                          classnames: Sequence[str] | None = None, template: str = "a photo of a {}.") -> float:
    """Membership-inference AUC of the forget set against unseen samples of the same distribution.

    Wraps :func:`unlearning.metrics.membership_inference_auc`. The attack signal is each image's
    cross-entropy against its own text among the candidates:

    - with ``classnames`` (class / subgroup targets): the text is the image's class prompt in
      ``template`` and the candidates are every class prompt (zero-shot CE);
    - without: the text is the image's caption and the candidates are all captions of both sets.

    Args:
        forget: the samples that were forgotten (members of the original training data).
        unseen: samples of the same distribution the model never trained on (e.g. test images of the target).
        classnames: zero-shot classes that ``labels`` index; None to attack on captions.
        template: class-prompt template when ``classnames`` is given.
    """
    if classnames is None:
        return membership_inference_auc(model, tokenizer, forget.images, forget.texts, unseen.images, unseen.texts,
                                        forget.texts + unseen.texts)
    prompts = [template.format(c) for c in classnames]
    return membership_inference_auc(model, tokenizer, forget.images, [prompts[i] for i in forget.labels.tolist()],
                                    unseen.images, [prompts[i] for i in unseen.labels.tolist()], prompts)


@dataclass
class RelearnResult:
    """Forget-target accuracy after each attack step (index 0: before the attack)."""

    steps: list[int]
    unlearned: list[float]
    original: list[float]

    @property
    def recovered_fraction(self) -> float:
        """Final unlearned accuracy as a fraction of the original's final accuracy under the same attack."""
        return self.unlearned[-1] / self.original[-1] if self.original[-1] > 0 else float("nan")


def _relearn_curve(model: torch.nn.Module, tokenizer, attack: LabelledImages, evaluation: LabelledImages, classnames: Sequence[str],
                   attack_templates: Sequence[str], templates: Sequence[str], steps: int, lr: float, loss: str,
                   checkpoints: Sequence[int] | None = None) -> list[float]:
    """Fine-tune a copy of ``model`` on ``attack`` (full batch, Adam) and track accuracy on ``evaluation``
    after each step count in ``checkpoints`` (ascending, at most ``steps``; default: every step, 0 included)."""
    # eval(): the attack set is a single class (BatchNorm, see base.py); requires_grad: the frozen
    # original arrives with its parameters switched off.
    model = copy.deepcopy(model).eval().requires_grad_(True)
    params = [p for n, p in model.named_parameters() if n != "logit_scale"]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # fused: one update over all tensors, several times faster on CPU
    tracked = set(range(steps + 1) if checkpoints is None else checkpoints)
    curve = [accuracy(model, tokenizer, evaluation, classnames, templates)] if 0 in tracked else []
    for step in range(1, steps + 1):
        if loss == "zero_shot":
            logits = zero_shot_logits(model, attack.images, class_text_features(model, tokenizer, classnames, attack_templates))
            value = F.cross_entropy(logits, attack.labels.to(logits.device))
        else:
            value = clip_contrastive_loss(model, tokenizer, attack.images, attack.texts)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if step in tracked:
            curve.append(accuracy(model, tokenizer, evaluation, classnames, templates))
    return curve


def relearn_test(model: torch.nn.Module, original: torch.nn.Module, tokenizer, target: ForgetTarget, data: UnlearningData,
                 steps: int = 10, lr: float = 1e-4, shots: int = 8, loss: Literal["zero_shot", "contrastive"] = "zero_shot",
                 templates: Sequence[str] = ("a photo of a {}.",), evaluation: LabelledImages | None = None, seed: int = 0) -> RelearnResult:
    """Relearning attack: fine-tune on ``shots`` forget images, on the unlearned model and identically on the original.

    Neither model is changed: each attack fine-tunes a copy.

    Args:
        model: the unlearned model.
        original: the model before unlearning (the reference curve).
        target: a class or subgroup target (``data.forget_index`` is its class).
        data: its :class:`UnlearningData`; the attack images are drawn from ``data.forget``, and the
            attack's zero-shot loss uses ``data.classnames`` in the training ``data.templates``.
        steps: attack steps (full batch over the attack images).
        lr: attack learning rate (Adam).
        shots: how many forget images the attacker has.
        loss: "zero_shot" (CE against the class prompts) or "contrastive" (CLIP loss with the captions).
        templates: evaluation prompts of the tracked accuracy.
        evaluation: held-out target images to track (labels index ``data.classnames``); default
            ``data.forget_val``, else the forget images not used by the attack.
        seed: picks the attack images.

    Returns:
        Both accuracy curves, ``steps + 1`` points each (point 0: before the attack).
    """
    if target.kind == "association":
        raise ValueError("relearn_test measures class / subgroup accuracy; association targets have no class to relearn")
    if loss not in ("zero_shot", "contrastive"):
        raise ValueError(f"loss must be 'zero_shot' or 'contrastive', not {loss!r}")
    order = torch.randperm(len(data.forget), generator=torch.Generator().manual_seed(seed))
    attack = data.forget.subset(order[:shots])
    evaluation = evaluation or data.forget_val or data.forget.subset(order[shots:])
    args = (tokenizer, attack, evaluation, data.classnames, data.templates, templates, steps, lr, loss)
    return RelearnResult(list(range(steps + 1)), _relearn_curve(model, *args), _relearn_curve(original, *args))
