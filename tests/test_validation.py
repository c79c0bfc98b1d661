"""Manifest validation: a clean request's data passes; each kind of bad row fails the check named after it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.validation import REQUIRED_COLUMNS, DataValidationError, validate_manifest_file, validate_manifests, validate_request_data
from unlearning.target import ForgetTarget
from unlearning.world import SHAPES, render

CLASSES = list(SHAPES)
CIRCLE = ForgetTarget(kind="class", class_name="circle")


def _png(path: Path, side: int = 32, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _ = render("circle", "red", "small", np.random.default_rng(seed), image_size=side) if side >= 8 else (
        Image.new("RGB", (side, side)), None)
    image.save(path)
    return path.name


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def data(tmp_path):
    """A folder with 3 forget (circle) and 3 retain (square) images and their row dicts."""
    root = tmp_path / "data"
    for i in range(6):
        _png(root / "images" / f"{i}.png", seed=i)
    forget = [{"image_path": f"images/{i}.png", "label": "circle", "caption": "a red circle", "split": "train"} for i in range(3)]
    retain = [{"image_path": f"images/{i}.png", "label": "square", "caption": "a blue square"} for i in range(3, 6)]
    return root, forget, retain


def _validate(root: Path, forget: list[dict], retain: list[dict]):
    return validate_request_data(_write(root / "forget.jsonl", forget), _write(root / "retain.jsonl", retain), CLASSES)


def test_clean_manifests_pass(data):
    root, forget, retain = data
    report = _validate(root, forget, retain)
    report.raise_for_failure()
    assert report.success and not report.notes
    checks = {r.expectation for r in report.results}
    assert {"columns_present", "not_empty", "label_known", "caption_not_empty", "image_path_unique", "image_inside_root",
            "image_exists", "image_decodes", "image_size_sane", "no_forget_retain_overlap"} <= checks
    assert json.loads(json.dumps(report.to_dict()))["success"] is True
    assert report.to_markdown().startswith("### Data validation: passed")


def _null_label(root, forget, retain):
    forget[0]["label"] = None


def _unknown_label(root, forget, retain):
    forget[1]["label"] = "hexagon"


def _empty_caption(root, forget, retain):
    forget[2]["caption"] = "  "


def _duplicate_path(root, forget, retain):
    forget[1]["image_path"] = "./images/0.png"


def _overlap(root, forget, retain):
    forget[2]["image_path"] = retain[0]["image_path"]


def _missing_image(root, forget, retain):
    forget[0]["image_path"] = "images/missing.png"


def _corrupt_image(root, forget, retain):
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG garbage, not an image")
    forget[0]["image_path"] = "images/corrupt.png"


def _tiny_image(root, forget, retain):
    _png(root / "images" / "tiny.png", side=2)
    forget[0]["image_path"] = "images/tiny.png"


def _parent_escape(root, forget, retain):
    _png(root.parent / "escape.png")  # exists, so only the traversal check can catch it
    forget[0]["image_path"] = "../escape.png"


def _dot_dot_inside_root(root, forget, retain):
    forget[0]["image_path"] = "images/../images/0.png"  # lands inside, but ".." is refused outright


def _absolute_escape(root, forget, retain):
    forget[0]["image_path"] = str(root.parent / "outside" / _png(root.parent / "outside" / "x.png"))


def _empty_manifest(root, forget, retain):
    forget.clear()


@pytest.mark.parametrize("breakage, check, shown", [
    (_null_label, "label_not_null", "images/0.png (row 1)"),
    (_unknown_label, "label_known", '"hexagon" (row 2)'),
    (_empty_caption, "caption_not_empty", '"  " (row 3)'),
    (_duplicate_path, "image_path_unique", "./images/0.png (row 2)"),
    (_overlap, "no_forget_retain_overlap", "images/3.png (row 3)"),
    (_missing_image, "image_exists", "images/missing.png (row 1)"),
    (_corrupt_image, "image_decodes", "images/corrupt.png (row 1)"),
    (_tiny_image, "image_size_sane", "images/tiny.png (2 px width, row 1)"),
    (_parent_escape, "image_inside_root", "../escape.png (row 1)"),
    (_dot_dot_inside_root, "image_inside_root", "images/../images/0.png (row 1)"),
    (_absolute_escape, "image_inside_root", "outside/x.png (row 1)"),
    (_empty_manifest, "not_empty", "0 rows"),
], ids=lambda value: getattr(value, "__name__", None))
def test_each_bad_manifest_fails_only_its_check(data, breakage, check, shown):
    root, forget, retain = data
    breakage(root, forget, retain)
    report = _validate(root, forget, retain)
    assert {r.expectation for r in report.failures} == {check}
    with pytest.raises(DataValidationError) as caught:
        report.raise_for_failure()
    message = str(caught.value)
    assert message.startswith(f"forget manifest {root / 'forget.jsonl'}: check {check} failed")
    assert shown in message and " — " in message and "\n" not in message
    assert caught.value.report is report


def test_unreadable_manifests_are_reported_with_the_line(data):
    root, forget, retain = data
    (root / "forget.jsonl").write_text(json.dumps(forget[0]) + "\n{not json\n")
    report = validate_request_data(root / "forget.jsonl", root / "absent.jsonl", CLASSES)
    failed = {r.manifest: r for r in report.failures}
    assert failed["forget"].expectation == failed["retain"].expectation == "manifest_readable"
    assert "line 2 is not valid JSON" in failed["forget"].unexpected_values[0]
    assert "No such file" in failed["retain"].unexpected_values[0]


def test_csv_manifest_reads_raw_rows_and_empty_cells_are_missing(data):
    root, forget, _ = data
    forget[1]["label"] = ""
    with (root / "forget.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(forget[0]))
        writer.writeheader()
        writer.writerows(forget)
    report = validate_manifest_file(root / "forget.csv", "forget", CLASSES)
    assert [(r.expectation, r.unexpected_values) for r in report.failures] == [("label_not_null", ["images/1.png (row 3)"])]


def test_missing_required_column_is_named(data):
    root, forget, _ = data
    for row in forget:
        del row["caption"]
    report = validate_manifest_file(_write(root / "forget.jsonl", forget), "forget", CLASSES)
    assert [(r.expectation, r.unexpected_values) for r in report.failures] == [("columns_present", ["missing: caption"])]


def test_parsed_records_are_checked_against_their_root(data):
    from unlearning.data import read_manifest

    root, forget, retain = data
    _png(root.parent / "escape.png")
    records = read_manifest(_write(root / "forget.jsonl", [*forget, {**forget[0], "image_path": "../escape.png"}]))
    report = validate_manifests(records, None, CLASSES, {"forget": root})
    assert [(r.expectation, r.unexpected_count) for r in report.failures] == [("image_inside_root", 1)]
    assert validate_manifests(records[:3], None, CLASSES, {"forget": root}).success


def test_s3_images_must_be_in_an_allowed_bucket_and_are_fetched_when_possible(data):
    root, forget, retain = data
    blobs = {"s3://erasure-data/img/a.png": (root / "images" / "0.png").read_bytes(), "s3://erasure-data/img/bad.png": b"junk"}
    rows = [{**forget[0], "image_path": uri} for uri in [*blobs, "s3://other-bucket/img/a.png"]]
    path = _write(root / "forget.jsonl", rows)

    without_fetch = validate_manifest_file(path, "forget", CLASSES, allowed_buckets=["erasure-data"])
    assert [(r.expectation, r.unexpected_values) for r in without_fetch.failures] == [
        ("image_inside_root", ["s3://other-bucket/img/a.png (row 3)"])]
    assert without_fetch.notes == ["forget: 2 S3 images were not opened (no fetch function); only their paths were checked"]

    fetched = validate_manifest_file(path, "forget", CLASSES, allowed_buckets=["erasure-data"], fetch=blobs.__getitem__)
    assert {r.expectation for r in fetched.failures} == {"image_inside_root", "image_decodes"}


def test_s3_manifest_resolves_relative_paths_under_its_prefix(data):
    root, forget, _ = data
    image = (root / "images" / "0.png").read_bytes()
    blobs = {"s3://erasure-data/req/forget.jsonl": json.dumps(forget[0]).encode(), "s3://erasure-data/req/images/0.png": image}
    report = validate_request_data("s3://erasure-data/req/forget.jsonl", None, CLASSES, ["erasure-data"], fetch=blobs.__getitem__)
    assert report.success, report.message()
    refused = validate_request_data("s3://erasure-data/req/forget.jsonl", None, CLASSES, ["elsewhere"], fetch=blobs.__getitem__)
    assert [r.expectation for r in refused.failures] == ["manifest_readable"]
    own_bucket = validate_request_data("s3://erasure-data/req/forget.jsonl", None, CLASSES, [], fetch=blobs.__getitem__)
    assert own_bucket.success, own_bucket.message()


def test_root_widens_the_allowed_folder_for_localised_manifests(data):
    root, forget, _ = data
    # As tasks.storage.fetch_manifest leaves it: images from another bucket beside the manifest's folder.
    other = root.parent / "other-bucket" / _png(root.parent / "other-bucket" / "a.png")
    path = _write(root / "forget.jsonl", [*forget, {**forget[0], "image_path": str(other)}])
    assert [r.expectation for r in validate_manifest_file(path, "forget", CLASSES).failures] == ["image_inside_root"]
    assert validate_manifest_file(path, "forget", CLASSES, root=root.parent).success


def test_required_columns_match_the_loader():
    from unlearning.data import REQUIRED_COLUMNS as LOADER_COLUMNS

    assert REQUIRED_COLUMNS == LOADER_COLUMNS


def test_forget_rows_must_be_images_of_a_class_target(data):
    root, forget, retain = data
    forget[1]["label"] = "square"
    report = validate_request_data(_write(root / "forget.jsonl", forget), None, CLASSES, target=CIRCLE)
    assert [(r.expectation, r.unexpected_count) for r in report.failures] == [("forget_row_in_target", 1)]
    message = report.message()
    assert 'images/1.png (labelled "square", row 2)' in message and "list only images of the target 'circle'" in message
    assert validate_request_data(_write(root / "forget.jsonl", forget), None, CLASSES).success  # no target, no such check


@pytest.mark.parametrize("csv_format", [False, True], ids=["jsonl", "csv"])
def test_forget_rows_must_be_images_of_a_subgroup_target(data, csv_format):
    root, forget, _ = data
    target = ForgetTarget(kind="subgroup", class_name="circle", attribute="colour", value="red")
    colours = ["red", "blue", None]  # the last row has no colour at all
    if csv_format:
        rows = [{**row, "colour": colour or ""} for row, colour in zip(forget, colours)]
        path = root / "forget.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        shown = ['images/1.png (colour "blue", row 3)', 'images/2.png (colour "", row 4)']
    else:
        rows = [{**row, **({"attributes": {"colour": colour}} if colour else {})} for row, colour in zip(forget, colours)]
        path = _write(root / "forget.jsonl", rows)
        shown = ['images/1.png (colour "blue", row 2)', "images/2.png (no colour attribute, row 3)"]
    report = validate_request_data(path, None, CLASSES, target=target)
    assert [(r.expectation, r.unexpected_values) for r in report.failures] == [("forget_row_in_target", shown)]
    assert "label 'circle' and colour 'red'" in report.message()


def test_retain_rows_must_not_be_images_of_forgotten_targets(data):
    root, forget, retain = data
    retain[0]["label"] = "circle"
    square = ForgetTarget(kind="class", class_name="square")
    report = validate_request_data(_write(root / "forget.jsonl", forget), _write(root / "retain.jsonl", retain), CLASSES,
                                   target=CIRCLE, erased=[square])
    failed = {r.expectation: r for r in report.failures}
    assert set(failed) == {"retain_row_not_forgotten"} and failed["retain_row_not_forgotten"].unexpected_count == 3
    assert failed["retain_row_not_forgotten"].unexpected_values == [
        "images/3.png (an image of the target 'circle', row 1)", "images/4.png (an image of 'square', erased before, row 2)",
        "images/5.png (an image of 'square', erased before, row 3)"]
