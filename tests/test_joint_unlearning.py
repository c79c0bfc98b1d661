"""Several forget targets in one unlearning update: the joint data, the methods' joint support, and
one CLIPErase run that forgets two classes on the small trained CLIP."""

from __future__ import annotations

import copy

import pytest
import torch

from unlearning.erasure_data import build_joint_unlearning_data, build_unlearning_data, joint_key
from unlearning.methods import ForgetTarget, run_method, unmet_needs
from unlearning.methods.base import supports_joint
from unlearning.methods.baselines import BudgetConfig, forget_batch, forget_check, retain_batch
from unlearning.methods.common import accuracy

CIRCLE = ForgetTarget(kind="class", class_name="circle")
SQUARE = ForgetTarget(kind="class", class_name="square")
RED_CIRCLE = ForgetTarget(kind="subgroup", class_name="circle", attribute="colour", value="red")
BLUE_SQUARE = ForgetTarget(kind="subgroup", class_name="square", attribute="colour", value="blue")
# As tests/test_cliperase.py: lr 1e-4 and a generous step ceiling, stopped by the stop rule.
FAST = {"max_steps": 300, "lr": 1e-4, "stop_forget_accuracy": 0.05, "stop_forget_recall": 0.05}


@pytest.fixture(scope="module")
def reference(small_records):
    return small_records["train"] + small_records["val"]


def _same_images(a, b) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert torch.equal(a.images, b.images) and a.texts == b.texts and torch.equal(a.labels, b.labels)


def _same_data(joint, single) -> None:
    assert joint.classnames == single.classnames and joint.templates == single.templates
    assert joint.forget_index == single.forget_index and joint.forget_indices == single.forget_indices
    for part in ("forget", "retain", "forget_val", "retain_val"):
        _same_images(getattr(joint, part), getattr(single, part))


def test_joint_data_holds_both_classes_to_forget_and_neither_to_keep(reference):
    data = build_joint_unlearning_data([CIRCLE, SQUARE], reference, 32, max_retain=512)

    circle, square = data.classnames.index("circle"), data.classnames.index("square")
    assert data.forget_indices == [circle, square] and data.forget_index == circle
    assert data.forget_targets == [CIRCLE, SQUARE]
    # Forget: each class's own images (as its single-target data samples them), each labelled its class.
    alone = [build_unlearning_data(t, reference, 32, max_retain=16) for t in (CIRCLE, SQUARE)]
    assert torch.equal(data.forget.images, torch.cat([d.forget.images for d in alone]))
    assert data.forget.labels.tolist() == [circle] * len(alone[0].forget) + [square] * len(alone[1].forget)
    assert set(data.forget_val.labels.tolist()) == {circle, square}
    for kept in (data.retain, data.retain_val):
        assert len(kept) and not set(kept.labels.tolist()) & {circle, square}
        assert not any(word in text.split() for text in kept.texts for word in ("circle", "square"))


def test_joint_forget_images_of_a_requester_leave_every_retain_and_stop_set(reference, small_records):
    val_circles = [r for r in small_records["val"] if r.label == "circle"]
    given = [val_circles[:2], None]  # the circle request brings two val images of its own, square uses the reference

    data = build_joint_unlearning_data([CIRCLE, SQUARE], reference, 32, forget_records=given, max_retain=512)

    circle, square = data.classnames.index("circle"), data.classnames.index("square")
    assert data.forget.labels.tolist().count(circle) == 2 and data.forget.labels.tolist().count(square) > 2
    assert set(data.forget.texts[:2]) <= {r.caption for r in val_circles[:2]}
    assert len(data.forget_val) == len([r for r in small_records["val"] if r.label in ("circle", "square")]) - 2
    with pytest.raises(ValueError, match="forget_records: 1 entries for 2 targets"):
        build_joint_unlearning_data([CIRCLE, SQUARE], reference, 32, forget_records=[None])


@pytest.mark.parametrize("target", [CIRCLE, RED_CIRCLE, ForgetTarget(kind="association", captions=["a picture of a circle"])],
                         ids=["class", "subgroup", "association"])
def test_one_target_gives_the_single_target_data(reference, target):
    single = build_unlearning_data(target, reference, 32, max_forget=64, max_retain=256, max_val=16, seed=3)

    joint = build_joint_unlearning_data([target], reference, 32, max_forget=64, max_retain=256, max_val=16, seed=3)

    _same_data(joint, single)
    assert joint.forget_targets == [target]
    # A repeated target is one target (a batch may name a class twice).
    _same_data(build_joint_unlearning_data([target, target], reference, 32, max_forget=64, max_retain=256, max_val=16, seed=3), single)


def test_one_target_with_requester_images_gives_the_single_target_data(reference, small_records):
    circles = [r for r in small_records["train"] if r.label == "circle"][:5] + [r for r in small_records["val"] if r.label == "circle"][:1]
    _same_data(build_joint_unlearning_data([CIRCLE], reference, 32, forget_records=[circles], max_retain=256),
               build_unlearning_data(CIRCLE, reference, 32, forget_records=circles, max_retain=256))


def test_targets_of_different_joint_keys_are_refused_by_name(reference):
    assert [joint_key(t) for t in (CIRCLE, RED_CIRCLE)] == ["class", "subgroup:colour"]
    with pytest.raises(ValueError, match=r"'circle' \(class\), 'red circle' \(subgroup:colour\) cannot be forgotten in one update"):
        build_joint_unlearning_data([CIRCLE, RED_CIRCLE], reference, 32)
    size = ForgetTarget(kind="subgroup", class_name="circle", attribute="size", value="small")
    with pytest.raises(ValueError, match="'small circle' \\(subgroup:size\\)"):
        build_joint_unlearning_data([RED_CIRCLE, size], reference, 32)
    with pytest.raises(ValueError, match="targets: empty"):
        build_joint_unlearning_data([], reference, 32)


def test_single_target_methods_refuse_joint_data(trained_bundle, reference):
    data = build_joint_unlearning_data([CIRCLE, SQUARE], reference, 32, max_retain=256)

    assert not supports_joint("three_stage", [CIRCLE, SQUARE]) and not supports_joint("lipschitz", [CIRCLE, SQUARE])
    assert supports_joint("three_stage", [CIRCLE, CIRCLE])  # one distinct target
    assert all(supports_joint(m, [CIRCLE, SQUARE]) for m in ("cliperase", "gradient_ascent", "graddiff", "finetune"))
    assert supports_joint("cliperase", [RED_CIRCLE, BLUE_SQUARE]) and not supports_joint("cliperase", [CIRCLE, RED_CIRCLE])
    assert "joint" in unmet_needs("three_stage", CIRCLE, data) and "joint" not in unmet_needs("cliperase", CIRCLE, data)
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    with pytest.raises(ValueError, match="forgets one class target per run.*'circle', 'square'"):
        run_method("three_stage", model, tokenizer, CIRCLE, data, original=copy.deepcopy(model))
    with pytest.raises(ValueError, match="not the first of data.forget_targets"):
        run_method("cliperase", model, tokenizer, SQUARE, data, original=copy.deepcopy(model))


def test_unmet_needs_names_an_unknown_target_or_one_without_forget_images(reference):
    dragon = ForgetTarget(kind="class", class_name="dragon")
    data = build_joint_unlearning_data([CIRCLE, dragon], reference, 32, max_retain=64)
    assert data.forget_index is None and "forget_index" in unmet_needs("cliperase", CIRCLE, data)

    no_train_squares = [r for r in reference if not (r.label == "square" and r.split == "train")]
    data = build_joint_unlearning_data([CIRCLE, SQUARE], no_train_squares, 32, max_retain=64)
    assert "forget" in unmet_needs("cliperase", CIRCLE, data)
    assert "forget" not in unmet_needs("finetune", CIRCLE, data)  # it trains on retain images only


def test_each_forget_image_carries_its_own_class_prompt_and_siblings_of_every_subgroup(reference):
    generator = torch.Generator().manual_seed(0)
    data = build_joint_unlearning_data([CIRCLE, SQUARE], reference, 32, max_retain=64)
    images, texts, labels = forget_batch(CIRCLE, data, 64, generator, with_labels=True)
    assert set(labels.tolist()) == set(data.forget_indices)
    assert texts == [data.templates[0].format(data.classnames[i]) for i in labels.tolist()]

    data = build_joint_unlearning_data([RED_CIRCLE, BLUE_SQUARE], reference, 32, max_retain=2048)
    batch = retain_batch(RED_CIRCLE, data, 64, generator, sibling_share=1.0)
    names = {data.classnames[i] for i in batch.labels.tolist()}
    assert {n.split()[-1] for n in names} == {"circle", "square"} and not names & {"red circle", "blue square"}


def test_class_weights_draw_the_forget_batch_from_the_targets_still_known(reference):
    targets = [ForgetTarget(kind="class", class_name=c) for c in sorted({r.label for r in reference})[:3]]
    data = build_joint_unlearning_data(targets, reference, 32, max_retain=64)
    first, second, third = data.forget_indices
    generator = torch.Generator().manual_seed(0)
    _, _, labels = forget_batch(targets[0], data, 400, generator, with_labels=True, class_weights={first: 0.0, second: 1.0, third: 3.0})
    counts = {i: int((labels == i).sum()) for i in data.forget_indices}
    assert counts[first] == 0 and 0.15 < counts[second] / 400 < 0.35 and 0.65 < counts[third] / 400 < 0.85
    _, _, uniform = forget_batch(targets[0], data, 400, generator, with_labels=True)
    assert all(int((uniform == i).sum()) > 80 for i in data.forget_indices)


def test_joint_stop_rule_waits_for_the_worst_target(trained_bundle, reference):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    targets = [ForgetTarget(kind="class", class_name=c) for c in sorted({r.label for r in reference})]  # every class: a spread of scores
    data = build_joint_unlearning_data(targets, reference, 32)

    per_class = {}
    score, _ = forget_check(model, tokenizer, targets[0], data, BudgetConfig(), per_class)

    per_target = [accuracy(model, tokenizer, data.forget_val.subset(torch.where(data.forget_val.labels == i)[0]), data.classnames,
                           data.templates) for i in data.forget_indices]
    assert max(per_target) > sum(per_target) / len(per_target)  # else the worst could not be told from the pooled score
    assert score() == pytest.approx(max(per_target))
    assert [per_class[i] for i in data.forget_indices] == pytest.approx(per_target)  # what a focused forget batch follows


# One joint CLIPErase run forgetting circle and square while the others keep the gates is tested end to end
# by tests/test_lifecycle.py (the batch test); a library-level copy of it cost another minute of CI.


@pytest.mark.parametrize("count, every", [(2, 1), (3, 5)])
def test_a_run_of_three_targets_or_more_takes_the_wide_joint_settings(trained_bundle, reference, count, every, monkeypatch):
    from unlearning.methods import cliperase as module
    from unlearning.methods.cliperase import CLIPEraseConfig

    weights_seen = []

    def recording_forget_batch(*args, class_weights=None, **kwargs):
        weights_seen.append(dict(class_weights) if class_weights else None)
        return forget_batch(*args, class_weights=class_weights, **kwargs)

    monkeypatch.setattr(module, "forget_batch", recording_forget_batch)

    shapes = sorted({r.label for r in reference})[:count]
    data = build_joint_unlearning_data([ForgetTarget(kind="class", class_name=c) for c in shapes], reference, 32,
                                       max_forget=32, max_retain=128, max_val=16)
    config = {"max_steps": 10, "stop_forget_accuracy": -1.0, "anchor_random_words": 4}  # never stops: all ten steps run
    result = run_method("cliperase", copy.deepcopy(trained_bundle.model), trained_bundle.tokenizer, data.forget_targets[0], data, config,
                        original=copy.deepcopy(trained_bundle.model).requires_grad_(False))

    checked = [row["step"] for row in result.history if "forget_accuracy" in row]
    assert checked == list(range(0, 11, every))  # the stop set is checked every `every` steps (and at the last)
    assert CLIPEraseConfig().for_targets(count).lr == (3e-4 if count >= 3 else 3e-5)
    if count < 3:
        assert weights_seen == [None] * 10  # a uniform forget batch
    else:  # each target's share: its stop-set accuracy at the last check + the floor
        per_class = {}
        score, _ = forget_check(trained_bundle.model, trained_bundle.tokenizer, data.forget_targets[0], data, BudgetConfig(), per_class)
        score()  # the run's first check, on the same weights
        assert weights_seen[0] == pytest.approx({i: per_class[i] + CLIPEraseConfig().wide_joint_focus_floor for i in data.forget_indices})
        assert len(weights_seen) == 10 and all(w is not None for w in weights_seen)
