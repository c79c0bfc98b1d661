"""Assemble what a method may use for one forget target from the model owner's reference data
(train split: forget and retain pools; val split: stop and calibration sets) and, optionally, the
requester's own forget and retain images.

Rules:
- the class set always comes from the reference data (a retain manifest has, rightly, no image
  of the target);
- forget images may be reference images (a person's photos are, by definition, in the owner's
  data): those, found by their resolved file path, leave every retain and stop set;
- every row of a requester's retain manifest is retain data, whatever its split.

Several targets of one :func:`joint_key` (a batch of requests) share one :class:`UnlearningData`
(:func:`build_joint_unlearning_data`): the union of their forget sets, a retain set without any of them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Sequence

import torch

from unlearning.data import Record
from unlearning.evaluation import subgroup_task
from unlearning.image_cache import ImageCache, cached_load_images
from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData, distinct_targets, joint_key  # noqa: F401  (joint_key re-exported)

TRAINING_TEMPLATES = ("a picture of a {}.",)  # never the evaluation prompt "a photo of a {}."


def target_classnames(target: ForgetTarget, records: Sequence[Record]) -> list[str]:
    """The class set a target is forgotten among: labels for a class, "<value> <label>" pairs for a subgroup."""
    if target.kind == "subgroup":
        return subgroup_task(target.attribute, records).classnames
    return sorted({r.label for r in records})


def image_key(path: str) -> str:
    """What identifies an image file across manifests: its path with symlinks and ``..`` resolved.

    Resolves each folder once (``realpath`` of every row's full path cost seconds on a 60k-row
    manifest) and the file itself only where it is a link.
    """
    folder, name = os.path.split(path)
    if name in ("", ".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    return os.path.join(_real_folder(folder), name)


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


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
    kept = [r for r in test if image_key(r.image_path) not in keys or any(t.matches(r) for t in targets)]
    # An association's own pairs are what its certificate is about: evaluated even when the test
    # split holds none of them (deleted lake images are usually training images).
    present = {image_key(r.image_path) for r in kept}
    pairs = [r for r in forget_records if image_key(r.image_path) not in present
             and any(t.kind == "association" and t.matches(r) for t in targets)]
    return kept + pairs


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


def _labelled(records: Sequence[Record], target: ForgetTarget, classnames: list[str], image_size: int,
              cache_dir: str | os.PathLike | ImageCache | None = None) -> LabelledImages:
    index = {c: i for i, c in enumerate(classnames)}

    def name(r: Record) -> str:
        return f"{r.attributes.get(target.attribute)} {r.label}" if target.kind == "subgroup" else r.label

    labels = torch.tensor([index.get(name(r), -1) for r in records], dtype=torch.long)
    return LabelledImages(cached_load_images(records, image_size, cache_dir), [r.caption for r in records], labels)


def _erased_test(erased: Sequence[ForgetTarget], forget_keys: set[str]):
    """Whether a record is an image of an erased target or a forget image (run over every reference row)."""
    labels = {t.class_name for t in erased if t.kind == "class"}  # a set lookup: ForgetTarget.matches costs ~1 us a row
    others = [t for t in erased if t.kind != "class"]

    def is_erased(r: Record) -> bool:
        return (r.label in labels or any(t.matches(r) for t in others)
                or (bool(forget_keys) and image_key(r.image_path) in forget_keys))
    return is_erased


def _spread(records: Sequence[Record], limit: int, seed: int) -> list[Record]:
    """At most ``limit`` of ``records``: a seeded uniform sample, in random order.

    Each row is ranked by a hash of the seed, the last two parts of its image path and its
    caption (not the whole path: the same data elsewhere gives the same sample), and the lowest
    ranks are kept. A pool that loses or gains rows (another target, an earlier erasure) so keeps
    the rest of its sample, and a later request finds most of its images decoded already.
    """
    if len(records) <= limit:
        return list(records)
    ranks = _spread_ranks(seed)
    if len(ranks) > 2_000_000:  # a long-lived service meeting many manifests: start over
        ranks.clear()
    order = []
    for r in records:  # a batch samples the same 60k-row pools many times: each row is hashed once
        rank = ranks.get(key := (r.image_path, r.caption))
        if rank is None:
            rank = ranks[key] = _spread_rank(seed, r)
        order.append(rank)
    return [records[i] for i in sorted(range(len(records)), key=order.__getitem__)[:limit]]


def _spread_rank(seed: int, record: Record) -> bytes:
    key = "/".join(record.image_path.rsplit("/", 2)[-2:]) + "\0" + record.caption
    return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()


@functools.lru_cache(maxsize=4)
def _spread_ranks(seed: int) -> dict[tuple[str, str], bytes]:
    """The rank of each (image path, caption) seen so far under ``seed`` (a pure function of both)."""
    return {}


def build_unlearning_data(target: ForgetTarget, reference: Sequence[Record], image_size: int,
                          forget_records: Sequence[Record] | None = None, earlier: Sequence[ForgetTarget] = (),
                          retain_records: Sequence[Record] | None = None, max_forget: int = 256, max_retain: int = 4096,
                          max_val: int = 1024, seed: int = 0,
                          cache_dir: str | os.PathLike | ImageCache | None = None) -> UnlearningData:
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
        cache_dir: where decoded images are cached (:func:`unlearning.image_cache.cached_load_images`); None: no cache.
    """
    train = [r for r in reference if r.split == "train"]
    val = [r for r in reference if r.split == "val"]
    classnames = target_classnames(target, reference)
    forget_keys = {image_key(r.image_path) for r in forget_records or ()}
    is_erased = _erased_test([target, *earlier], forget_keys)

    forget = list(forget_records) if forget_records else [r for r in train if target.matches(r)]
    retain = list(retain_records) if retain_records is not None else [r for r in train if not is_erased(r)]
    data = UnlearningData(
        classnames=classnames,
        forget_index=classnames.index(target.name) if target.name in classnames else None,
        forget=_labelled(_spread(forget, max_forget, seed), target, classnames, image_size, cache_dir) if forget else None,
        retain=_labelled(_spread(retain, max_retain, seed), target, classnames, image_size, cache_dir) if retain else None,
        templates=list(TRAINING_TEMPLATES),
    )
    # A forget image in the val split is trained on: as a stop image it would no longer be held out.
    forget_val = [r for r in val if target.matches(r) and not (forget_keys and image_key(r.image_path) in forget_keys)]
    retain_val = [r for r in val if not is_erased(r)]
    if forget_val:
        data.forget_val = _labelled(_spread(forget_val, max_val, seed), target, classnames, image_size, cache_dir)
    if retain_val:
        data.retain_val = _labelled(_spread(retain_val, max_val, seed), target, classnames, image_size, cache_dir)
    return data


def _image_pair_key(record: Record) -> tuple[str, str]:
    return image_key(record.image_path), record.caption


def build_joint_unlearning_data(targets: Sequence[ForgetTarget], reference: Sequence[Record], image_size: int,
                                forget_records: Sequence[Sequence[Record] | None] | None = None,
                                earlier: Sequence[ForgetTarget] = (), retain_records: Sequence[Record] | None = None,
                                max_forget: int = 256, max_retain: int = 4096, max_val: int = 1024, seed: int = 0,
                                cache_dir: str | os.PathLike | ImageCache | None = None) -> UnlearningData:
    """Build one :class:`UnlearningData` that forgets every target of ``targets`` in one update.

    With one target it is :func:`build_unlearning_data`'s data (plus ``forget_targets``). With
    several: ``forget`` holds up to ``max_forget`` images *per target* (so a batch of ten costs
    no target its share), each labelled with its target's class index (``forget_indices``, in the
    order of ``targets``); ``forget_val`` holds up to ``max_val`` stop images per target; retain and
    retain-stop sets leave out every target, every earlier one and every forget image. A repeated
    target counts once, with the union of its requests' forget images.

    Args:
        targets: the targets, all of one :func:`joint_key`; the first is the run's ``target``.
        forget_records: per target, the requester's forget images, or None for the target's
            reference train images; default: None for each.
        reference, earlier, retain_records, max_retain, seed, cache_dir: as :func:`build_unlearning_data`.

    Raises:
        ValueError: no target, targets of different joint keys, or ``forget_records`` of another length.
    """
    if not targets:
        raise ValueError("targets: empty — give at least one target to forget")
    if len({joint_key(t) for t in targets}) > 1:
        named = ", ".join(f"{t.name!r} ({joint_key(t)})" for t in targets)
        raise ValueError(f"targets: {named} cannot be forgotten in one update — group them by joint_key "
                         "(class targets together, subgroups of one attribute together, associations together)")
    per_request = list(forget_records) if forget_records is not None else [None] * len(targets)
    if len(per_request) != len(targets):
        raise ValueError(f"forget_records: {len(per_request)} entries for {len(targets)} targets — give one per target "
                         "(None: the target's reference train images)")
    train = [r for r in reference if r.split == "train"]
    val = [r for r in reference if r.split == "val"]
    unique = distinct_targets(targets)
    classnames = target_classnames(unique[0], reference)
    forget_keys = {image_key(r.image_path) for records in per_request for r in records or ()}
    is_erased = _erased_test([*unique, *earlier], forget_keys)

    # Each target's forget images: the union over its requests, each request's own list as given.
    own: dict[int, list[Record]] = {i: [] for i in range(len(unique))}
    for target, records in zip(targets, per_request):
        pool = own[unique.index(target)]
        seen = {_image_pair_key(r) for r in pool}
        pool += [r for r in (list(records) if records else [r for r in train if target.matches(r)])
                 if not (pool and _image_pair_key(r) in seen)]

    def joined(pools: list[list[Record]], limit: int) -> tuple[list[Record], list[int]]:
        """Each target's pool sampled to ``limit``, concatenated without repeats; the target of each row."""
        rows, owners, seen = [], [], set()
        for i, pool in enumerate(pools):
            for r in _spread(pool, limit, seed):
                if len(pools) == 1 or _image_pair_key(r) not in seen:
                    seen.add(_image_pair_key(r))
                    rows.append(r)
                    owners.append(i)
        return rows, owners

    indices = [classnames.index(t.name) if t.name in classnames else None for t in unique]
    class_like = unique[0].kind != "association"

    def labelled(records: list[Record], owners: list[int] | None = None) -> LabelledImages:
        images = _labelled(records, unique[0], classnames, image_size, cache_dir)
        if owners is not None and class_like:  # a forget image forgets the class it was asked for under
            wanted = torch.tensor([-1 if indices[i] is None else indices[i] for i in owners], dtype=torch.long)
            images.labels = torch.where(wanted >= 0, wanted, images.labels)
        return images

    forget, forget_owners = joined([own[i] for i in range(len(unique))], max_forget)
    retain = list(retain_records) if retain_records is not None else [r for r in train if not is_erased(r)]
    known = list(dict.fromkeys(i for i in indices if i is not None)) if class_like else []
    data = UnlearningData(
        classnames=classnames,
        forget_index=known[0] if class_like and known and None not in indices else None,
        forget=labelled(forget, forget_owners) if forget else None,
        retain=_labelled(_spread(retain, max_retain, seed), unique[0], classnames, image_size, cache_dir) if retain else None,
        templates=list(TRAINING_TEMPLATES),
        forget_indices=known,
        forget_targets=unique,
    )
    # A forget image in the val split is trained on: as a stop image it would no longer be held out.
    stop_pools = [[r for r in val if t.matches(r) and not (forget_keys and image_key(r.image_path) in forget_keys)] for t in unique]
    forget_val, _ = joined(stop_pools, max_val)
    retain_val = [r for r in val if not is_erased(r)]
    if forget_val:
        data.forget_val = _labelled(forget_val, unique[0], classnames, image_size, cache_dir)
    if retain_val:
        data.retain_val = _labelled(_spread(retain_val, max_val, seed), unique[0], classnames, image_size, cache_dir)
    return data
