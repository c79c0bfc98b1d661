"""A repeat request on unchanged data reuses the decoded images and the GX validation; any change
to an image's bytes or to a manifest is seen, and a broken cache file is recomputed."""

from __future__ import annotations

import hashlib
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
from unlearning.erasure_data import _spread
from unlearning.image_cache import COMPACT_AT, ImageCache, cached_load_images, cached_read_manifest
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


def shards_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_image_cache_hits_any_subset_of_decoded_bytes_and_misses_changed_ones(small_records, tmp_path):
    records = copied_images(small_records["test"][:24], tmp_path / "data")
    cache = ImageCache(tmp_path / "cache")
    first = cache.load(records, 32)
    assert (cache.hits, cache.misses, cache.outcome) == (0, 24, "miss")
    assert first.dtype == torch.uint8 and torch.equal(first, load_images(records, 32))
    # a subset in another order, with a repeat, listed under other paths: every image is a hit
    elsewhere = copied_images(records[3:9], tmp_path / "elsewhere")
    subset = [records[20], *elsewhere[::-1], records[20]]
    fresh = ImageCache(tmp_path / "cache")  # another process: only the files carry over
    assert torch.equal(fresh.load(subset, 32), load_images(subset, 32)) and (fresh.hits, fresh.misses, fresh.outcome) == (8, 0, "hit")
    assert len(shards_in(tmp_path / "cache")) == 1, "a hit writes nothing"
    assert fresh.load(records[:4], 16).shape[-1] == 16 and fresh.misses == 4, "another size is another image"

    small, large = smallest_and_largest(records)
    rewrite_keeping_stat(large.image_path, small.image_path)
    changed = ImageCache(tmp_path / "cache")
    pixels = changed.load(records, 32)
    assert (changed.hits, changed.misses) == (23, 1), "a rewritten image with its size and mtime restored must not hit"
    assert torch.equal(pixels, load_images(records, 32)) and not torch.equal(pixels, first)
    assert torch.equal(pixels[records.index(large)], pixels[records.index(small)])


def test_forgotten_images_leave_every_shard_and_the_others_stay_cached(small_records, tmp_path):
    records = small_records["test"][:24]
    cache = ImageCache(tmp_path / "cache", shard_bytes=8 * 3 * 32 * 32)  # 8 images a shard: the forgotten ones span two
    expected = cache.load(records, 32)
    cache.load(records[:6], 16)
    erased = [records[5], records[6], records[0]]
    digests = {hashlib.blake2b(Path(r.image_path).read_bytes(), digest_size=16).digest() for r in erased}
    assert ImageCache(tmp_path / "cache").forget(digests) == 5  # 3 at 32 px, 2 at 16 px

    stored = b"".join(p.read_bytes() for p in shards_in(tmp_path / "cache"))
    assert not any(d in stored for d in digests), "no shard lists a forgotten image"
    pixels = {r.image_path: expected[i] for i, r in enumerate(records)}
    own = [r for r in erased if sum(torch.equal(pixels[r.image_path], other) for other in expected) == 1]  # no kept twin
    assert own and not any(pixels[r.image_path].numpy().tobytes() in stored for r in own), "nor holds its pixels"
    kept = [r for r in records if r not in erased]
    after = ImageCache(tmp_path / "cache")
    assert torch.equal(after.load(kept, 32), torch.stack([pixels[r.image_path] for r in kept])) and after.outcome == "hit"
    again = ImageCache(tmp_path / "cache")
    assert torch.equal(again.load(erased, 32), load_images(erased, 32)) and again.misses == 3, "decoded again only if asked for"


def test_a_corrupt_or_truncated_shard_is_recomputed(small_records, tmp_path):
    records = small_records["val"][:16]
    expected = ImageCache(tmp_path / "cache").load(records, 32)
    for damage in (lambda data: data[: len(data) // 2], lambda data: b"\xff" * len(data), lambda data: b""):
        (stored,) = shards_in(tmp_path / "cache")
        stored.write_bytes(damage(stored.read_bytes()))
        cache = ImageCache(tmp_path / "cache")
        assert torch.equal(cache.load(records, 32), expected) and cache.misses == 16
        assert not stored.exists(), "the damaged shard is deleted"
        again = ImageCache(tmp_path / "cache")
        assert torch.equal(again.load(records, 32), expected) and again.outcome == "hit", "rewritten whole"
    assert not list((tmp_path / "cache").glob("*.tmp")), "no temporary file left behind"


def test_the_cache_keeps_only_the_most_recently_used_shards(small_records, tmp_path):
    cache = ImageCache(tmp_path / "cache", max_files=2)
    sets = [small_records["test"][i * 4:(i + 1) * 4] for i in range(3)]
    cache.load(sets[0], 32)
    time.sleep(0.02)
    cache.load(sets[1], 32)
    time.sleep(0.02)
    ImageCache(tmp_path / "cache", max_files=2).load(sets[0], 32)  # a hit: now the most recently used
    time.sleep(0.02)
    cache.load(sets[2], 32)
    assert len(shards_in(tmp_path / "cache")) == 2
    survivor, pruned = ImageCache(tmp_path / "cache"), ImageCache(tmp_path / "cache")
    survivor.load(sets[0], 32)
    assert survivor.outcome == "hit", "the recently used shard survived"
    pruned.load(sets[1], 32)
    assert pruned.outcome == "miss", "the least recently used shard was pruned"
    assert torch.equal(cached_load_images(sets[1], 32, None), load_images(sets[1], 32))


def test_many_small_shards_are_merged_and_still_hit(small_records, tmp_path):
    records = small_records["test"][:2 * (COMPACT_AT + 1)]
    for start in range(0, len(records), 2):  # one shard per load, as each request's misses make
        ImageCache(tmp_path / "cache").load(records[start:start + 2], 32)
    assert len(shards_in(tmp_path / "cache")) < COMPACT_AT
    cache = ImageCache(tmp_path / "cache")
    assert torch.equal(cache.load(records[::-1], 32), load_images(records[::-1], 32)) and cache.outcome == "hit"


def test_a_parsed_manifest_is_reused_until_its_bytes_or_folder_change(small_records, tmp_path):
    rows = [*small_records["val"][:20], Record("images/extra.png", "circle", "a circle", "val", {"colour": "red"}),
            Record("images/bare.png", "square", "a square", "")]
    manifest = write_manifest(rows, tmp_path / "data" / "manifest.jsonl")
    folder = tmp_path / "cache"

    def read(path=manifest):
        records, sha256, outcome = cached_read_manifest(path, folder)
        assert sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return [(r.image_path, r.label, r.caption, r.split, r.attributes) for r in records], outcome

    def parsed(path=manifest):
        return [(r.image_path, r.label, r.caption, r.split, r.attributes) for r in read_manifest(path)]

    assert read() == (parsed(), "miss")
    assert read() == (parsed(), "hit"), "the same records, attributes of every kind of row included"
    write_manifest([*rows[:5], Record(rows[5].image_path, "square", rows[5].caption, rows[5].split, rows[5].attributes), *rows[6:]], manifest)
    assert read() == (parsed(), "miss") and read()[0][5][1] == "square", "a changed manifest is parsed again"
    moved = tmp_path / "moved" / "manifest.jsonl"
    moved.parent.mkdir()
    shutil.copy(manifest, moved)
    assert read(moved) == (parsed(moved), "miss"), "the same bytes in another folder name other images"
    for stored in folder.glob("manifest-*.json"):
        stored.write_text('{"key": "garbled"')
    assert read() == (parsed(), "miss") and read()[1] == "hit"


def test_a_sample_keeps_its_rows_when_its_pool_shrinks(small_records):
    pool = small_records["train"]
    sample = _spread(pool, 500, seed=3)
    assert len(sample) == 500 and len({r.image_path for r in sample}) == 500
    assert {r.image_path for r in sample} != {r.image_path for r in _spread(pool, 500, seed=4)}, "the seed picks the sample"
    smaller = [r for r in pool if r.label != "circle"]
    kept = {r.image_path for r in sample if r.label != "circle"}
    assert kept <= {r.image_path for r in _spread(smaller, 500, seed=3)}, "rows still in the pool stay sampled"
    assert len(_spread(pool[:10], 500, seed=3)) == 10
    moved = [Record("/elsewhere/" + "/".join(r.image_path.rsplit("/", 2)[-2:]), r.label, r.caption, r.split, r.attributes) for r in pool]
    tails = [r.image_path.rsplit("/", 2)[-2:] for r in sample]
    assert [r.image_path.rsplit("/", 2)[-2:] for r in _spread(moved, 500, seed=3)] == tails, "the same data elsewhere: the same sample"


def test_a_rank_computed_once_gives_the_sample_a_fresh_hash_would():
    import hashlib

    rows = [Record(f"/data/{i % 7}/img{i}.png", "circle", f"a photo of circle {i}", "train") for i in range(300)]
    sample = _spread(rows, 40, seed=11)
    by_hash = sorted(rows, key=lambda r: hashlib.blake2b(f"11\0{'/'.join(r.image_path.rsplit('/', 2)[-2:])}\0{r.caption}".encode(),
                                                         digest_size=8).digest())[:40]
    assert sample == by_hash and _spread(list(reversed(rows)), 40, seed=11) == by_hash  # the order of the pool does not matter


def test_one_update_builds_an_evaluation_set_once_and_sees_a_changed_image(small_records, tmp_path):
    from tasks.data import eval_set_of, shared_eval_sets

    rows = copied_images(small_records["test"][:24], tmp_path)
    assert eval_set_of(rows, 32) is not eval_set_of(rows, 32), "outside one update every call builds anew"
    with shared_eval_sets():
        first = eval_set_of(rows, 32)
        assert eval_set_of(list(rows), 32) is first
        assert eval_set_of(rows[:12], 32) is not first and eval_set_of(rows, 32, "paraphrase") is not first
        Path(rows[0].image_path).write_bytes(Path(rows[1].image_path).read_bytes())
        changed = eval_set_of(rows, 32)
        assert changed is not first and torch.equal(changed.images[0], changed.images[1])


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
    # "partial": the forget images are copies of reference val images, decoded once for both sets
    assert first.summary["cache"] == {"images": "partial", "validation": "miss", "reference_manifest": "miss"}
    assert again.summary["cache"] == {"images": "hit", "validation": "hit", "reference_manifest": "hit"}
    for name in ("forget", "retain", "forget_val", "retain_val"):
        one, two = getattr(first.unlearning, name), getattr(again.unlearning, name)
        assert (one is None) == (two is None)
        if one is not None:
            assert torch.equal(one.images, two.images) and one.texts == two.texts and torch.equal(one.labels, two.labels)
    assert torch.equal(first.eval_set.images, again.eval_set.images) and first.validation.success and again.validation.success
    assert list(cache_folder(settings, "images").glob("*.safetensors")) and list(cache_folder(settings, "validation").glob("*.json"))

    # one forget row fewer: validated again, but every image was decoded before
    write_manifest([Record(r.image_path, r.label, r.caption, "forget", r.attributes) for r in circles[:5]], manifest)
    fewer, _ = prepare()
    assert fewer.summary["cache"] == {"images": "hit", "validation": "miss", "reference_manifest": "hit"} and len(fewer.unlearning.forget) == 5
    # one forget image rewritten: it alone is decoded again
    small, large = smallest_and_largest(circles[:5])
    rewrite_keeping_stat(large.image_path, small.image_path)
    changed, _ = prepare()
    assert changed.summary["cache"] == {"images": "partial", "validation": "miss", "reference_manifest": "hit"}
    assert torch.equal(changed.unlearning.forget.images, load_images(circles[:5], 32))


@pytest.mark.usefixtures("prefect_harness")
def test_a_promoted_erasure_leaves_no_decoded_copy_of_the_requesters_images(store, small_records, tmp_path):
    from flows.erasure import erasure_flow
    from mlflow import MlflowClient
    from tests.test_lifecycle import QUICK, request

    # The person's photos: copies of train circles (their own files, as a data subject sends them).
    own = copied_images([r for r in small_records["train"] if r.label == "circle"][:6], tmp_path / "person")
    forget = write_manifest(own, tmp_path / "person" / "forget.jsonl")
    digests = {hashlib.blake2b(Path(r.image_path).read_bytes(), digest_size=16).digest() for r in own}
    cached = cache_folder(store, "images")

    outcome = erasure_flow(request("req-own-photos", "circle", forget_manifest=str(forget), **QUICK))
    assert outcome.status == "promoted", outcome
    stored = b"".join(p.read_bytes() for p in cached.glob("*.safetensors"))
    assert stored and not any(d in stored for d in digests), "a cached shard still lists one of the person's images"
    record = json.load(open(MlflowClient().download_artifacts(outcome.mlflow_run_id, "certificate/image-cache-forgotten.json")))
    assert record["forget_images"] == 6 and record["decoded_copies_removed"] >= 6
