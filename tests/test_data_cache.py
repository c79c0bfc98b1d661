"""A repeat request on unchanged data reuses the decoded images and the GX validation; any change
to an image's bytes or to a manifest is seen, and a broken cache file is recomputed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest
import torch
from prefect.logging import disable_run_logger

from tasks.data import cache_folder, prepare_data
from tasks.request import ErasureRequest
from tasks.validation import DataValidationError, cached_validate_request_data
from unlearning.data import Record, load_images, read_manifest, write_manifest
from unlearning.image_cache import ImageCache, cached_load_images
from unlearning.target import ForgetTarget

CIRCLE = ForgetTarget(kind="class", class_name="circle")


def copied_images(records: list[Record], folder: Path) -> list[Record]:
    """The records with their images copied into ``folder`` (so a test may rewrite them)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    copies = []
    for r in records:
        target = folder / "images" / Path(r.image_path).name
        shutil.copy(r.image_path, target)
        copies.append(Record(str(target), r.label, r.caption, r.split, r.attributes))
    return copies


def rewrite_keeping_stat(path: str, source: str) -> None:
    """Put another image's pixels into ``path``, padded to the same size, with its mtime restored:
    a cache keyed on size and mtime would not notice."""
    before = os.stat(path)
    data = Path(source).read_bytes()
    assert data != Path(path).read_bytes()
    pad = before.st_size - len(data)
    assert pad >= 0, "pick a smaller source image"
    Path(path).write_bytes(data + b"\0" * pad)  # PNG readers ignore bytes after IEND
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns


def smallest_and_largest(records: list[Record]) -> tuple[Record, Record]:
    by_size = sorted(records, key=lambda r: os.path.getsize(r.image_path))
    return by_size[0], by_size[-1]


def test_image_cache_hits_on_unchanged_bytes_and_misses_on_changed_ones(small_records, tmp_path):
    records = copied_images(small_records["test"][:24], tmp_path / "data")
    cache = ImageCache(tmp_path / "cache")
    first = cache.load(records, 32)
    assert (cache.hits, cache.misses) == (0, 1)
    again = cache.load(records, 32)
    assert (cache.hits, cache.misses) == (1, 1) and cache.outcome == "partial"
    assert again.dtype == torch.uint8 and torch.equal(again, first) and torch.equal(first, load_images(records, 32))
    # another size or order is another tensor
    assert not torch.equal(cache.load(records[::-1], 32), first) and cache.misses == 2
    assert cache.load(records, 16).shape[-1] == 16 and cache.misses == 3

    small, large = smallest_and_largest(records)
    rewrite_keeping_stat(large.image_path, small.image_path)
    changed = cache.load(records, 32)
    assert cache.misses == 4, "a rewritten image with its size and mtime restored must not hit"
    assert torch.equal(changed, load_images(records, 32)) and not torch.equal(changed, first)
    position = records.index(large)
    assert torch.equal(changed[position], changed[records.index(small)])


def test_a_corrupt_or_truncated_cache_file_is_recomputed(small_records, tmp_path):
    records = small_records["val"][:16]
    cache = ImageCache(tmp_path / "cache")
    expected = cache.load(records, 32)
    (stored,) = (tmp_path / "cache").glob("*.safetensors")
    for damage in (lambda data: data[: len(data) // 2], lambda data: b"\xff" * len(data), lambda data: b""):
        stored.write_bytes(damage(stored.read_bytes()) if stored.stat().st_size else b"junk")
        misses = cache.misses
        assert torch.equal(cache.load(records, 32), expected) and cache.misses == misses + 1
        assert torch.equal(cache.load(records, 32), expected) and cache.misses == misses + 1, "rewritten whole"
    assert not list((tmp_path / "cache").glob("*.tmp")), "no temporary file left behind"


def test_the_cache_keeps_only_the_most_recently_used_files(small_records, tmp_path):
    cache = ImageCache(tmp_path / "cache", max_files=2)
    sets = [small_records["test"][i * 4:(i + 1) * 4] for i in range(3)]
    cache.load(sets[0], 32)
    time.sleep(0.02)
    cache.load(sets[1], 32)
    time.sleep(0.02)
    cache.load(sets[0], 32)  # a hit: now the most recently used
    time.sleep(0.02)
    cache.load(sets[2], 32)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    hits = cache.hits
    cache.load(sets[0], 32)
    assert cache.hits == hits + 1, "the recently used set survived"
    cache.load(sets[1], 32)
    assert cache.hits == hits + 1, "the least recently used set was pruned"
    assert torch.equal(cached_load_images(sets[1], 32, None), load_images(sets[1], 32))


def test_a_cached_validation_failure_fails_the_same_way_and_a_change_revalidates(small_records, tmp_path):
    circles = copied_images([r for r in small_records["val"] if r.label == "circle"][:5], tmp_path / "forget")
    manifest = tmp_path / "forget" / "manifest.jsonl"
    rows = [Record(r.image_path, r.label, r.caption, "forget", r.attributes) for r in circles]
    write_manifest([*rows[:4], Record(rows[4].image_path, "square", rows[4].caption, "forget", rows[4].attributes)], manifest)
    classes = sorted({r.label for r in small_records["val"]})
    folder = tmp_path / "cache"

    def validate():
        return cached_validate_request_data(manifest, None, classes, (), folder, target=CIRCLE)

    report, outcome = validate()
    assert outcome == "miss" and not report.success
    with pytest.raises(DataValidationError) as first:
        report.raise_for_failure()
    report, outcome = validate()
    assert outcome == "hit" and not report.success and report.to_dict()["results"] == first.value.report.to_dict()["results"]
    with pytest.raises(DataValidationError) as again:
        report.raise_for_failure()
    assert str(again.value) == str(first.value) and "forget_row_in_target" in str(again.value)

    # another target is another validation
    assert cached_validate_request_data(manifest, None, classes, (), folder, target=CIRCLE.model_copy(update={"class_name": "square"}))[1] == "miss"
    # the manifest fixed: validated again, and it passes
    write_manifest(rows, manifest)
    report, outcome = validate()
    assert outcome == "miss" and report.success
    assert validate()[1] == "hit"
    # an image's bytes broken with its size and mtime restored: validated again, and it fails
    broken = rows[2].image_path
    stat = os.stat(broken)
    Path(broken).write_bytes(b"\0" * stat.st_size)
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report, outcome = validate()
    assert outcome == "miss" and [r.expectation for r in report.failures] == ["image_decodes"]
    # a garbled cache file is validated again
    for stored in folder.glob("*.json"):
        stored.write_text("{not json")
    assert validate()[1] == "miss"


@pytest.fixture
def settings(mlflow_store, small_world, monkeypatch):
    """A fresh home and tracking store with the small world as the reference data (no champion: prepare_data needs none)."""
    from tasks.settings import get_settings

    from tasks.registry import configure_mlflow

    monkeypatch.setenv("ERASURE_REFERENCE_MANIFEST", str(small_world))
    get_settings.cache_clear()
    configure_mlflow(get_settings())  # this store's experiment, not one an earlier test left active
    yield get_settings()
    get_settings.cache_clear()


def test_a_repeat_prepare_is_a_cache_hit_with_identical_data(settings, small_world, small_records, tmp_path):
    circles = copied_images([r for r in small_records["val"] if r.label == "circle"][:6], tmp_path / "forget")
    manifest = write_manifest([Record(r.image_path, r.label, r.caption, "forget", r.attributes) for r in circles],
                              tmp_path / "forget" / "manifest.jsonl")
    request = ErasureRequest(request_id="cache-1", requester="test", target={"kind": "class", "class_name": "circle"},
                             forget_manifest=str(manifest))

    def prepare():
        started = time.perf_counter()
        with disable_run_logger(), mlflow.start_run():
            data = prepare_data.fn(request, settings, 32, [])
        return data, time.perf_counter() - started

    first, first_s = prepare()
    again, again_s = prepare()
    print(f"\nprepare_data on the small world ({len(read_manifest(small_world))} rows): first {first_s:.2f} s, repeat {again_s:.2f} s")
    assert first.summary["cache"] == {"images": "miss", "validation": "miss"}
    assert again.summary["cache"] == {"images": "hit", "validation": "hit"}
    for name in ("forget", "retain", "forget_val", "retain_val"):
        one, two = getattr(first.unlearning, name), getattr(again.unlearning, name)
        assert (one is None) == (two is None)
        if one is not None:
            assert torch.equal(one.images, two.images) and one.texts == two.texts and torch.equal(one.labels, two.labels)
    assert torch.equal(first.eval_set.images, again.eval_set.images) and first.validation.success and again.validation.success
    assert list(cache_folder(settings, "images").glob("*.safetensors")) and list(cache_folder(settings, "validation").glob("*.json"))

    # one forget row fewer: the forget images and the validation are new, the rest still hit
    write_manifest([Record(r.image_path, r.label, r.caption, "forget", r.attributes) for r in circles[:5]], manifest)
    changed, _ = prepare()
    assert changed.summary["cache"] == {"images": "partial", "validation": "miss"} and len(changed.unlearning.forget) == 5
