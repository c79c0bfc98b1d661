"""Assemble what a method may use for one forget target from the model owner's reference data
(train split: forget and retain pools; val split: stop and calibration sets) and, optionally, the
requester's own forget images."""

from __future__ import annotations

from typing import Sequence

import torch

from unlearning.data import Record, load_images
from unlearning.evaluation import subgroup_task
from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData

TRAINING_TEMPLATES = ("a picture of a {}.",)  # never the evaluation prompt "a photo of a {}."


def target_classnames(target: ForgetTarget, records: Sequence[Record]) -> list[str]:
    """The class set a target is forgotten among: labels for a class, "<value> <label>" pairs for a subgroup."""
    if target.kind == "subgroup":
        return subgroup_task(target.attribute, records).classnames
    return sorted({r.label for r in records})


def _labelled(records: Sequence[Record], target: ForgetTarget, classnames: list[str], image_size: int) -> LabelledImages:
    index = {c: i for i, c in enumerate(classnames)}

    def name(r: Record) -> str:
        return f"{r.attributes.get(target.attribute)} {r.label}" if target.kind == "subgroup" else r.label

    labels = torch.tensor([index.get(name(r), -1) for r in records], dtype=torch.long)
    return LabelledImages(load_images(records, image_size), [r.caption for r in records], labels)


def _spread(records: Sequence[Record], limit: int, seed: int) -> list[Record]:
    if len(records) <= limit:
        return list(records)
    generator = torch.Generator().manual_seed(seed)
    return [records[i] for i in torch.randperm(len(records), generator=generator)[:limit].tolist()]


def build_unlearning_data(target: ForgetTarget, reference: Sequence[Record], image_size: int,
                          forget_records: Sequence[Record] | None = None, earlier: Sequence[ForgetTarget] = (),
                          max_forget: int = 256, max_retain: int = 4096, max_val: int = 1024, seed: int = 0) -> UnlearningData:
    """Build the :class:`UnlearningData` for ``target``.

    Args:
        reference: the owner's records with splits ``train`` (pools) and ``val`` (stop/calibration).
        forget_records: the requester's real forget images; default: the target's reference images.
        earlier: targets erased before. Their images never enter the retain set, so retention
            training cannot teach an erased class back.
    """
    train = [r for r in reference if r.split == "train"]
    val = [r for r in reference if r.split == "val"]
    classnames = target_classnames(target, train or reference)
    erased = [target, *earlier]

    def is_erased(r: Record) -> bool:
        return any(t.matches(r) for t in erased)

    forget = list(forget_records) if forget_records else [r for r in train if target.matches(r)]
    retain = [r for r in train if not is_erased(r)]
    data = UnlearningData(
        classnames=classnames,
        forget_index=classnames.index(target.name) if target.name in classnames else None,
        forget=_labelled(_spread(forget, max_forget, seed), target, classnames, image_size) if forget else None,
        retain=_labelled(_spread(retain, max_retain, seed), target, classnames, image_size) if retain else None,
        templates=list(TRAINING_TEMPLATES),
    )
    forget_val = [r for r in val if target.matches(r)]
    retain_val = [r for r in val if not is_erased(r)]
    if forget_val:
        data.forget_val = _labelled(_spread(forget_val, max_val, seed), target, classnames, image_size)
    if retain_val:
        data.retain_val = _labelled(_spread(retain_val, max_val, seed), target, classnames, image_size)
    return data
