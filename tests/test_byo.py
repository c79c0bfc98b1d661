"""Bring your own model, end to end through the CLI: a model and data the shapes world did not make.

The data are scikit-learn's 1797 handwritten 8x8 digits, upscaled to 32 px RGB PNGs with a
manifest (splits train/val/test, captions such as "a handwritten seven."); the model is a tiny
open_clip CLIP trained on them here. ``erasure register local-dir:...`` makes it the champion,
then ``erasure run`` erases one digit for a requester whose images are rows of that reference
manifest (the person's images are part of the owner's training data).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import CACHE, _key
from flows.cli import main as cli
from tasks import registry
from unlearning.data import Record, load_images, read_manifest, write_manifest
from unlearning.models import load_model, save_model
from unlearning.train import TrainConfig, train_clip

pytestmark = pytest.mark.usefixtures("prefect_harness")

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SIZES = {"test": 40, "val": 15}  # per digit; the rest (~125 per digit) is train
# Captions vary as an owner's would; the first is close to the evaluation prompt "a photo of a {}."
CAPTIONS = ("a photo of a {}.", "a handwritten {}.", "the digit {}.")
# A few seconds of training per digit class: enough to know most digits well, "three" included (the test checks).
# No flips: a mirrored digit is another glyph.
DIGITS_TRAIN = TrainConfig(steps=150, batch_size=128, lr=2e-3, warmup_steps=15, seed=0, hflip=False)
DIGITS_RECIPE = "sklearn-digits-32px-bicubic-3-captions-v2"
# As tests/test_flows.py: lenient gates for a model trained for seconds.
GATES = {"max_forget_accuracy": 0.25, "max_retain_drop": 0.10, "max_heldout_drop": 0.10}
# The test is about the owner's model and data, not the method: gradient ascent forgets in a few
# steps (either gate outcome is checked below).
ASCENT = {"max_steps": 40, "lr": 1e-4}


def digits_manifest(folder: Path, per_digit: int | None = None) -> Path:
    """Write the digits as 32 px RGB PNGs under ``folder/images/<split>/`` and ``folder/manifest.jsonl``.

    Args:
        per_digit: keep only this many images of each digit (spread over the splits); None: all 1797.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    sizes = SPLIT_SIZES if per_digit is None else {"test": per_digit // 3, "val": per_digit // 3}
    records, seen = [], {d: 0 for d in range(10)}
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        digit = int(digit)
        rank = seen[digit]
        seen[digit] += 1
        if per_digit is not None and rank >= per_digit:
            continue
        # the first images of each digit are its test split, the next its val split: fixed, no randomness
        split = "test" if rank < sizes["test"] else "val" if rank < sizes["test"] + sizes["val"] else "train"
        path = folder / "images" / split / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
        grey.convert("RGB").save(path)
        records.append(Record(str(path), WORDS[digit], CAPTIONS[index % len(CAPTIONS)].format(WORDS[digit]), split))
    return write_manifest(records, folder / "manifest.jsonl")


@pytest.fixture(scope="session")
def digits_model_dir(tmp_path_factory) -> Path:
    """A TinyCLIP-RN32 trained briefly on the digits (cached under .erasure/test-cache by recipe)."""
    folder = CACHE / f"digits-model-{_key(DIGITS_TRAIN, DIGITS_RECIPE, 'TinyCLIP-RN32')}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "digits.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "open_clip_model.safetensors").exists():
            train = read_manifest(digits_manifest(tmp_path_factory.mktemp("digits-train")), split="train")
            bundle = load_model("TinyCLIP-RN32", device="cpu", seed=DIGITS_TRAIN.seed)
            train_clip(bundle.model, bundle.tokenizer, load_images(train, 32), [r.caption for r in train], DIGITS_TRAIN, progress=False)
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            save_model(bundle, tmp)
            tmp.replace(folder)
    return folder


def aliases(name: str) -> dict[str, str | None]:
    found = {a: registry.get_version_by_alias(name, a) for a in ("champion", "previous")}
    return {a: (None if v is None else str(v.version)) for a, v in found.items()}


def test_register_own_model_then_erase_a_digit_whose_images_are_in_the_reference_data(mlflow_store, digits_model_dir, tmp_path):
    data = tmp_path / "digits"
    manifest = digits_manifest(data)
    name = mlflow_store.model_name

    assert cli(["register", f"local-dir:{digits_model_dir}", "--reference-manifest", str(manifest)]) == 0
    registered = registry.get_version_by_alias(name, "champion")
    assert aliases(name) == {"champion": str(registered.version), "previous": None}
    baseline = json.loads(open(MlflowClient().download_artifacts(registered.run_id, "evaluation.json")).read())
    assert baseline["per_class"]["three"] > 0.5, "the test model must know the digit before it can forget it"

    # The requester's images are rows of the owner's reference manifest (train split).
    threes = [r for r in read_manifest(manifest, split="train") if r.label == "three"][:60]
    forget = write_manifest(threes, data / "forget-three.jsonl")
    request = {"request_id": "dsr-digit-three", "requester": "test@clip-erasure", "target": {"kind": "class", "class_name": "three"},
               "forget_manifest": str(forget), "method": "gradient_ascent", "gates": GATES, "method_config": ASCENT}
    (tmp_path / "request.json").write_text(json.dumps(request))
    code = cli(["run", str(tmp_path / "request.json"), "--report", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())

    # No ERASURE_REFERENCE_MANIFEST is set: the erasure read the manifest the champion was registered with.
    assert report["per_class_before"] == pytest.approx(baseline["per_class"], abs=1e-6)
    assert MlflowClient().get_run(report["mlflow_run_id"]).data.tags["erasure.reference_manifest"] == str(manifest.resolve())
    assert report["after"]["forget_accuracy"] < report["before"]["forget_accuracy"] - 0.3
    failed = [g["name"] for g in report["gates"] if not g["passed"]]
    if report["gates_passed"]:
        assert code == 0 and report["status"] == "promoted" and not failed
        assert aliases(name) == {"champion": report["model_version"], "previous": str(registered.version)}
        version = MlflowClient().get_model_version(name, report["model_version"])
        assert json.loads(version.tags["erasure.targets"]) == [{"kind": "class", "class_name": "three"}]
        assert version.tags["erasure.parent_version"] == str(registered.version)
    else:
        assert code == 2 and report["status"] == "rejected" and failed
        assert aliases(name) == {"champion": str(registered.version), "previous": None}
