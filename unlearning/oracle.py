"""The retrain oracle: the champion's training recipe, run from scratch on the reference data
without the forgotten targets.

Unlearning is judged against it: a model that never saw the target is what "forgotten" looks
like, so each depth measure (``unlearning.depth``) of an erased model is compared with the
oracle's, not with zero. On the embedded world this costs one bootstrap; oracles are cached by
recipe, reference data and targets, so each is trained once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from unlearning.data import Record, load_images, read_manifest
from unlearning.models import load_model, pick_device, save_model
from unlearning.precision import resolve_precision
from unlearning.target import ForgetTarget
from unlearning.train import TrainConfig, train_clip

RECIPE_FILE = "training_recipe.json"


class TrainingRecipe(BaseModel):
    """How a champion was trained from scratch: enough to train its oracle the same way."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = "TinyCLIP-RN32"
    train: TrainConfig = TrainConfig()
    image_size: int = 32


def write_recipe(folder: str | Path, recipe: TrainingRecipe) -> Path:
    """Store ``recipe`` beside a model's weights (the bootstrap does, for its champion)."""
    path = Path(folder) / RECIPE_FILE
    path.write_text(recipe.model_dump_json(indent=2))
    return path


def read_recipe(folder: str | Path) -> TrainingRecipe | None:
    """The recipe stored with a model folder, or None (a model trained elsewhere)."""
    path = Path(folder) / RECIPE_FILE
    return TrainingRecipe.model_validate_json(path.read_text()) if path.exists() else None


def without_targets(records: Sequence[Record], targets: Sequence[ForgetTarget]) -> list[Record]:
    """The train records no target names: what the oracle trains on."""
    return [r for r in records if r.split == "train" and not any(t.matches(r) for t in targets)]


def oracle_key(recipe: TrainingRecipe, manifest: str | Path, targets: Sequence[ForgetTarget], device_type: str) -> str:
    """Cache key: the recipe (with its precision as resolved on this device), the reference data's
    manifest content, and the targets, in a stable order."""
    digest = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    dtype = resolve_precision(recipe.train.precision, device_type, stage="train").dtype
    names = sorted(t.model_dump_json() for t in targets)
    blob = json.dumps([recipe.model_dump(mode="json"), digest, names, dtype])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def oracle_folder(cache_dir: str | Path, recipe: TrainingRecipe, manifest: str | Path, targets: Sequence[ForgetTarget],
                  device: str | None = None) -> Path:
    """Where the oracle for ``targets`` lives in ``cache_dir`` (whether or not it is trained yet)."""
    slug = "-".join(t.name.replace(" ", "_") for t in targets)[:40] or "none"
    return Path(cache_dir) / f"oracle-{slug}-{oracle_key(recipe, manifest, targets, pick_device(device).type)}"


def cached_oracle(cache_dir: str | Path, recipe: TrainingRecipe, manifest: str | Path, targets: Sequence[ForgetTarget],
                  device: str | None = None) -> Path | None:
    """The trained oracle's folder if it is in the cache, else None."""
    folder = oracle_folder(cache_dir, recipe, manifest, targets, device)
    return folder if (folder / "open_clip_model.safetensors").exists() else None


def train_oracle(manifest: str | Path, targets: Sequence[ForgetTarget], recipe: TrainingRecipe, cache_dir: str | Path,
                 device: str | None = None, progress: bool = True, on_log: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or find in the cache) the oracle for ``targets``: ``recipe`` from scratch, same seed and
    step budget, on the reference train split without the targets' images.

    Raises:
        ValueError: no target, or a target that removes nothing (not in the reference data).
    """
    if not targets:
        raise ValueError("targets: the oracle needs at least one target to leave out")
    cached = cached_oracle(cache_dir, recipe, manifest, targets, device)
    if cached:
        return cached
    records = read_manifest(manifest)
    train = [r for r in records if r.split == "train"]
    kept = without_targets(train, targets)
    missing = [t.name for t in targets if not any(t.matches(r) for r in train)]
    if missing:
        raise ValueError(f"targets: {missing} name no train image of {manifest} — the oracle would be the champion itself")
    folder = oracle_folder(cache_dir, recipe, manifest, targets, device)
    started = time.perf_counter()
    bundle = load_model(recipe.model_name, device=str(pick_device(device)), seed=recipe.train.seed)
    images = load_images(kept, recipe.image_size)
    train_clip(bundle.model, bundle.tokenizer, images, [r.caption for r in kept], recipe.train, on_log=on_log, progress=progress)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    save_model(bundle, tmp)
    write_recipe(tmp, recipe)
    (tmp / "oracle.json").write_text(json.dumps({"targets": [t.model_dump() for t in targets], "train_images": len(kept),
                                                  "left_out": len(train) - len(kept), "seconds": round(time.perf_counter() - started, 1),
                                                  "manifest": str(manifest)}, indent=1))
    tmp.replace(folder)
    return folder
