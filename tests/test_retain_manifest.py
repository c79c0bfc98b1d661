"""A requester's retain manifest means what it says, the class set comes from the reference data,
and every method's data needs are checked before any work, in words that name the request field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from tasks.unlearn import plan_methods
from unlearning.erasure_data import build_unlearning_data, unknown_target
from unlearning.methods import unmet_needs
from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData
from unlearning.methods.lipschitz import LipschitzConfig

CIRCLE = ForgetTarget(kind="class", class_name="circle")
RED_CIRCLE = ForgetTarget(kind="subgroup", class_name="circle", attribute="colour", value="red")
PAIRS = ForgetTarget(kind="association", captions=["a photo of a red circle"])


def test_every_retain_row_is_retain_data_whatever_its_split(small_records):
    reference = small_records["train"][:400] + small_records["val"]
    retain = [dataclasses.replace(r, split=split) for r, split in
              zip([r for r in small_records["test"] if r.label != "circle"][:30], ["val", "test", "whatever"] * 10)]
    data = build_unlearning_data(CIRCLE, reference, 32, retain_records=retain)
    assert len(data.retain) == len(retain)
    assert sorted(data.retain.texts) == sorted(r.caption for r in retain)
    # the class set is the reference data's, not the retain manifest's (which rightly has no circle)
    assert data.classnames == sorted({r.label for r in reference}) and data.classnames[data.forget_index] == "circle"
    assert unmet_needs("cliperase", CIRCLE, data) == []


def test_unknown_target_names_what_the_reference_data_knows(small_records):
    reference = small_records["val"]
    assert unknown_target(CIRCLE, reference) is None and unknown_target(RED_CIRCLE, reference) is None
    assert unknown_target(PAIRS, reference) is None  # pairs come from the forget manifest
    dragon = unknown_target(ForgetTarget(kind="class", class_name="dragon"), reference)
    assert dragon.startswith("target.class_name: 'dragon'") and "circle, " in dragon and "square" in dragon
    teal = unknown_target(RED_CIRCLE.model_copy(update={"value": "teal"}), reference)
    assert teal.startswith("target.value:") and "'teal'" in teal and "red" in teal and "purple" in teal
    texture = unknown_target(RED_CIRCLE.model_copy(update={"attribute": "texture"}), reference)
    assert texture.startswith("target.attribute:") and "colour" in texture


def _images(n: int, label: int = 0) -> LabelledImages | None:
    return LabelledImages(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), ["a caption"] * n, torch.full((n,), label)) if n else None


def _data(forget: int = 4, retain: int = 4, forget_val: int = 0, forget_index: int | None = 0) -> UnlearningData:
    return UnlearningData(["circle", "square"], forget_index, _images(forget), _images(retain, 1), _images(forget_val))


@pytest.mark.parametrize("method, target, data, field, fix", [
    ("cliperase", CIRCLE, _data(retain=0), "retain_manifest:", '"method": "auto"'),
    ("graddiff", CIRCLE, _data(forget=0), "forget_manifest:", '"method": "auto"'),
    ("three_stage", RED_CIRCLE, _data(forget_index=None), "target:", "name a class"),
    ("lipschitz", PAIRS, _data(), "method:", "cliperase"),
    ("graddiff", PAIRS, _data(retain=0), "retain_manifest:", '"method": "gradient_ascent"'),
], ids=["no_retain", "no_forget", "target_not_a_class", "wrong_kind", "no_retain_for_pairs"])
def test_named_method_without_its_data_fails_up_front_naming_the_field(method, target, data, field, fix):
    with pytest.raises(ValueError) as caught:
        plan_methods(method, target, data)
    message = str(caught.value)
    assert message.startswith(field) and " — " in message and fix in message and "data." not in message


def test_config_dependent_needs_are_checked_up_front():
    config = {"stop_set": "forget_val"}
    with pytest.raises(ValueError, match="^method_config.stop_set:"):
        plan_methods("lipschitz", CIRCLE, _data(), lambda name: config)
    assert plan_methods("lipschitz", CIRCLE, _data(forget_val=2), lambda name: config) == ["lipschitz"]
    with pytest.raises(ValidationError, match="use_real_forget"):
        LipschitzConfig(use_real_forget=True)  # the heldout stop set is synthetic: refused before any run


def test_auto_skips_what_cannot_run_and_never_falls_back_to_a_method_that_would_die():
    assert plan_methods("auto", CIRCLE, _data()) == ["cliperase", "three_stage", "lipschitz"]
    assert plan_methods("auto", CIRCLE, _data(retain=0)) == ["lipschitz"]
    assert plan_methods("auto", RED_CIRCLE, _data(forget=0, retain=0)) == ["lipschitz"]
    with pytest.raises(ValueError, match="^target: 'red circle' is not among the model's classes"):
        plan_methods("auto", RED_CIRCLE, _data(forget_index=None))
    with pytest.raises(ValueError, match="^forget_manifest: every method \"auto\" picks for association targets"):
        plan_methods("auto", PAIRS, _data(forget=0))
    with pytest.raises(ValueError, match="retain_manifest: .*\"method\": \"gradient_ascent\""):
        plan_methods("auto", PAIRS, _data(retain=0))


def test_library_refuses_the_same_needs_when_called_directly():
    from unlearning.methods import run_method

    assert unmet_needs("cliperase", CIRCLE, _data(forget=0, retain=0)) == ["forget", "retain"]
    assert unmet_needs("lipschitz", CIRCLE, _data(forget_index=None)) == ["forget_index"]
    with pytest.raises(ValueError, match="needs data.retain"):
        run_method("finetune", None, None, CIRCLE, _data(retain=0))


@pytest.mark.usefixtures("prefect_harness")
def test_erasure_with_a_retain_manifest_of_val_and_test_rows_uses_every_row(store, small_records, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from flows.erasure import erasure_flow
    from tasks.settings import get_settings
    from unlearning.data import write_manifest

    world = tmp_path / "world"
    (world / "images").mkdir(parents=True)

    def copied(records):
        out = []
        for r in records:
            shutil.copy(r.image_path, world / "images" / f"{r.split}-{Path(r.image_path).name}")
            out.append(dataclasses.replace(r, image_path=str(world / "images" / f"{r.split}-{Path(r.image_path).name}")))
        return out

    reference = copied(small_records["train"][:300] + small_records["val"][:48] + small_records["test"][:96])
    monkeypatch.setenv("ERASURE_REFERENCE_MANIFEST", str(write_manifest(reference, world / "manifest.jsonl")))
    get_settings.cache_clear()
    # The manifests: retain rows in splits val and test only, and no image of the target among them.
    retain = [r for r in reference if r.split in ("val", "test") and r.label != "circle"][:40]
    report = erasure_flow({"request_id": "own-retain", "requester": "test", "target": {"kind": "class", "class_name": "circle"},
                           "retain_manifest": str(write_manifest(retain, world / "retain.jsonl")), "method": "auto",
                           "method_config": {"max_steps": 2}, "time_budget_s": 0.001, "dry_run": True})
    assert report.status == "dry_run"
    assert report.attempts == ["cliperase"]  # auto's first choice, which needs retain data: it has it
    assert report.data["own-retain"]["retain_source"] == "retain_manifest" and report.data["own-retain"]["retain_images"] == len(retain)
    assert "circle" in report.per_class_before  # the class set is the reference data's
