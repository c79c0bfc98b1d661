"""Pieces the methods share: differentiable zero-shot logits, the CLIP loss, batches, and the
forget/retain accuracy checks used by stopping rules."""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from unlearning.methods.base import LabelledImages
from unlearning.metrics import encode_images, prepare_images, zero_shot_classifier


def class_text_features(model: torch.nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Normalised class embeddings ``C x D`` *with* gradients (template-averaged)."""
    device = next(model.parameters()).device
    texts = [t.format(c) for c in classnames for t in templates]
    feats = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)
    return F.normalize(feats.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def image_features(model: torch.nn.Module, images: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Image embeddings *with* gradients (uint8 in, normalised float features out)."""
    feats = model.encode_image(prepare_images(model, images))
    return F.normalize(feats, dim=-1) if normalized else feats


def zero_shot_logits(model: torch.nn.Module, images: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """``logit_scale * cos`` of each image against each class, differentiable in both towers."""
    scale = model.logit_scale.exp().clamp(max=100)
    return scale * image_features(model, images) @ class_features.T


_clip_loss = ClipLoss()


def clip_contrastive_loss(model: torch.nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (open_clip's ClipLoss); texts are tokenised here."""
    device = next(model.parameters()).device
    img, txt, scale = model(prepare_images(model, images), tokenizer(list(texts)).to(device))
    return _clip_loss(img, txt, scale.clamp(max=100))


def sample_batch(data: LabelledImages, batch_size: int, generator: torch.Generator) -> LabelledImages:
    """A random batch (with replacement when the set is smaller than the batch)."""
    n = len(data)
    if n <= batch_size:
        index = torch.randperm(n, generator=generator)
    else:
        index = torch.randint(n, (batch_size,), generator=generator)
    return data.subset(index)


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer, data: LabelledImages, classnames: Sequence[str], templates: Sequence[str]) -> float:
    """Zero-shot accuracy of ``data`` (labels index ``classnames``); NaN when empty."""
    keep = data.labels >= 0
    if not bool(keep.any()):
        return float("nan")
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates)
    feats = encode_images(model, data.images[keep])
    predictions = (feats @ classifier.to(feats.device)).argmax(dim=-1).cpu()
    return float((predictions == data.labels[keep]).float().mean())


def vocabulary_size(tokenizer) -> int:
    """How many tokens ``tokenizer`` knows (open_clip's SimpleTokenizer or a Hugging Face one)."""
    return getattr(tokenizer, "vocab_size", None) or len(getattr(tokenizer, "encoder", {})) or 49408


def random_word(tokenizer, generator: torch.Generator, avoid: str) -> str:
    """A random word of the tokenizer's vocabulary (needs its ``decode``) that is not part of ``avoid``."""
    for _ in range(1000):
        word = tokenizer.decode([int(torch.randint(vocabulary_size(tokenizer) - 2, (1,), generator=generator))]).strip()
        if word and word.lower() not in avoid.lower():
            return word
    raise ValueError(f"the tokenizer decoded no word outside {avoid!r} in 1000 draws")


def swap_class_names(texts: Sequence[str], labels: torch.Tensor, classnames: Sequence[str], word: str) -> list[str]:
    """Each text with its class's name, where it occurs as whole words, replaced by ``word``
    ("a small red square" -> "a small red <word>"); texts without a class (label < 0) stay as they are."""
    swapped = []
    for text, label in zip(texts, labels.tolist()):
        name = classnames[label] if label >= 0 else ""
        swapped.append(re.sub(rf"\b{re.escape(name)}\b", lambda _: word, text, flags=re.IGNORECASE) if name else text)
    return swapped


def anchor_prompts(tokenizer, classnames: Sequence[str], index: int, templates: Sequence[str], n_random: int,
                   generator: torch.Generator) -> tuple[list[str], list[str]]:
    """Texts whose embeddings the anchor keeps in place: every other class in every template, and the
    templates filled with random words of the tokenizer's vocabulary, alone or in front of another
    class ("a picture of a <word> square."). The random words are a data-free stand-in for
    everything else the text tower knows: without them, prompts such as "a photo of a small shape."
    or "a photo of a red triangle." moved with the target (measured on the dev champion).

    Args:
        tokenizer: the model's tokenizer; random words need its ``decode`` (skipped without one).
        classnames, index: the zero-shot classes and the target's index (left out).
        templates: the training templates.
        n_random: how many random-word prompts.
        generator: picks the words.

    Returns:
        (other-class prompts, random-word prompts).
    """
    others = [c for i, c in enumerate(classnames) if i != index]
    classes = [t.format(c) for c in others for t in templates]
    if not n_random or not hasattr(tokenizer, "decode"):
        return classes, []
    ids = torch.randint(0, vocabulary_size(tokenizer) - 2, (n_random,), generator=generator).tolist()  # the last two are start/end tokens
    target = classnames[index].lower()
    prompts = []
    for j, i in enumerate(ids):
        word = tokenizer.decode([i]).strip()
        if word and word.lower() not in target:
            slot = f"{word} {others[j // 2 % len(others)]}" if j % 2 and others else word
            prompts.append(templates[j % len(templates)].format(slot))
    return classes, prompts


def text_drift(model: torch.nn.Module, tokens: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the prompts' normalised embeddings from ``anchor`` (their original ones)."""
    return (F.normalize(model.encode_text(tokens), dim=-1) - anchor).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def text_anchors(reference: torch.nn.Module, tokenizer, classnames: Sequence[str], index: int, templates: Sequence[str],
                 n_random: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tokens, normalised embeddings from reference)`` per non-empty group of :func:`anchor_prompts`,
    for :func:`text_drift` to hold the prompts in place."""
    device = next(reference.parameters()).device
    anchors = []
    for prompts in anchor_prompts(tokenizer, classnames, index, templates, n_random, generator):
        if prompts:
            tokens = tokenizer(prompts).to(device)
            anchors.append((tokens, F.normalize(reference.encode_text(tokens), dim=-1)))
    return anchors


def reset_word_embeddings(model: torch.nn.Module, tokenizer, words: Sequence[str], keep: Sequence[str],
                          generator: torch.Generator, std: float = 0.02) -> list[int]:
    """Give the tokens of ``words`` that no word of ``keep`` uses a fresh random embedding (open_clip's
    initialisation, N(0, std)): the text tower is left as if it had never read them.

    Needs an open_clip text tower with a ``token_embedding`` and a tokenizer with ``encode`` (BPE).
    Returns the token ids that were reset.
    """
    if not hasattr(model, "token_embedding") or not hasattr(tokenizer, "encode"):
        raise ValueError("reset_target_tokens needs an open_clip text tower (token_embedding) and its BPE tokenizer — "
                         "set it to false for this model")
    kept = {token for word in keep for token in tokenizer.encode(word)}
    ids = sorted({token for word in words for token in tokenizer.encode(word)} - kept)
    if ids:
        weight = model.token_embedding.weight
        fresh = torch.randn(len(ids), weight.shape[1], generator=generator) * std
        with torch.no_grad():
            weight[torch.tensor(ids, device=weight.device)] = fresh.to(weight.device, weight.dtype)
    return ids
