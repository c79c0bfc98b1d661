"""The before/after evaluation of an erasure: forget, retain, held-out probes, retrieval, MIA.

Every check of a model covers *all* forget targets it is meant to carry — the current request's
and every earlier one — so a model that resurrected an earlier erasure fails its gate or guard.

Metric names (flat, so they can be logged to MLflow and gated):

- ``forget_accuracy``: the worst (highest) accuracy over all forget targets; per target
  ``forget_accuracy/<name>``. For a class, C-way accuracy of its images on the class task; for a
  subgroup, accuracy on the attribute x class task (e.g. "red circle" among colour x shape).
- ``retain_accuracy``: class-task accuracy on images of no forget target.
- ``sibling_accuracy``: for subgroup targets, attribute x class accuracy on the sibling subgroups.
- ``heldout/<probe>`` and ``heldout_accuracy`` (their mean): the held-out suite's zero-shot probes
  on retained images only — the world's colour, size and colour x shape on the shapes world, else the
  retained classes under unseen paraphrase templates, or a suite of one's own (:mod:`unlearning.heldout`).
- ``forget_R@5`` / ``retain_R@5``: image->text Recall@5 of forget / retained images against the
  eval set's distinct captions (for an association target, ``forget_accuracy`` is this recall).
- ``mia_auc``: loss-based membership inference, the forget images trained on vs unseen images of
  the same targets (0.5 = indistinguishable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from unlearning.data import Record, ZeroShotTask, class_task, read_manifest
from unlearning.heldout import PARAPHRASE_TEMPLATES, HeldoutInfo, HeldoutSuite, HeldoutSuiteError, load_heldout_suite, template_seen_in
from unlearning.image_cache import ImageCache, cached_load_images
from unlearning.methods.base import ForgetTarget, LabelledImages
from unlearning.metrics import (
    ZeroShotResult,
    encode_images,
    encode_texts,
    evaluate_task,
    membership_inference_auc,
)
from unlearning.world import COLOURS, SIZES, world_probes

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
    heldout: HeldoutInfo | None = None  # which held-out suite the probes are (see build_eval_set)
    # A suite's own probe images; None: the probes run on the evaluation images themselves.
    probe_records: list[Record] | None = None
    probe_images: torch.Tensor | None = None

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
    probe_records, probe_images, probe_feats = retained_records, images[retained_mask], feats[retained_mask]
    if eval_set.probe_records is not None:  # the suite's own images, forget targets left out as well
        kept = _retained(eval_set.probe_records, targets)
        probe_records = [eval_set.probe_records[i] for i in kept]
        probe_images = eval_set.probe_images[torch.tensor(kept, dtype=torch.long)]
        probe_feats = encode_images(model, probe_images) if kept else feats[:0]
    heldout = []
    probes = eval_set.probes_for(sorted({r.label for r in probe_records})) if eval_set.probes_for else eval_set.probes
    for name, probe in probes.items():
        result = evaluate_task(model, tokenizer, probe, probe_records, probe_images, probe_feats)
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


def has_world_attributes(records: Sequence[Record]) -> bool:
    """Do the records carry the shapes world's colour and size attributes (so its probes apply)?"""
    if not records or not all(k in records[0].attributes for k in ("colour", "size")):
        return False
    values = {r.attributes.get("colour") for r in records} | {r.attributes.get("size") for r in records}
    return values <= set(COLOURS) | set(SIZES)


def build_eval_set(records: list[Record], image_size: int, suite: str | HeldoutSuite | None = "auto",
                   seen_texts: Iterable[str] = (), class_templates: Sequence[str] = CLASS_TEMPLATES,
                   cache_dir: str | os.PathLike | ImageCache | None = None) -> EvalSet:
    """Evaluation images with the held-out suite to probe them with (see :mod:`unlearning.heldout`).

    Args:
        records: the evaluation images (the reference data's test split).
        suite: ``"auto"`` (or None): the world's probes on the shapes world, else ``"paraphrase"``;
            ``"world"``, ``"paraphrase"``, a suite file, a suite's JSON text or a :class:`HeldoutSuite`.
        seen_texts: the reference data's captions (the model may have trained on any of them). No
            held-out template may match one, nor the methods' training prompts or the class prompt:
            ``paraphrase`` drops such templates, a suite of one's own is refused.
        cache_dir: where decoded images are cached (:func:`unlearning.image_cache.cached_load_images`); None: no cache.

    Raises:
        HeldoutSuiteError: the suite cannot be read, or does not fit these records.
    """
    from unlearning.erasure_data import TRAINING_TEMPLATES  # erasure_data imports this module

    resolved, source = load_heldout_suite(suite)
    if resolved == "auto":
        resolved = "world" if has_world_attributes(records) else "paraphrase"
    probe_records = None
    if resolved == "world":
        if not has_world_attributes(records):
            raise HeldoutSuiteError('heldout_suite: "world" needs the shapes world\'s colour and size attributes, which these '
                                    'images lack — use "paraphrase" or a suite file of your own')
        probes_for, info = world_probes, HeldoutInfo("world", "world", source, tuple(world_probes([])), reference="world")
    else:
        seen = {"methods' training prompt": list(TRAINING_TEMPLATES), "class prompt": list(class_templates),
                "reference caption": sorted(set(seen_texts))}
        if resolved == "paraphrase":
            probes_for, info = _paraphrase_probes(seen, source)
        else:
            probe_records = read_manifest(resolved.manifest) if resolved.manifest else None
            probes_for, info = _suite_probes(resolved, source, records if probe_records is None else probe_records, seen)
    return EvalSet(records, cached_load_images(records, image_size, cache_dir), class_templates=class_templates, probes_for=probes_for,
                   heldout=info, probe_records=probe_records,
                   probe_images=None if probe_records is None else cached_load_images(probe_records, image_size, cache_dir))


ProbesFor = Callable[[list[str]], dict[str, ZeroShotTask]]


def _paraphrase_probes(seen: dict[str, list[str]], source: str) -> tuple[ProbesFor, HeldoutInfo]:
    """The retained classes under the paraphrase templates that no caption or prompt uses."""
    kept = tuple(t for t in PARAPHRASE_TEMPLATES if not any(template_seen_in(t, texts) for texts in seen.values()))
    note = "" if kept else "every paraphrase template occurs in the captions or prompts"
    info = HeldoutInfo("paraphrase", "templates", source, ("paraphrase",) if kept else (), kept, note, "paraphrase")
    return (lambda retained: _label_probes({"paraphrase": list(kept)} if kept else {}, retained)), info


def _suite_probes(suite: HeldoutSuite, source: str, probed: list[Record], seen: dict[str, list[str]]) -> tuple[ProbesFor, HeldoutInfo]:
    """A suite of one's own, checked against the probe images ``probed`` and the texts ``seen``."""
    named = f"heldout_suite {source if source not in ('request', 'JSON text') else suite.name}"
    for where, template in [*((f"templates[{i}]", t) for i, t in enumerate(suite.templates)),
                            *((f"probes[{i}].templates[{j}]", t) for i, p in enumerate(suite.probes) for j, t in enumerate(p.templates))]:
        for what, texts in seen.items():
            hit = template_seen_in(template, texts)
            if hit is not None:
                raise HeldoutSuiteError(f'{named}: {where}: "{template}" is not held out — the {what} '
                                        f'"{hit}" uses it; choose a phrasing training never uses')
    attribute_probes = {}
    for i, probe in enumerate(suite.probes):
        where = f"{named}: probes[{i}]"
        if probe.attribute == "label":
            values = sorted({r.label for r in probed})
        else:
            values = sorted({str(r.attributes[probe.attribute]) for r in probed if probe.attribute in r.attributes})
            if not values:
                keys = sorted({k for r in probed for k in r.attributes})
                raise HeldoutSuiteError(f'{where}.attribute: no probe image has the attribute "{probe.attribute}" — use "label" '
                                        f"or one of: {', '.join(keys) or '(none: the rows carry no attributes)'}")
            attribute_probes[probe.name] = ZeroShotTask(probe.name, list(probe.classnames or values), list(probe.templates),
                                                        lambda r, key=probe.attribute: str(r.attributes[key]))
        if probe.classnames and not set(probe.classnames) & set(values):
            raise HeldoutSuiteError(f"{where}.classnames: none occurs among the probe images' {probe.attribute} values — "
                                    f"use some of: {', '.join(values[:12])}")
    label_templates = {**({suite.name: list(suite.templates)} if suite.templates else {}),
                       **{p.name: list(p.templates) for p in suite.probes if p.attribute == "label"}}
    label_classes = {p.name: p.classnames for p in suite.probes if p.attribute == "label" and p.classnames}
    info = HeldoutInfo(suite.name, suite.kind, source, (*label_templates, *attribute_probes), tuple(suite.templates),
                       reference=suite.model_dump_json(exclude_defaults=True))
    return (lambda retained: {**_label_probes(label_templates, retained, label_classes), **attribute_probes}), info


def _label_probes(templates: dict[str, list[str]], retained: list[str], classnames: dict[str, list[str]] | None = None) -> dict[str, ZeroShotTask]:
    """Class probes over the retained classes (of ``classnames[name]``, when given); a probe left
    with fewer than two classes is dropped, since it would score 100 % whatever the model knows."""
    tasks = {}
    for name, probe_templates in templates.items():
        names = [c for c in (classnames or {}).get(name, retained) if c in set(retained)]
        if len(names) >= 2:
            tasks[name] = class_task(names, probe_templates, name=name)
    return tasks


@dataclass
class Gate:
    name: str
    value: float
    threshold: float
    comparison: str  # "<=" : value must not exceed threshold
    passed: bool
    description: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "comparison": self.comparison,
                "passed": self.passed, "description": self.description}


GATE_DESCRIPTIONS = {
    "forget_accuracy": "worst accuracy over every forget target the model carries",
    "retain_accuracy_drop": "drop in class accuracy on retained images",
    "sibling_accuracy_drop": "drop in accuracy on the subgroup target's sibling subgroups",
    "retain_R@5_drop": "drop in image->text Recall@5 of retained images",
}


def check_gates(before: dict[str, float], after: dict[str, float], max_forget_accuracy: float, max_retain_drop: float,
                max_heldout_drop: float, heldout_suite: str = "") -> list[Gate]:
    """The promotion gates. A candidate is promoted only when every gate passes.

    - forget: the worst forget-target accuracy (every target carried, earlier ones included);
    - retain drop, sibling drop, retrieval drop: retained knowledge must not fall more than allowed;
    - held-out drop: general zero-shot ability (the held-out suite's probes) must not fall more than
      allowed.
    Forget, retain and held-out are always gated: a metric missing on either side fails its gate
    (so no candidate is promoted without a held-out check); sibling and retrieval are gated when
    measured.

    Args:
        heldout_suite: the suite's label (:attr:`HeldoutInfo.label`), named in the held-out gate.
    """
    gates = [Gate("forget_accuracy", after.get("forget_accuracy", float("nan")), max_forget_accuracy, "<=", False)]
    drops = [("retain_accuracy", max_retain_drop, True), ("sibling_accuracy", max_retain_drop, False),
             ("retain_R@5", max_retain_drop, False), ("heldout_accuracy", max_heldout_drop, True)]
    for key, threshold, required in drops:
        if key in before and key in after:
            gates.append(Gate(f"{key}_drop", before[key] - after[key], threshold, "<=", False))
        elif required:
            gates.append(Gate(f"{key}_drop", float("nan"), threshold, "<=", False))
    suite = f"held-out suite {heldout_suite}" if heldout_suite else "the held-out suite"
    for gate in gates:
        gate.passed = gate.value == gate.value and gate.value <= gate.threshold + 1e-9  # NaN never passes
        gate.description = GATE_DESCRIPTIONS.get(gate.name, "")
        if gate.name == "heldout_accuracy_drop":
            probes = sorted(k.removeprefix("heldout/") for k in after if k.startswith("heldout/"))
            gate.description = (f"drop in mean zero-shot accuracy of {suite} (probes: {', '.join(probes)}) on retained images"
                                if gate.value == gate.value else
                                f"no held-out metric could be computed for {suite}, so the candidate cannot be promoted — "
                                "name a suite whose probes cover retained images (request heldout_suite or ERASURE_HELDOUT_SUITE)")
    return gates
