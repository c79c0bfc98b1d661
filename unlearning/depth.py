"""How deep forgetting goes: measures that look past the zero-shot prompt.

A model can score 0 % on a forgotten class while its image features still hold it. Each measure
here asks one question of a model on a reference manifest (train / val / test splits); the
protocol of every one is in ``docs/depth.md``:

- :func:`relearn_curve`: how fast does the target come back under a few-shot fine-tuning attack?
- :func:`linear_probe_accuracy`: can a logistic probe on frozen image features still find it?
- :func:`knn_recall`: do its images still sit among their own kind in image space?
- :func:`depth_measures`: all of them (with membership inference, paraphrase prompts and forget
  R@5) for one target, encoding each image set once; :func:`distance_to` compares with an oracle.

The reference for "forgotten" is a model retrained without the target (the oracle), not zero.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from unlearning.data import Record
from unlearning.erasure_data import TRAINING_TEMPLATES, _spread, target_classnames
from unlearning.evaluation import CLASS_TEMPLATES, caption_recall
from unlearning.evidence import _relearn_curve
from unlearning.heldout import PARAPHRASE_TEMPLATES, template_seen_in
from unlearning.image_cache import ImageCache, cached_load_images
from unlearning.methods.base import ForgetTarget, LabelledImages
from unlearning.metrics import auc, encode_images, encode_texts, zero_shot_accuracy

RELEARN_CHECKPOINTS = (0, 5, 10, 20)
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def relearn_curve(model: torch.nn.Module, tokenizer, attack: LabelledImages, evaluation: LabelledImages, classnames: Sequence[str], *,
                  checkpoints: Sequence[int] = RELEARN_CHECKPOINTS, lr: float = 1e-4,
                  attack_templates: Sequence[str] = TRAINING_TEMPLATES, templates: Sequence[str] = CLASS_TEMPLATES) -> dict[int, float]:
    """Target accuracy after each number of relearning-attack steps, on a copy of ``model``.

    The attack (the same as :func:`unlearning.evidence.relearn_test`'s): full-batch Adam on the
    zero-shot cross-entropy of ``attack`` against ``classnames`` in ``attack_templates``, every
    parameter but ``logit_scale``, the model in ``eval()``. ``model`` itself is not changed.

    Args:
        attack: the attacker's images; labels index ``classnames``.
        evaluation: the images whose C-way zero-shot accuracy (prompts ``templates``) is tracked.
        checkpoints: step counts to report (0: before the attack).
        lr: the attack's learning rate.

    Returns:
        ``{steps: accuracy}`` for each checkpoint.
    """
    points = sorted({int(c) for c in checkpoints})
    if not points or points[0] < 0:
        raise ValueError(f"checkpoints: {list(checkpoints)} — give step counts >= 0, e.g. (0, 5, 10, 20)")
    if not len(attack):
        raise ValueError("attack: no images — the attacker needs at least one image of the target")
    curve = _relearn_curve(model, tokenizer, attack, evaluation, classnames, attack_templates, templates, points[-1], lr,
                           "zero_shot", checkpoints=points)
    return dict(zip(points, curve))


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the label values present in ``labels`` (NaN when empty)."""
    labels, predictions = labels.long().cpu(), predictions.long().cpu()
    recalls = [float((predictions[labels == v] == v).float().mean()) for v in labels.unique().tolist()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced L2-regularised logistic regression by full-batch L-BFGS from zero (convex, so deterministic)."""
    positives = float(y.sum())
    # Each class weighs half of the loss, so a rare target is not traded for the majority.
    sample_weight = torch.where(y > 0, 0.5 / positives, 0.5 / (len(y) - positives))
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = (sample_weight * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum() + 0.5 * weight_decay * w.dot(w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                          test_x: torch.Tensor, test_y: torch.Tensor, *, weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
                          steps: int = 200) -> float:
    """Balanced test accuracy of a binary target-vs-rest logistic probe on frozen features.

    Features are standardised with the train set's mean and std; the loss weighs both classes
    equally; the L2 weight decay is the one of ``weight_decays`` with the best balanced accuracy on
    the val set (the first of equals). Deterministic: L-BFGS from zero weights, in float64.

    Args:
        train_x, val_x, test_x: ``N x D`` features.
        train_y, val_y, test_y: 1 (or True) for the target, 0 for the rest.
        steps: L-BFGS iterations per fit.

    Returns:
        Balanced accuracy (mean of target and rest recall) on the test set; 0.5 is chance.
    """
    if not weight_decays:
        raise ValueError("weight_decays: empty — give at least one, e.g. (1e-4, 1e-3, 1e-2, 1e-1)")
    sets = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}
    for name, (x, y) in sets.items():
        if x.ndim != 2 or len(x) != len(y) or not len(x):
            raise ValueError(f"{name}_x / {name}_y: need N x D features and N labels with N > 0, got {tuple(x.shape)} and {tuple(y.shape)}")
    y_train = train_y.detach().cpu().double().clamp(0, 1)
    if y_train.min() == y_train.max():
        raise ValueError("train_y: a single class — the probe needs target (1) and rest (0) images to train on")
    x_train = train_x.detach().cpu().double()
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-8)

    def standard(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().cpu().double() - mean) / std

    def predict(params: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (standard(x) @ params[0] + params[1] > 0).long()

    x_train = standard(train_x)
    best, best_score = None, -1.0
    for weight_decay in weight_decays:
        params = _fit_logistic(x_train, y_train, float(weight_decay), steps)
        score = balanced_accuracy(predict(params, val_x), val_y.cpu().clamp(0, 1))
        if score > best_score + 1e-12:
            best, best_score = params, score
    return balanced_accuracy(predict(best, test_x), test_y.cpu().clamp(0, 1))


def knn_predict(bank_x: torch.Tensor, bank_labels: torch.Tensor, query_x: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Each query's label by majority vote of its ``k`` most cosine-similar bank items; among
    labels with equal votes, the one of the nearest neighbour."""
    if not len(bank_x):
        raise ValueError("bank_x: empty — the kNN needs labelled bank features")
    k = min(k, len(bank_x))
    sims = F.normalize(query_x.float().cpu(), dim=-1) @ F.normalize(bank_x.float().cpu(), dim=-1).T
    neighbours = sims.topk(k, dim=1).indices  # nearest first
    labels = bank_labels.long().cpu()[neighbours]
    _, dense = labels.unique(return_inverse=True)
    votes = F.one_hot(dense).sum(dim=1)  # Q x distinct labels
    # A neighbour scores its label's votes, the nearer one winning a tie: (k + 1) * votes - rank.
    score = (k + 1) * votes.gather(1, dense) - torch.arange(k).unsqueeze(0)
    return labels.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)


def knn_recall(bank_x: torch.Tensor, bank_labels: torch.Tensor, query_x: torch.Tensor, query_labels: torch.Tensor,
               target_labels: int | Sequence[int], *, k: int = 10) -> float:
    """Fraction of the target's query images that a cosine kNN over the labelled bank calls a target.

    Args:
        bank_x, bank_labels: the labelled neighbours (features and a label each).
        query_x, query_labels: the images to classify and their true labels.
        target_labels: the target's label(s); a query of one counts when predicted as any of them.
        k: neighbours per vote (:func:`knn_predict`).

    Returns:
        Target recall in [0, 1]; NaN when no query is a target.
    """
    targets = torch.tensor([target_labels] if isinstance(target_labels, int) else list(target_labels), dtype=torch.long)
    is_target = torch.isin(query_labels.long().cpu(), targets)
    if not bool(is_target.any()):
        return float("nan")
    predictions = knn_predict(bank_x, bank_labels, query_x[is_target.to(query_x.device)], k)
    return float(torch.isin(predictions, targets).float().mean())


def distance_to(measures: dict[str, float], oracle_measures: dict[str, float]) -> dict[str, float]:
    """Absolute difference per measure both dicts hold (e.g. a method's depth measures and the oracle's)."""
    return {key: abs(measures[key] - oracle_measures[key]) for key in measures if key in oracle_measures}


def unseen_paraphrases(seen_texts: Sequence[str], class_templates: Sequence[str] = CLASS_TEMPLATES) -> tuple[str, ...]:
    """The :data:`PARAPHRASE_TEMPLATES` that none of ``seen_texts``, the methods' training prompts
    or ``class_templates`` could have produced."""
    seen = [list(TRAINING_TEMPLATES), list(class_templates), list(seen_texts)]
    return tuple(t for t in PARAPHRASE_TEMPLATES if not any(template_seen_in(t, texts) for texts in seen))


def _pair_losses(model: torch.nn.Module, tokenizer, features: torch.Tensor, texts: Sequence[str], candidates: Sequence[str]) -> torch.Tensor:
    """:func:`unlearning.metrics.pair_losses` from image features already computed."""
    candidates = list(dict.fromkeys(candidates))
    scale = model.logit_scale.exp().float().clamp(max=100).cpu()
    logits = scale * features.cpu() @ encode_texts(model, tokenizer, candidates).cpu().T
    position = {c: i for i, c in enumerate(candidates)}
    return F.cross_entropy(logits, torch.tensor([position[t] for t in texts], dtype=torch.long), reduction="none")


def _membership_auc(model: torch.nn.Module, tokenizer, member_feats: torch.Tensor, member_texts: Sequence[str], unseen_feats: torch.Tensor,
                    unseen_texts: Sequence[str], candidates: Sequence[str]) -> float:
    """:func:`unlearning.evidence.forget_membership_auc`'s AUC ("lower loss means member") on shared features."""
    return auc(-_pair_losses(model, tokenizer, member_feats, member_texts, candidates),
               -_pair_losses(model, tokenizer, unseen_feats, unseen_texts, candidates))


def _stratified(records: Sequence[Record], labels: Sequence[int], limit: int, seed: int) -> list[int]:
    """Indices of at most ``limit`` records, ``limit // classes`` (at least one) per label >= 0, each a seeded spread."""
    by_label: dict[int, list[Record]] = {}
    for record, label in zip(records, labels):
        if label >= 0:
            by_label.setdefault(label, []).append(record)
    per_class = max(1, limit // max(1, len(by_label)))
    position = {id(r): i for i, r in enumerate(records)}
    return sorted(position[id(r)] for label in sorted(by_label) for r in _spread(by_label[label], per_class, seed))


def _task_label(target: ForgetTarget, record: Record, index: dict[str, int]) -> int:
    name = f"{record.attributes.get(target.attribute)} {record.label}" if target.kind == "subgroup" else record.label
    return index.get(name, -1)


def depth_measures(model: torch.nn.Module, tokenizer, target: ForgetTarget, reference: Sequence[Record], *, image_size: int,
                   seed: int = 0, shots: int = 8, relearn_checkpoints: Sequence[int] = RELEARN_CHECKPOINTS, relearn_lr: float = 1e-4,
                   probe_train: int = 2000, probe_val: int = 512, knn_k: int = 10, max_members: int = 256, test_split: str = "test",
                   images: dict[str, torch.Tensor] | None = None,
                   cache_dir: str | os.PathLike | ImageCache | None = None,
                   encoded: dict[tuple[str, int], torch.Tensor] | None = None) -> dict[str, float]:
    """Every depth measure of ``model`` for one target on the reference data (protocols: ``docs/depth.md``).

    Class and subgroup targets get all of them; association targets only ``depth/mia_auc`` (on
    captions) and ``depth/forget_R@5`` of their pairs. A measure without data (e.g. no target
    image in the test split) is left out. ``model`` is put in ``eval()`` and otherwise unchanged.

    Keys: ``depth/relearn@<n>`` per checkpoint, ``depth/probe``, ``depth/knn``, ``depth/mia_auc``,
    ``depth/paraphrase``, ``depth/forget_R@5``.

    Args:
        target: what was (or would be) forgotten.
        reference: the owner's records with splits ``train``, ``val`` and ``test_split``.
        image_size: decode size of the images.
        seed: picks every sample (probe and kNN bank, members, attack images).
        shots: the relearning attacker's images of the target (from the members).
        relearn_checkpoints, relearn_lr: :func:`relearn_curve`'s.
        probe_train: at most this many train images for the probe and kNN bank, an equal share per class.
        probe_val: at most this many val images to choose the probe's weight decay, stratified likewise.
        knn_k: neighbours per kNN vote.
        max_members: at most this many train images of the target as members for the MIA (the same
            seeded sample :func:`unlearning.erasure_data.build_unlearning_data` forgets with).
        images: already decoded images of whole splits (``{split: uint8 N x 3 x S x S}``, in the
            order of ``reference``'s rows of that split), so that they are not decoded again.
        cache_dir: image cache for the rest (:func:`unlearning.image_cache.cached_load_images`).
        encoded: this model's image features from earlier calls, by (split, row), filled in here: one
            dict per model across a batch's targets encodes each image once (the test split and
            the probe bank are the same for every target). The model must not change in between.
    """
    if shots < 1:
        raise ValueError(f"shots: {shots} — the relearning attacker needs at least one image, e.g. 8")
    model.eval()
    images = images or {}
    splits = {name: [r for r in reference if r.split == name] for name in ("train", "val", test_split)}
    for name, tensor in images.items():
        if name in splits and len(tensor) != len(splits[name]):
            raise ValueError(f"images[{name!r}]: {len(tensor)} images for {len(splits[name])} {name} rows of the reference — "
                             "give the whole split in the reference's order, or leave it out")
    if not splits[test_split]:
        raise ValueError(f"reference: no row in split {test_split!r} — depth is measured on test images (test_split)")

    def load(split: str, index: Sequence[int]) -> torch.Tensor:
        if split in images:
            return images[split][torch.as_tensor(list(index), dtype=torch.long)]
        return cached_load_images([splits[split][i] for i in index], image_size, cache_dir)

    memo = {} if encoded is None else encoded

    def features(split: str, index: Sequence[int]) -> torch.Tensor:
        index = list(index)
        missing = list(dict.fromkeys(i for i in index if (split, i) not in memo))
        if missing:
            for i, row in zip(missing, encode_images(model, load(split, missing)).cpu()):
                memo[(split, i)] = row
        return torch.stack([memo[(split, i)] for i in index]) if index else torch.empty(0, 0)

    train, test = splits["train"], splits[test_split]
    # The members in build_unlearning_data's order, so that the attack picks relearn_test's images.
    train_position = {id(r): i for i, r in enumerate(train)}
    member_index = [train_position[id(r)] for r in _spread([r for r in train if target.matches(r)], max_members, seed)]
    test_target = [i for i, r in enumerate(test) if target.matches(r)]
    test_feats = features(test_split, range(len(test)))
    bank = sorted({r.caption for r in test})
    out: dict[str, float] = {}

    if target.kind == "association":
        member_feats = features("train", member_index)
        if member_index and test_target:
            texts_in, texts_out = [train[i].caption for i in member_index], [test[i].caption for i in test_target]
            out["depth/mia_auc"] = _membership_auc(model, tokenizer, member_feats, texts_in, test_feats[test_target], texts_out,
                                                   texts_in + texts_out)
        # Deleted pairs are often train images only: then their own pairs are what R@5 is about.
        feats, captions = ((test_feats[test_target], [test[i].caption for i in test_target]) if test_target else
                           (member_feats, [train[i].caption for i in member_index]))
        if captions:
            candidates = sorted(set(bank) | set(captions))
            out["depth/forget_R@5"] = caption_recall(feats, captions, candidates, encode_texts(model, tokenizer, candidates).cpu())
        return out

    classnames = target_classnames(target, reference)
    if target.name not in classnames:
        raise ValueError(f"target: {target.name!r} is not among the reference data's classes ({', '.join(classnames[:12])}) "
                         "— name a class (or value and class) the reference data has")
    index = {c: i for i, c in enumerate(classnames)}
    target_label = index[target.name]
    train_labels = [_task_label(target, r, index) for r in train]
    test_labels = torch.tensor([_task_label(target, r, index) for r in test], dtype=torch.long)

    # One encoding of the train images serves the probe, the kNN bank, the members and the attack.
    probe_index = _stratified(train, train_labels, probe_train, seed)
    union = sorted(set(probe_index) | set(member_index))
    position = {i: j for j, i in enumerate(union)}
    union_feats = features("train", union)
    union_labels = torch.tensor([train_labels[i] for i in union], dtype=torch.long)
    probe_rows = torch.tensor([position[i] for i in probe_index], dtype=torch.long)
    member_rows = torch.tensor([position[i] for i in member_index], dtype=torch.long)
    target_rows = torch.tensor(test_target, dtype=torch.long)

    if member_index and test_target:
        members = LabelledImages(load("train", member_index), [train[i].caption for i in member_index], union_labels[member_rows])
        evaluation = LabelledImages(load(test_split, test_target), [test[i].caption for i in test_target], test_labels[target_rows])
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))
        curve = relearn_curve(model, tokenizer, members.subset(order[:shots]), evaluation, classnames,
                              checkpoints=relearn_checkpoints, lr=relearn_lr)
        out.update({f"depth/relearn@{n}": value for n, value in curve.items()})

    if probe_index and test_target:
        val = splits["val"]
        val_labels = [_task_label(target, r, index) for r in val]
        val_index = _stratified(val, val_labels, probe_val, seed) if val else []
        train_x, train_y = union_feats[probe_rows], (union_labels[probe_rows] == target_label).long()
        if val_index and 0 < int(train_y.sum()) < len(train_y):
            val_x = features("val", val_index)
            val_y = torch.tensor([val_labels[i] == target_label for i in val_index], dtype=torch.long)
            known = test_labels >= 0
            out["depth/probe"] = linear_probe_accuracy(train_x, train_y, val_x, val_y, test_feats[known],
                                                       (test_labels[known] == target_label).long())
        out["depth/knn"] = knn_recall(train_x, union_labels[probe_rows], test_feats[target_rows], test_labels[target_rows],
                                      target_label, k=knn_k)

    if member_index and test_target:
        prompts = [CLASS_TEMPLATES[0].format(c) for c in classnames]
        out["depth/mia_auc"] = _membership_auc(model, tokenizer, union_feats[member_rows], [prompts[target_label]] * len(member_index),
                                               test_feats[target_rows], [prompts[target_label]] * len(test_target), prompts)

    if test_target:
        paraphrases = unseen_paraphrases(sorted({r.caption for r in reference}))
        if paraphrases:
            out["depth/paraphrase"] = zero_shot_accuracy(model, tokenizer, None, test_labels[target_rows], classnames, paraphrases,
                                                         image_features=test_feats[target_rows]).accuracy
        out["depth/forget_R@5"] = caption_recall(test_feats[target_rows], [test[i].caption for i in test_target], bank,
                                                 encode_texts(model, tokenizer, bank).cpu())
    return out
