"""The one erasure core: erase() / unlearn_and_evaluate() run a method on a copy and evaluate it."""

import pytest
import torch

from unlearning.erasure import erase, unlearn_and_evaluate
from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet
from unlearning.methods import ForgetTarget
from unlearning.models import state_copy

CIRCLE = ForgetTarget(kind="class", class_name="circle")
# stop_forget_accuracy -1: the stop rule never holds, so exactly max_steps run
FEW_STEPS = {"max_steps": 3, "stop_forget_accuracy": -1.0, "batch_size": 16}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_erase_from_a_manifest_returns_an_evaluated_copy_and_leaves_the_start_untouched(trained_bundle, small_world):
    before = state_copy(trained_bundle.model)

    outcome = erase(trained_bundle, small_world, CIRCLE, "gradient_ascent", seed=1, config=FEW_STEPS)

    assert _same_weights(state_copy(trained_bundle.model), before)  # the start model is untouched
    assert _same_weights(state_copy(outcome.original), before)  # the reference is the start's weights, frozen
    assert not any(p.requires_grad for p in outcome.original.parameters())
    assert not _same_weights(state_copy(outcome.bundle.model), before)  # the method changed the copy
    assert outcome.steps == 3 and outcome.config.seed == 1 and outcome.config.max_steps == 3
    assert outcome.seconds > 0 and outcome.evaluate_seconds > 0
    metrics = outcome.after.metrics
    # evaluated on the manifest's test split, with the world's probes and the forget images as MIA members
    assert {"forget_accuracy", "retain_accuracy", "heldout_accuracy", "mia_auc"} <= metrics.keys()
    assert {r.split for r in outcome.eval_set.records} == {"test"}
    forget_class = outcome.data.classnames.index("circle")
    assert set(outcome.data.forget.labels.tolist()) == {forget_class}
    assert forget_class not in outcome.data.retain.labels.tolist()


def test_unlearn_and_evaluate_uses_the_given_original_and_can_skip_the_evaluation(trained_bundle, small_records, test_images):
    reference = [r for split in ("train", "val") for r in small_records[split]]
    data = build_unlearning_data(CIRCLE, reference, trained_bundle.image_size, max_retain=128)
    original = trained_bundle.copy().model.requires_grad_(False)

    outcome = unlearn_and_evaluate("finetune", trained_bundle, CIRCLE, data, EvalSet(small_records["test"], test_images),
                                   original=original, config={**FEW_STEPS, "max_steps": 1}, evaluate_after=False)

    assert outcome.after is None and outcome.evaluate_seconds == 0.0 and outcome.steps == 1
    assert outcome.original is original and outcome.data is data
    assert outcome.bundle.model is not trained_bundle.model


@pytest.mark.parametrize("method, config, error, words", [
    ("gradient_descent", {}, KeyError, "unknown method 'gradient_descent'"),
    ("finetune", {"learning_rate": 1e-3}, ValueError, "config.learning_rate"),
    ("finetune", {"max_steps": "many"}, ValueError, "config.max_steps"),
    ("finetune", {"seed": 3}, ValueError, "config.seed"),
])
def test_bad_method_or_config_fails_before_the_model_is_loaded(method, config, error, words):
    # the model folder does not exist: loading it would raise FileNotFoundError instead
    with pytest.raises(error, match=words):
        erase("local-dir:/nonexistent/model", [], CIRCLE, method, config=config)


def test_a_target_kind_the_method_cannot_erase_fails_before_the_model_is_loaded():
    association = ForgetTarget(kind="association", captions=["a photo of a small red circle"])
    with pytest.raises(ValueError, match="lipschitz.*not 'association'"):
        erase("local-dir:/nonexistent/model", [], association, "lipschitz")


def test_evaluating_needs_an_eval_set(trained_bundle):
    with pytest.raises(ValueError, match="eval_set"):
        unlearn_and_evaluate("finetune", trained_bundle, CIRCLE, data=None, eval_set=None)
