"""The before/after evaluation of an erasure: forget, retain, held-out probes, retrieval, MIA.

Every check of a model covers *all* forget targets it is meant to carry — the current request's
and every earlier one — so a model that resurrected an earlier erasure fails its gate or guard.

Metric names (flat, so they can be logged to MLflow and gated):

- ``forget_accuracy``: the worst (highest) accuracy over all forget targets; per target
  ``forget_accuracy/<name>``. For a class, C-way accuracy of its images on the class task; for a
  subgroup, accuracy on the attribute x class task (e.g. "red circle" among colour x shape).
- ``retain_accuracy``: class-task accuracy on images of no forget target.
- ``sibling_accuracy``: for subgroup targets, attribute x class accuracy on the sibling subgroups.
- ``heldout/<probe>`` and ``heldout_accuracy`` (their mean): zero-shot probes (colour, size,
  colour x shape ...) on retained images only.
- ``forget_R@5`` / ``retain_R@5``: image->text Recall@5 of forget / retained images against the
  eval set's distinct captions (for an association target, ``forget_accuracy`` is this recall).
- ``mia_auc``: loss-based membership inference, the forget images trained on vs unseen images of
  the same targets (0.5 = indistinguishable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from unlearning.data import Record, ZeroShotTask, class_task
from unlearning.methods.base import ForgetTarget, LabelledImages
from unlearning.metrics import (
    ZeroShotResult,
    encode_images,
    encode_texts,
    evaluate_task,
    membership_inference_auc,
)

CLASS_TEMPLATES = ("a photo of a {}.",)


@dataclass
class EvalSet:
    """Evaluation images (uint8) with their records, and the held-out probes to run on them."""

    records: list[Record]
    images: torch.Tensor
    probes: dict[str, ZeroShotTask] = field(default_factory=dict)
    class_templates: Sequence[str] = CLASS_TEMPLATES
    # Builds the probes for the classes still retained (e.g. colour x shape over retained shapes
    # only); when set, it replaces ``probes`` at evaluation time.
    probes_for: Callable[[list[str]], dict[str, ZeroShotTask]] | None = None

    @property
    def classnames(self) -> list[str]:
        return sorted({r.label for r in self.records})


@dataclass
class Evaluation:
    metrics: dict[str, float]
    per_class: dict[str, float]
    confusions: dict[str, ZeroShotResult]


def subgroup_task(attribute: str, records: Sequence[Record], templates: Sequence[str] = CLASS_TEMPLATES) -> ZeroShotTask:
    """Classify "<value> <label>" pairs (e.g. "red circle") over every pair present in ``records``."""
    names = sorted({f"{r.attributes[attribute]} {r.label}" for r in records if attribute in r.attributes})
    return ZeroShotTask(f"{attribute}_label", names, list(templates), lambda r: f"{r.attributes[attribute]} {r.label}")


def caption_recall(image_features: torch.Tensor, captions: Sequence[str], bank: Sequence[str], bank_features: torch.Tensor, k: int = 5) -> float:
    """Image->text Recall@k against a bank of distinct captions: is each image's own caption among
    its ``k`` most similar captions? (Templated captions repeat, so ranking distinct captions is the
    meaningful retrieval question.)"""
    position = {c: i for i, c in enumerate(bank)}
    top = (image_features @ bank_features.T.to(image_features.device)).topk(min(k, len(bank)), dim=1).indices.cpu()
    own = torch.tensor([position[c] for c in captions]).unsqueeze(1)
    return float((top == own).any(dim=1).float().mean())


def _retained(records: Sequence[Record], targets: Sequence[ForgetTarget]) -> list[int]:
    return [i for i, r in enumerate(records) if not any(t.matches(r) for t in targets if t.kind != "association")]


def _association_members(records: Sequence[Record], target: ForgetTarget) -> list[int]:
    return [i for i, r in enumerate(records) if target.matches(r)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, eval_set: EvalSet, targets: Sequence[ForgetTarget],
             members: LabelledImages | None = None) -> Evaluation:
    """Evaluate ``model`` on ``eval_set`` against every forget target in ``targets``.

    Args:
        targets: all targets the model must have forgotten (earlier erasures included).
        members: the forget images the erasure trained on, for the membership-inference AUC
            (skipped when None, e.g. for a synthetic-only erasure).
    """
    model.eval()
    records, images = eval_set.records, eval_set.images
    feats = encode_images(model, images)
    bank = sorted({r.caption for r in records})  # distinct captions: the retrieval candidates
    bank_features = encode_texts(model, tokenizer, bank)
    metrics: dict[str, float] = {}
    confusions: dict[str, ZeroShotResult] = {}

    classes = class_task(eval_set.classnames, eval_set.class_templates, name="class")
    class_result = evaluate_task(model, tokenizer, classes, records, images, feats)
    confusions["class"] = class_result

    retained = _retained(records, targets)
    retained_set = set(retained)
    retained_mask = torch.tensor([i in retained_set for i in range(len(records))])
    keep, labels = classes.targets(records)
    keep_retained = torch.tensor([k in retained_set for k in keep])
    predictions = class_result.predictions
    if keep_retained.any():
        metrics["retain_accuracy"] = float((predictions[keep_retained] == labels[keep_retained]).float().mean())

    forget_values, sibling_values = [], []
    for target in targets:
        if target.kind == "class":
            value = class_result.per_class.get(target.class_name, float("nan"))
        elif target.kind == "subgroup":
            task = subgroup_task(target.attribute, records, eval_set.class_templates)
            result = evaluate_task(model, tokenizer, task, records, images, feats)
            confusions[f"subgroup:{target.name}"] = result
            value = result.per_class.get(target.name, float("nan"))
            siblings = [n for n in task.classnames if n.endswith(f" {target.class_name}") and n != target.name]
            if siblings:
                sibling = result.accuracy_over(siblings)
                metrics[f"sibling_accuracy/{target.name}"] = sibling
                sibling_values.append(sibling)
        else:
            pairs = _association_members(records, target)
            if not pairs:
                continue
            value = caption_recall(feats[pairs], [records[i].caption for i in pairs], bank, bank_features)
        metrics[f"forget_accuracy/{target.name}"] = value
        forget_values.append(value)
    valid = [v for v in forget_values if v == v]
    if valid:
        metrics["forget_accuracy"] = max(valid)
    if sibling_values:
        metrics["sibling_accuracy"] = min(sibling_values)

    retained_records = [records[i] for i in retained]
    heldout = []
    probes = eval_set.probes_for(sorted({r.label for r in retained_records})) if eval_set.probes_for else eval_set.probes
    for name, probe in probes.items():
        result = evaluate_task(model, tokenizer, probe, retained_records, images[retained_mask], feats[retained_mask])
        if result.n:
            confusions[f"heldout:{name}"] = result
            metrics[f"heldout/{name}"] = result.accuracy
            heldout.append(result.accuracy)
    if heldout:
        metrics["heldout_accuracy"] = sum(heldout) / len(heldout)

    forget_members = [i for i in range(len(records)) if i not in retained_set]
    for target in targets:
        if target.kind == "association":
            forget_members += _association_members(records, target)
    forget_members = sorted(set(forget_members))
    retained_pairs = sorted(retained_set - set(forget_members))
    if retained_pairs:
        metrics["retain_R@5"] = caption_recall(feats[retained_pairs], [records[i].caption for i in retained_pairs], bank, bank_features)
    if forget_members:
        metrics["forget_R@5"] = caption_recall(feats[forget_members], [records[i].caption for i in forget_members], bank, bank_features)
        if members is not None and len(members):
            # Members: the forget images the erasure trained on; non-members: unseen eval images of
            # the same targets. After a good erasure the two are indistinguishable (AUC near 0.5).
            candidates = sorted({r.caption for r in records} | set(members.texts))
            metrics["mia_auc"] = membership_inference_auc(
                model, tokenizer, members.images, members.texts,
                images[forget_members], [records[i].caption for i in forget_members], candidates)
    return Evaluation(metrics, dict(class_result.per_class), confusions)


@dataclass
class Gate:
    name: str
    value: float
    threshold: float
    comparison: str  # "<=" : value must not exceed threshold
    passed: bool

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "comparison": self.comparison, "passed": self.passed}


def check_gates(before: dict[str, float], after: dict[str, float], max_forget_accuracy: float, max_retain_drop: float,
                max_heldout_drop: float) -> list[Gate]:
    """The promotion gates. A candidate is promoted only when every gate passes.

    - forget: the worst forget-target accuracy (every target carried, earlier ones included);
    - retain drop, sibling drop, retrieval drop: retained knowledge must not fall more than allowed;
    - held-out drop: general zero-shot ability (probes) must not fall more than allowed.
    A metric missing on either side (e.g. no probes for a user's data set) yields no gate, except
    forget and retain, which every erasure must measure.
    """
    gates = [Gate("forget_accuracy", after.get("forget_accuracy", float("nan")), max_forget_accuracy, "<=", False)]
    drops = [("retain_accuracy", max_retain_drop, True), ("sibling_accuracy", max_retain_drop, False),
             ("retain_R@5", max_retain_drop, False), ("heldout_accuracy", max_heldout_drop, False)]
    for key, threshold, required in drops:
        if key in before and key in after:
            gates.append(Gate(f"{key}_drop", before[key] - after[key], threshold, "<=", False))
        elif required:
            gates.append(Gate(f"{key}_drop", float("nan"), threshold, "<=", False))
    for gate in gates:
        gate.passed = gate.value == gate.value and gate.value <= gate.threshold + 1e-9  # NaN never passes
    return gates
