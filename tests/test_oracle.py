"""The retrain oracle: the champion's recipe on the reference data without the target, cached."""

from __future__ import annotations

import json

import pytest

from unlearning.data import read_manifest
from unlearning.models import load_model
from unlearning.oracle import (TrainingRecipe, cached_oracle, oracle_folder, read_recipe, train_oracle, without_targets,
                               write_recipe)
from unlearning.target import ForgetTarget
from unlearning.train import TrainConfig
from unlearning.world import WorldSpec, generate_world

CIRCLE = ForgetTarget(kind="class", class_name="circle")
TINY = TrainingRecipe(train=TrainConfig(steps=6, batch_size=32, warmup_steps=2, precision="fp32"))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("oracle-world"), WorldSpec(n_train=400, val_per_subgroup=1, test_per_subgroup=1, seed=3),
                          progress=False)


def test_the_oracle_never_sees_the_target_and_is_trained_once(tiny_world, tmp_path):
    records = read_manifest(tiny_world)
    kept = without_targets(records, [CIRCLE])
    circles = [r for r in records if r.split == "train" and r.label == "circle"]
    assert circles and not [r for r in kept if r.label == "circle"]
    assert len(kept) == len([r for r in records if r.split == "train"]) - len(circles)

    assert cached_oracle(tmp_path, TINY, tiny_world, [CIRCLE]) is None
    folder = train_oracle(tiny_world, [CIRCLE], TINY, tmp_path, progress=False)
    made = json.loads((folder / "oracle.json").read_text())
    assert made["left_out"] == len(circles) and made["train_images"] == len(kept)
    assert read_recipe(folder) == TINY
    load_model(f"local-dir:{folder}")  # a plain open_clip folder

    before = (folder / "open_clip_model.safetensors").stat().st_mtime_ns
    assert train_oracle(tiny_world, [CIRCLE], TINY, tmp_path, progress=False) == folder  # cached: not trained again
    assert (folder / "open_clip_model.safetensors").stat().st_mtime_ns == before
    assert cached_oracle(tmp_path, TINY, tiny_world, [CIRCLE]) == folder


def test_the_cache_key_follows_recipe_target_and_data(tiny_world, tmp_path):
    square = ForgetTarget(kind="class", class_name="square")
    other_seed = TINY.model_copy(update={"train": TINY.train.model_copy(update={"seed": 1})})
    folders = {oracle_folder(tmp_path, TINY, tiny_world, [CIRCLE]), oracle_folder(tmp_path, TINY, tiny_world, [square]),
               oracle_folder(tmp_path, other_seed, tiny_world, [CIRCLE])}
    assert len(folders) == 3
    changed = tmp_path / "manifest.jsonl"
    changed.write_text(tiny_world.read_text() + "\n")
    assert oracle_folder(tmp_path, TINY, changed, [CIRCLE]) != oracle_folder(tmp_path, TINY, tiny_world, [CIRCLE])


def test_an_oracle_needs_a_target_that_names_train_images(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="targets"):
        train_oracle(tiny_world, [], TINY, tmp_path)
    with pytest.raises(ValueError, match="dragon"):
        train_oracle(tiny_world, [ForgetTarget(kind="class", class_name="dragon")], TINY, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_a_recipe_is_stored_beside_the_weights(tmp_path):
    model, stranger = tmp_path / "model", tmp_path / "stranger"
    for folder in (model, stranger):
        folder.mkdir()
    write_recipe(model, TINY)
    assert read_recipe(model) == TINY
    assert read_recipe(stranger) is None  # a model trained elsewhere


def test_the_pipeline_finds_the_oracle_of_its_champion(tiny_world, tmp_path):
    from tasks.depth import find_oracle
    from tasks.settings import ErasureSettings

    settings = ErasureSettings(home=tmp_path / "home", reference_manifest=tiny_world, oracle_dir=tmp_path / "oracles")
    assert find_oracle(settings, None, [CIRCLE]) is None  # a model trained elsewhere has no recipe
    assert find_oracle(settings, TINY, [CIRCLE]) is None  # none trained yet
    trained = train_oracle(tiny_world, [CIRCLE], TINY, settings.oracle_dir, progress=False)
    assert find_oracle(settings, TINY, [CIRCLE]) == trained
    assert find_oracle(settings, TINY, [CIRCLE, ForgetTarget(kind="class", class_name="square")]) is None  # carries more
