"""Evaluation primitives: zero-shot accuracy (overall, per class, confusion), retrieval recall,
and evidence of forgetting beyond accuracy (membership inference, relearning).

Everything is batched and runs on the model's device; images come in as uint8 tensors and are
normalised here with the model's own mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from unlearning.data import Record, ZeroShotTask, normalize


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def image_stats(model: torch.nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """The normalisation mean/std open_clip attached to the vision tower."""
    visual = model.visual
    return getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073), getattr(
        visual, "image_std", None
    ) or (0.26862954, 0.26130258, 0.27577711)


def prepare_images(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any size) to normalised float input at the model's resolution, on its device."""
    device = model_device(model)
    x = images.to(device)
    if x.dtype == torch.uint8:
        mean, std = image_stats(model)
        x = normalize(x, mean, std)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512, normalized: bool = True) -> torch.Tensor:
    """Image embeddings, L2-normalised unless ``normalized=False``."""
    feats = [model.encode_image(prepare_images(model, images[i : i + batch_size])).float() for i in range(0, len(images), batch_size)]
    out = torch.cat(feats) if feats else torch.empty(0, 0)
    return F.normalize(out, dim=-1) if normalized and len(out) else out


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 512, normalized: bool = True) -> torch.Tensor:
    """Text embeddings, L2-normalised unless ``normalized=False``."""
    device = model_device(model)
    feats = [model.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device)).float() for i in range(0, len(texts), batch_size)]
    out = torch.cat(feats)
    return F.normalize(out, dim=-1) if normalized else out


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Class weights ``D x C``: per class, the normalised mean of its normalised template embeddings
    (a template ensemble when ``templates`` has more than one entry)."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).T


@dataclass
class ZeroShotResult:
    """Accuracy of one zero-shot task. ``confusion[i, j]`` counts true class i predicted as j."""

    accuracy: float
    per_class: dict[str, float]
    confusion: torch.Tensor
    classnames: list[str]
    predictions: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    n: int = 0

    def accuracy_over(self, classnames: Sequence[str]) -> float:
        """Accuracy restricted to images whose true class is in ``classnames`` (still C-way)."""
        idx = [self.classnames.index(c) for c in classnames]
        mask = torch.isin(self.labels, torch.tensor(idx, dtype=torch.long))
        return float((self.predictions[mask] == self.labels[mask]).float().mean()) if mask.any() else float("nan")


def classify(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return (image_features @ classifier.to(image_features.device)).argmax(dim=-1).cpu()


def accuracy_from_predictions(predictions: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> ZeroShotResult:
    n_classes = len(classnames)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    if len(labels):
        confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for i, name in enumerate(classnames):
        total = int(confusion[i].sum())
        if total:
            per_class[name] = float(confusion[i, i]) / total
    accuracy = float((predictions == labels).float().mean()) if len(labels) else float("nan")
    return ZeroShotResult(accuracy, per_class, confusion, list(classnames), predictions, labels, len(labels))


def zero_shot_accuracy(model: torch.nn.Module, tokenizer, images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                       templates: Sequence[str] = ("a photo of a {}.",), image_features: torch.Tensor | None = None) -> ZeroShotResult:
    """Zero-shot accuracy of ``images`` against ``classnames``, overall, per class and as a confusion matrix.

    Args:
        images: uint8 ``N x 3 x H x W`` (ignored when ``image_features`` are given).
        labels: class index per image.
        image_features: precomputed normalised image embeddings, to share one encoding across tasks.
    """
    feats = image_features if image_features is not None else encode_images(model, images)
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates)
    return accuracy_from_predictions(classify(feats, classifier), labels.cpu(), classnames)


def evaluate_task(model: torch.nn.Module, tokenizer, task: ZeroShotTask, records: Sequence[Record], images: torch.Tensor,
                  image_features: torch.Tensor | None = None) -> ZeroShotResult:
    """Run a :class:`ZeroShotTask` over the records it covers."""
    keep, labels = task.targets(records)
    feats = image_features if image_features is not None else encode_images(model, images)
    return zero_shot_accuracy(model, tokenizer, None, labels, task.classnames, task.templates, image_features=feats[keep])


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image<->text Recall@k where image i and text i are a pair.

    Duplicate captions are common ("a photo of a small red circle"), so a retrieved text counts as a
    hit when it is *identical in embedding* to the paired one, and a retrieved image counts when its
    paired text is identical to the query text; otherwise ties would make recall meaningless.
    """
    sims = image_features @ text_features.T
    n = sims.shape[0]
    # same[i, j]: text j is the same text as text i (embeddings equal up to float noise)
    same = (text_features @ text_features.T) > 1 - 1e-5
    out = {}
    for k in ks:
        k_eff = min(k, n)
        top_texts = sims.topk(k_eff, dim=1).indices  # for each image, best texts
        top_images = sims.T.topk(k_eff, dim=1).indices  # for each text, best images
        rows = torch.arange(n).unsqueeze(1)
        out[f"i2t_R@{k}"] = float(same[rows, top_texts].any(dim=1).float().mean())
        out[f"t2i_R@{k}"] = float(same[rows, top_images].any(dim=1).float().mean())
    return out


@torch.no_grad()
def pair_losses(model: torch.nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str],
                candidate_texts: Sequence[str]) -> torch.Tensor:
    """Per-sample cross-entropy of each image against its own text among ``candidate_texts``
    (the text must be one of them). This is the attack signal for :func:`membership_inference_auc`."""
    feats = encode_images(model, images)
    cands = list(dict.fromkeys(candidate_texts))
    text_feats = encode_texts(model, tokenizer, cands)
    scale = model.logit_scale.exp().float().clamp(max=100).cpu()
    logits = scale * feats.cpu() @ text_feats.cpu().T
    targets = torch.tensor([cands.index(t) for t in texts])
    return F.cross_entropy(logits, targets, reduction="none")


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve for "positive scores are larger" (Mann-Whitney U, ties count half)."""
    pos, neg = positive.float().view(-1, 1), negative.float().view(1, -1)
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    return float(((pos > neg).float() + 0.5 * (pos == neg).float()).mean())


def membership_inference_auc(model: torch.nn.Module, tokenizer, forget_images: torch.Tensor, forget_texts: Sequence[str],
                             unseen_images: torch.Tensor, unseen_texts: Sequence[str], candidate_texts: Sequence[str]) -> float:
    """Loss-based membership inference: can an attacker tell forget samples from unseen samples of
    the same distribution by their loss? The score is "lower loss means member", so AUC 0.5 means
    indistinguishable; well above 0.5, the model still treats the forget set as familiar; well
    below, the forget set stands out by being *too* unfamiliar (the Streisand effect).
    """
    forget_loss = pair_losses(model, tokenizer, forget_images, forget_texts, candidate_texts)
    unseen_loss = pair_losses(model, tokenizer, unseen_images, unseen_texts, candidate_texts)
    return auc(-forget_loss, -unseen_loss)
