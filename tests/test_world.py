"""The shapes world: deterministic, consistent captions, balanced evaluation splits, one loader."""

import json
from collections import Counter

import numpy as np

from unlearning.data import load_images, read_manifest, write_manifest
from unlearning.world import COLOURS, SHAPES, SIZES, WorldSpec, generate_world, sample_record

TINY = WorldSpec(n_train=40, val_per_subgroup=1, test_per_subgroup=2, seed=3)


def test_same_seed_gives_same_pixels_and_captions():
    a_image, a_record = sample_record(TINY, "train", 17)
    b_image, b_record = sample_record(TINY, "train", 17)
    assert np.array_equal(np.asarray(a_image), np.asarray(b_image))
    assert a_record == b_record


def test_different_seed_or_index_gives_different_images():
    base = np.asarray(sample_record(TINY, "train", 0)[0])
    assert not np.array_equal(base, np.asarray(sample_record(TINY, "train", 1)[0]))
    other_seed = WorldSpec(**{**TINY.__dict__, "seed": 4})
    assert not np.array_equal(base, np.asarray(sample_record(other_seed, "train", 0)[0]))


def test_generated_world_is_reproducible_and_complete(tmp_path):
    first = generate_world(tmp_path / "a", TINY, progress=False)
    second = generate_world(tmp_path / "b", TINY, progress=False)
    rows_a = [json.loads(line) for line in first.read_text().splitlines()]
    rows_b = [json.loads(line) for line in second.read_text().splitlines()]
    assert rows_a == rows_b
    assert len(rows_a) == sum(TINY.split_size(s) for s in ("train", "val", "test"))
    for row_a in rows_a[:10]:
        assert (first.parent / row_a["image_path"]).read_bytes() == (second.parent / row_a["image_path"]).read_bytes()


def test_parallel_generation_writes_what_one_process_writes(tmp_path):
    spec = WorldSpec(n_train=50, val_per_subgroup=1, test_per_subgroup=1, seed=5)
    one = generate_world(tmp_path / "one", spec, progress=False, workers=1, chunk=16)
    two = generate_world(tmp_path / "two", spec, progress=False, workers=2, chunk=16)
    assert one.read_text() == two.read_text()
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    for row in rows[::7]:
        assert (one.parent / row["image_path"]).read_bytes() == (two.parent / row["image_path"]).read_bytes()


def test_captions_name_the_label_and_attributes(tmp_path):
    records = read_manifest(generate_world(tmp_path, TINY, progress=False))
    for r in records:
        assert r.label in SHAPES and r.label in r.caption
        assert r.attributes["shape"] == r.label
        assert r.attributes["colour"] in COLOURS and r.attributes["size"] in SIZES
        if r.split != "train":
            assert r.caption == f"a photo of a {r.attributes['size']} {r.attributes['colour']} {r.label}"
        else:
            assert not r.caption.startswith("a photo of")  # evaluation prompts never occur in training


def test_test_split_is_balanced_over_colour_and_shape(tmp_path):
    records = read_manifest(generate_world(tmp_path, TINY, progress=False), split="test")
    counts = Counter((r.label, r.attributes["colour"]) for r in records)
    assert set(counts.values()) == {TINY.test_per_subgroup}
    assert len(counts) == len(SHAPES) * len(COLOURS)


def test_default_world_has_enough_test_images_per_shape():
    spec = WorldSpec()
    assert spec.split_size("test") / len(SHAPES) >= 300


def test_manifest_round_trip_and_csv_reader(tmp_path):
    records = read_manifest(generate_world(tmp_path / "w", TINY, progress=False), split="val")
    copy = write_manifest(records, tmp_path / "w" / "copy.jsonl")
    assert read_manifest(copy) == records
    csv_path = tmp_path / "w" / "val.csv"
    lines = ["image_path,label,caption,split,colour"] + [
        f"{r.image_path},{r.label},{r.caption},{r.split},{r.attributes['colour']}" for r in records]
    csv_path.write_text("\n".join(lines) + "\n")
    from_csv = read_manifest(csv_path)
    assert [r.image_path for r in from_csv] == [r.image_path for r in records]
    assert from_csv[0].attributes == {"colour": records[0].attributes["colour"]}
    images = load_images(from_csv, 32)
    assert images.shape == (len(records), 3, 32, 32) and images.dtype.is_floating_point is False


def test_extra_shapes_add_balanced_classes_that_look_unlike_the_others(tmp_path):
    from unlearning.world import EXTRA_SHAPES, _draw_mask

    spec = WorldSpec(n_train=60, val_per_subgroup=1, test_per_subgroup=1, seed=3, extra_shapes=EXTRA_SHAPES)
    records = read_manifest(generate_world(tmp_path, spec, progress=False), split="test")
    counts = Counter((r.label, r.attributes["colour"]) for r in records)
    assert {label for label, _ in counts} == set(SHAPES) | set(EXTRA_SHAPES) and set(counts.values()) == {1}
    masks = {s: np.asarray(_draw_mask(s, (64, 64), 40, 0.0, 128)) > 0 for s in SHAPES + EXTRA_SHAPES}
    for shape in EXTRA_SHAPES:
        assert masks[shape].mean() > 0.05, shape
        closest = min((np.mean(masks[shape] != masks[o]), o) for o in masks if o != shape)
        assert closest[0] > 0.03, f"{shape} is nearly a {closest[1]}"


def test_unknown_extra_shape_is_refused_naming_the_field():
    import pytest

    with pytest.raises(ValueError, match="extra_shapes"):
        WorldSpec(extra_shapes=("hexagon",))


def test_a_world_written_before_extra_shapes_existed_is_reused(tmp_path):
    manifest = generate_world(tmp_path, TINY, progress=False)
    spec_file = tmp_path / "world_spec.json"
    old = json.loads(spec_file.read_text())
    del old["extra_shapes"]
    spec_file.write_text(json.dumps(old))
    stamp = manifest.stat().st_mtime_ns
    assert generate_world(tmp_path, TINY, progress=False) == manifest and manifest.stat().st_mtime_ns == stamp
