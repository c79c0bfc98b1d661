"""Baselines and the shared optimisation loop: stop rule, budget, frozen temperature."""

from __future__ import annotations

import pytest
import torch

from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet, evaluate
from unlearning.methods import ForgetTarget, get_method, run_method
from unlearning.methods.baselines import BudgetConfig, optimise


@pytest.fixture
def class_case(trained_bundle, small_records, test_images):
    """The best-known class as the target (a measurable drop), its data and its before-metrics."""
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    eval_set = EvalSet(small_records["test"], test_images)
    per_class = evaluate(model, tokenizer, eval_set, []).per_class
    target = ForgetTarget(kind="class", class_name=max(per_class, key=per_class.get))
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=1024)
    return target, data, eval_set, evaluate(model, tokenizer, eval_set, [target]).metrics


# Ascent is known to cost 38-52 retain points on the tiny CLIP (calibration.md). Plain gradient
# ascent has no term that keeps anything, and on the weak test models its collateral ranged from
# 14 to 52 pt (one CI model: 69 -> 17 %), so only GradDiff, whose retain descent is there to keep
# the other classes, is held to a bound (measured 13-34 pt); the benchmark reports both.
@pytest.mark.parametrize("method, max_retain_drop", [("gradient_ascent", None), ("graddiff", 0.5)])
def test_ascent_baselines_forget_the_class(trained_bundle, class_case, method, max_retain_drop):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target, data, eval_set, before = class_case
    scale = model.logit_scale.detach().clone()

    result = run_method(method, model, tokenizer, target, data, {"max_steps": 120, "stop_forget_accuracy": 0.05})

    after = evaluate(model, tokenizer, eval_set, [target]).metrics
    assert before["forget_accuracy"] >= 0.5
    assert after["forget_accuracy"] <= 0.3 * before["forget_accuracy"]
    if max_retain_drop is not None:  # damaged (what the paper methods improve on), not wrecked
        assert before["retain_accuracy"] - after["retain_accuracy"] <= max_retain_drop
    assert result.summary["stopped"] and result.summary["steps"] < 120
    assert torch.equal(model.logit_scale, scale)  # the temperature is never a way out


def test_finetune_runs_its_whole_budget_and_keeps_retained_classes(trained_bundle, class_case):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target, data, eval_set, before = class_case

    result = run_method("finetune", model, tokenizer, target, data, {"max_steps": 5, "batch_size": 32})

    after = evaluate(model, tokenizer, eval_set, [target]).metrics
    assert result.summary["steps"] == 5 and not result.summary["stopped"]
    assert [row["step"] for row in result.history] == list(range(6))
    # Measured on the seed-2 test model (ERASURE_TEST_SEED=2): -5.1 pt; the weak test models have little to keep.
    assert before["retain_accuracy"] - after["retain_accuracy"] <= 0.08


def test_the_loop_stops_before_any_step_when_the_target_is_already_forgotten():
    weight = torch.nn.Parameter(torch.ones(3))
    calls = []

    def loss_fn():
        calls.append(1)
        return weight.sum(), {}

    history = optimise([weight], loss_fn, BudgetConfig(max_steps=10), score=lambda: 0.0, threshold=0.0)
    assert calls == [] and history == [{"step": 0, "forget_accuracy": 0.0, "stage": "unlearn", "seconds": history[0]["seconds"]}]


def test_min_steps_keeps_the_loop_going_past_a_stop_rule_that_holds():
    weight = torch.nn.Parameter(torch.ones(3))
    calls = []

    def loss_fn():
        calls.append(1)
        return weight.sum(), {}

    optimise([weight], loss_fn, BudgetConfig(max_steps=10, min_steps=4), score=lambda: 0.0, threshold=0.0)
    assert len(calls) == 4


def test_a_reset_word_gets_a_fresh_embedding_and_nothing_else_moves(trained_bundle):
    from unlearning.methods.common import reset_word_embeddings

    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    before = model.token_embedding.weight.detach().clone()
    ids = reset_word_embeddings(model, tokenizer, ["circle"], ["square", "star"], torch.Generator().manual_seed(0))
    after = model.token_embedding.weight.detach()
    assert ids == tokenizer.encode("circle")
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids
    assert after[ids].std() == pytest.approx(0.02, rel=0.3)  # open_clip's initialisation scale
    assert reset_word_embeddings(model, tokenizer, ["circle"], ["circle"], torch.Generator()) == []  # a kept word is never reset


def test_the_loop_checks_the_stop_rule_every_eval_every_steps():
    weight = torch.nn.Parameter(torch.ones(1))
    scores = iter([1.0, 0.5, 0.0])

    history = optimise([weight], lambda: (weight.sum(), {}), BudgetConfig(max_steps=10, eval_every=3), score=lambda: next(scores))

    assert [row["step"] for row in history] == list(range(7))
    assert [row["step"] for row in history if "forget_accuracy" in row] == [0, 3, 6]


def test_overshoot_keeps_going_for_a_share_of_the_steps_taken_once_the_rule_holds():
    weight = torch.nn.Parameter(torch.ones(1))
    scores = iter([1.0, 0.8, 0.6, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])

    history = optimise([weight], lambda: (weight.sum(), {}), BudgetConfig(max_steps=10, overshoot=0.5), score=lambda: next(scores))

    # the rule holds after step 4; half of 4 more steps follow
    assert [row["step"] for row in history] == list(range(7))


def test_every_method_declares_the_shared_budget_fields():
    for name in ("gradient_ascent", "graddiff", "finetune", "cliperase", "three_stage"):
        fields = get_method(name).config_cls.model_fields
        assert {"lr", "max_steps", "batch_size", "stop_forget_accuracy", "stop_forget_recall", "eval_every", "seed"} <= set(fields), name


def test_a_subgroup_override_applies_to_subgroup_targets_only():
    config = get_method("three_stage").config_cls(distill_weight=2.0, subgroup_distill_weight=7.0)
    assert config.for_kind("distill_weight", "subgroup") == 7.0
    assert config.for_kind("distill_weight", "class") == 2.0 and config.for_kind("distill_weight", "association") == 2.0
    assert config.for_kind("lr", "subgroup") == config.lr  # no subgroup_lr field: the shared value


def test_gradient_ascent_on_an_association_lowers_forget_recall(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    records = small_records["train"] + small_records["val"] + small_records["test"]
    target = ForgetTarget(kind="association", captions=sorted({r.caption for r in records if "red" in r.caption.split()}))
    eval_set = EvalSet(small_records["test"], test_images)
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=256)
    before = evaluate(model, tokenizer, eval_set, [target]).metrics

    # lr 1e-4 and a generous ceiling: at the default lr a fresh-clone test model kept R@5 at 100 % for 20 steps.
    result = run_method("gradient_ascent", model, tokenizer, target, data, {"max_steps": 100, "lr": 1e-4, "stop_forget_recall": 0.5})
    after = evaluate(model, tokenizer, eval_set, [target]).metrics
    assert after["forget_accuracy"] < before["forget_accuracy"]
    assert result.summary["stopped"] and result.summary["steps"] < 100
