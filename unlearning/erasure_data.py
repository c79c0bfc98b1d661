"""Assemble what a method may use for one forget target from the model owner's reference data
(train split: forget and retain pools; val split: stop and calibration sets) and, optionally, the
requester's own forget and retain images.

Rules:
- the class set always comes from the reference data (a retain manifest has, rightly, no image
  of the target);
- forget images may be reference images (a person's photos are, by definition, in the owner's
  data): those, found by their resolved file path, leave every retain and stop set;
- every row of a requester's retain manifest is retain data, whatever its split.
"""

from __future__ import annotations

import os
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


def image_key(path: str) -> str:
    """What identifies an image file across manifests: its path with symlinks and ``..`` resolved."""
    return os.path.realpath(path)


def rows_in(records: Sequence[Record], images: Sequence[Record]) -> list[Record]:
    """The ``records`` whose image file is one of ``images``' (e.g. the reference rows a forget manifest lists)."""
    keys = {image_key(r.image_path) for r in images}
    return [r for r in records if image_key(r.image_path) in keys] if keys else []


def evaluation_records(test: Sequence[Record], forget_records: Sequence[Record] | None,
                       targets: Sequence[ForgetTarget]) -> list[Record]:
    """The evaluation images: ``test`` without forget images that no target matches (e.g. an
    association's pairs under other captions), which would otherwise count as retained."""
    keys = {image_key(r.image_path) for r in forget_records or ()}
    if not keys:
        return list(test)
    return [r for r in test if image_key(r.image_path) not in keys or any(t.matches(r) for t in targets)]


def unknown_target(target: ForgetTarget, reference: Sequence[Record]) -> str | None:
    """Why a class or subgroup target matches no reference image, naming what is known instead; None if it matches some."""
    if target.kind == "association" or any(target.matches(r) for r in reference):
        return None
    classes = sorted({r.label for r in reference})
    if target.class_name not in classes:
        return (f"target.class_name: {target.class_name!r} is not a class of the model's reference data "
                f"— use one of the known classes: {', '.join(classes)}")
    of_class = [r for r in reference if r.label == target.class_name]
    values = sorted({str(r.attributes[target.attribute]) for r in of_class if target.attribute in r.attributes})
    if not values:
        attributes = sorted({a for r in of_class for a in r.attributes})
        return (f"target.attribute: the reference images of {target.class_name!r} have no attribute {target.attribute!r} "
                f"— use one of: {', '.join(attributes) or 'none (a class target instead)'}")
    return (f"target.value: no reference image of {target.class_name!r} has {target.attribute} {target.value!r} "
            f"— use one of the known values: {', '.join(values)}")


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
                          retain_records: Sequence[Record] | None = None, max_forget: int = 256, max_retain: int = 4096,
                          max_val: int = 1024, seed: int = 0) -> UnlearningData:
    """Build the :class:`UnlearningData` for ``target``.

    Args:
        reference: the owner's records with splits ``train`` (pools) and ``val`` (stop/calibration);
            all of them give the class set.
        forget_records: the requester's real forget images; default: the target's reference train
            images. Reference images among them leave the retain, retain-stop and forget-stop sets.
        earlier: targets erased before. Their images never enter the default retain set, so
            retention training cannot teach an erased class back.
        retain_records: the requester's retain images, every one of them whatever its split;
            default: the reference train split without the erased targets and the forget images.
    """
    train = [r for r in reference if r.split == "train"]
    val = [r for r in reference if r.split == "val"]
    classnames = target_classnames(target, reference)
    erased = [target, *earlier]
    forget_keys = {image_key(r.image_path) for r in forget_records or ()}

    def is_erased(r: Record) -> bool:
        return any(t.matches(r) for t in erased) or (bool(forget_keys) and image_key(r.image_path) in forget_keys)

    forget = list(forget_records) if forget_records else [r for r in train if target.matches(r)]
    retain = list(retain_records) if retain_records is not None else [r for r in train if not is_erased(r)]
    data = UnlearningData(
        classnames=classnames,
        forget_index=classnames.index(target.name) if target.name in classnames else None,
        forget=_labelled(_spread(forget, max_forget, seed), target, classnames, image_size) if forget else None,
        retain=_labelled(_spread(retain, max_retain, seed), target, classnames, image_size) if retain else None,
        templates=list(TRAINING_TEMPLATES),
    )
    # A forget image in the val split is trained on: as a stop image it would no longer be held out.
    forget_val = [r for r in val if target.matches(r) and not (forget_keys and image_key(r.image_path) in forget_keys)]
    retain_val = [r for r in val if not is_erased(r)]
    if forget_val:
        data.forget_val = _labelled(_spread(forget_val, max_val, seed), target, classnames, image_size)
    if retain_val:
        data.retain_val = _labelled(_spread(retain_val, max_val, seed), target, classnames, image_size)
    return data
