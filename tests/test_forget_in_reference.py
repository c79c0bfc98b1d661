"""Forget images inside the owner's data: a person's images are, by definition, reference images.
They are forgotten, leave every retain set and the evaluation's retain side, and are counted; a
request's own retain manifest that overlaps the forget manifest is still refused."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.validation import validate_request_data
from unlearning.data import Record, write_manifest
from unlearning.erasure_data import build_unlearning_data, evaluation_records, rows_in
from unlearning.methods.base import ForgetTarget
from unlearning.world import SHAPES

CIRCLE = ForgetTarget(kind="class", class_name="circle")


def tiny_reference(small_records, folder: Path, per_split: dict[str, int]) -> list[Record]:
    """Circles and squares of each split, copied under ``folder/images``, each with a caption of its own
    (so that a set of captions tells which images a set holds)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in per_split.items():
        for label in ("circle", "square"):
            for r in [r for r in small_records[split] if r.label == label][:n]:
                copy = folder / "images" / f"{split}-{Path(r.image_path).name}"
                shutil.copy(r.image_path, copy)
                rows.append(dataclasses.replace(r, image_path=str(copy), caption=f"{r.caption} #{len(rows)}"))
    return rows


def test_forget_images_leave_the_retain_and_stop_sets_by_path(small_records, tmp_path):
    reference = tiny_reference(small_records, tmp_path / "world", {"train": 4, "val": 2, "test": 2})
    squares = [r for r in reference if r.label == "square"]
    forgotten = [next(r for r in squares if r.split == "train"), next(r for r in squares if r.split == "val")]
    # The same files reached another way: through a symlink, as a requester's folder might hold them.
    (tmp_path / "request").mkdir()
    linked = []
    for r in forgotten:
        link = tmp_path / "request" / Path(r.image_path).name
        link.symlink_to(r.image_path)
        linked.append(dataclasses.replace(r, image_path=str(link)))
    # An association's pairs (captions matched by none of the rows), so that only the path can tell them apart.
    target = ForgetTarget(kind="association", captions=["a caption no image has"])
    data = build_unlearning_data(target, reference, 32, forget_records=linked)

    kept = set(data.retain.texts) | set(data.retain_val.texts)
    assert {r.caption for r in forgotten}.isdisjoint(kept)
    assert set(data.retain.texts) == {r.caption for r in reference if r.split == "train"} - {forgotten[0].caption}
    assert set(data.retain_val.texts) == {r.caption for r in reference if r.split == "val"} - {forgotten[1].caption}
    assert sorted(data.forget.texts) == sorted(r.caption for r in forgotten)
    assert rows_in(linked, reference) == linked


def test_forget_images_of_the_target_are_not_their_own_stop_set(small_records, tmp_path):
    reference = tiny_reference(small_records, tmp_path / "world", {"train": 4, "val": 2})
    val_circle = next(r for r in reference if r.split == "val" and r.label == "circle")
    data = build_unlearning_data(CIRCLE, reference, 32, forget_records=[val_circle])
    assert val_circle.caption not in data.forget_val.texts and len(data.forget_val) == 1
    assert "circle" not in {data.classnames[i] for i in data.retain.labels.tolist()}


def test_evaluation_keeps_forget_images_only_on_the_forget_side(small_records, tmp_path):
    reference = tiny_reference(small_records, tmp_path / "world", {"test": 3})
    circle, square = (next(r for r in reference if r.label == label) for label in ("circle", "square"))
    # the circle is matched by the target (forget side); nothing matches the square, which would count as retained
    evaluated = evaluation_records(reference, [circle, square], [CIRCLE])
    assert circle in evaluated and square not in evaluated and len(evaluated) == len(reference) - 1
    assert evaluation_records(reference, None, [CIRCLE]) == reference


def test_reference_images_in_the_forget_manifest_pass_validation_but_an_overlapping_retain_manifest_does_not(
        small_records, tmp_path):
    world = tmp_path / "world"
    reference = tiny_reference(small_records, world, {"train": 3})
    forget = write_manifest([r for r in reference if r.label == "circle"], world / "forget.jsonl")
    classes = list(SHAPES)
    assert validate_request_data(forget, None, classes, target=CIRCLE).success
    overlapping = write_manifest(reference, world / "retain.jsonl")
    report = validate_request_data(forget, overlapping, classes, target=CIRCLE)
    assert "no_forget_retain_overlap" in {r.expectation for r in report.failures}


@pytest.mark.usefixtures("prefect_harness")
def test_erasure_of_reference_images_runs_and_counts_them(store, small_records, tmp_path, monkeypatch):
    from flows.erasure import erasure_flow
    from tasks.settings import get_settings

    world = tmp_path / "world"
    reference = tiny_reference(small_records, world, {"train": 24, "val": 4, "test": 8})
    monkeypatch.setenv("ERASURE_REFERENCE_MANIFEST", str(write_manifest(reference, world / "manifest.jsonl")))
    get_settings.cache_clear()
    # The person's images: circles of the reference data, some of them in its test split.
    circles = {split: [r for r in reference if r.label == "circle" and r.split == split] for split in ("train", "test")}
    forget_rows = circles["train"][:10] + circles["test"][:2]
    forget = write_manifest(forget_rows, world / "forget.jsonl")
    report = erasure_flow({"request_id": "dsr-in-reference", "requester": "test", "target": {"kind": "class", "class_name": "circle"},
                           "forget_manifest": str(forget), "method": "gradient_ascent", "method_config": {"max_steps": 2},
                           "dry_run": True})
    n = len(forget_rows)
    assert report.status == "dry_run"
    assert report.data["dsr-in-reference"]["forget_rows_in_reference"] == n and report.data["dsr-in-reference"]["forget_images"] == n
    assert report.data["dsr-in-reference"]["retain_source"] == "reference train split"
    assert report.data["dsr-in-reference"]["retain_images"] == sum(1 for r in reference if r.split == "train" and r.label != "circle")
    metrics = MlflowClient().get_run(report.mlflow_run_id).data.metrics
    assert metrics["data.forget_rows_in_reference"] == n
