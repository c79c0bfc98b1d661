"""Evidence beyond accuracy: membership inference and the relearning attack."""

from __future__ import annotations

import pytest
import torch

from unlearning.erasure_data import build_unlearning_data
from unlearning.evidence import forget_membership_auc, relearn_test
from unlearning.methods import ForgetTarget, LabelledImages, run_method
from unlearning.methods.common import accuracy
from unlearning.models import state_copy
from unlearning.world import SHAPES


def _test_set(records, images, classnames=SHAPES) -> LabelledImages:
    return LabelledImages(images, [r.caption for r in records], torch.tensor([classnames.index(r.label) for r in records]))


def test_membership_auc_is_one_half_for_identical_distributions(trained_bundle, small_records, test_images):
    samples = _test_set(small_records["test"], test_images).subset(range(64))
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    # The same samples on both sides: by symmetry exactly 0.5 (ties count half).
    assert forget_membership_auc(model, tokenizer, samples, samples) == pytest.approx(0.5)
    assert forget_membership_auc(model, tokenizer, samples, samples, classnames=SHAPES) == pytest.approx(0.5)


def test_membership_auc_separates_true_pairs_from_wrong_ones(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    members = _test_set(small_records["test"], test_images).subset(range(0, 96, 2))
    others = _test_set(small_records["test"], test_images).subset(range(1, 96, 2))
    # Non-members paired with another image's class: a much higher loss, so the attack wins.
    shifted = LabelledImages(others.images, list(reversed(others.texts)), (others.labels + 1) % len(SHAPES))
    assert forget_membership_auc(model, tokenizer, members, shifted, classnames=SHAPES) > 0.8
    assert forget_membership_auc(model, tokenizer, members, shifted) > 0.8


@pytest.fixture
def class_data(trained_bundle, small_records, test_images):
    per_class = {}
    test = _test_set(small_records["test"], test_images)
    for i, name in enumerate(SHAPES):
        per_class[name] = accuracy(trained_bundle.model, trained_bundle.tokenizer, test.subset(torch.where(test.labels == i)[0]),
                                   SHAPES, ["a photo of a {}."])
    target = ForgetTarget(kind="class", class_name=max(per_class, key=per_class.get))
    return target, build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=512)


def test_relearn_curves_start_at_the_models_accuracy_and_leave_the_models_untouched(trained_bundle, class_data):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target, data = class_data
    state = state_copy(model)
    frozen = trained_bundle.copy().model.requires_grad_(False)  # as callers pass the original

    result = relearn_test(model, frozen, tokenizer, target, data, steps=3, lr=0.0)

    start = accuracy(model, tokenizer, data.forget_val, data.classnames, ["a photo of a {}."])
    assert result.steps == [0, 1, 2, 3]
    assert result.unlearned == pytest.approx([start] * 4) and result.original == pytest.approx([start] * 4)  # lr 0: flat
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_relearning_brings_back_a_class_removed_by_gradient_ascent(trained_bundle, class_data):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target, data = class_data
    original = trained_bundle.copy().model.requires_grad_(False)
    run_method("gradient_ascent", model, tokenizer, target, data, {"max_steps": 120, "stop_forget_accuracy": 0.0})

    result = relearn_test(model, original, tokenizer, target, data, steps=8, lr=1e-4)

    assert result.unlearned[0] <= 0.1 < result.original[0]
    assert result.unlearned[-1] > result.unlearned[0] + 0.2  # ascent forgets shallowly: a few shots undo it
    assert 0.0 <= min(result.unlearned + result.original) and max(result.unlearned + result.original) <= 1.0
