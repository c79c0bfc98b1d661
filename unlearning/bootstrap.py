"""Bootstrap the embedded default: generate the shapes world and train a tiny CLIP on it.

This is what makes clip-erasure work out of the box on a machine that cannot download weights:
the resulting model becomes the first ``champion``. Real users skip this and point the pipeline
at their own weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unlearning.data import load_images, read_manifest
from unlearning.evaluation import EvalSet, Evaluation, evaluate
from unlearning.models import ClipBundle, load_model, pick_device
from unlearning.train import TrainConfig, train_clip
from unlearning.world import WorldSpec, generate_world, world_probes


@dataclass
class BootstrapResult:
    bundle: ClipBundle
    manifest: Path
    evaluation: Evaluation
    history: list[dict]
    sample_images: torch.Tensor
    seconds: dict[str, float]


def world_eval_set(manifest: Path, split: str = "test", image_size: int = 32) -> EvalSet:
    """The world's evaluation images with its held-out probes (colour, size, colour x shape)."""
    records = read_manifest(manifest, split=split)
    return EvalSet(records, load_images(records, image_size), probes_for=world_probes)


def bootstrap_world_model(world_dir: Path, spec: WorldSpec = WorldSpec(), model_name: str = "TinyCLIP-RN32",
                          config: TrainConfig = TrainConfig(), device: str | None = None,
                          on_log: Callable[[int, dict], None] | None = None, progress: bool = True) -> BootstrapResult:
    """Generate (or reuse) the world in ``world_dir``, train ``model_name`` on its train split and
    evaluate it on the test split."""
    seconds = {}
    started = time.perf_counter()
    manifest = generate_world(world_dir, spec, progress=progress)
    train = read_manifest(manifest, split="train")
    images = load_images(train, spec.image_size)
    seconds["data"] = time.perf_counter() - started

    bundle = load_model(model_name, device=str(pick_device(device)), seed=config.seed)
    started = time.perf_counter()
    history = train_clip(bundle.model, bundle.tokenizer, images, [r.caption for r in train], config, on_log=on_log, progress=progress)
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    eval_set = world_eval_set(manifest, "test", spec.image_size)
    evaluation = evaluate(bundle.model, bundle.tokenizer, eval_set, targets=[])
    seconds["evaluate"] = time.perf_counter() - started
    return BootstrapResult(bundle, manifest, evaluation, history, eval_set.images[:64], seconds)
