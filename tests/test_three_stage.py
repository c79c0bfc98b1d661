"""Three-stage subgroup forgetting: souping, the KD term, BatchNorm alignment, and forgetting on the small CLIP."""

from __future__ import annotations

import copy

import pytest
import torch

from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet, evaluate
from unlearning.methods import ForgetTarget, run_method
from unlearning.methods.base import LabelledImages
from unlearning.methods.common import accuracy
from unlearning.methods.three_stage import align_to_batchnorm, choose_alpha, distillation_kl, forget_margins, reminding_terms, soup
from unlearning.models import load_model, state_copy

from conftest import best_known_subgroup

FAST = {"max_steps": 30, "top_k_tensors": 8, "remind_steps": 8, "align_steps": 5, "align_pool": 64, "stop_forget_accuracy": 0.0}
# Reminding all tensors for 20 steps keeps the siblings of the weak test models (seed 0: -7.5 pt,
# seed 1: -10 pt); reminding only the selected ones for 8 steps cost one of them 27 pt.
REMIND_ALL = {**FAST, "remind_steps": 20, "remind_scope": "all"}


def _perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {k: v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 3 for k, v in state.items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so that -0.0 differs from 0.0 and NaN equals itself."""
    return tensor.reshape(-1).view(torch.uint8) if tensor.is_floating_point() else tensor


def test_soup_endpoints_are_the_original_and_the_unlearned_bit_for_bit(trained_bundle):
    original = state_copy(trained_bundle.model)
    original["visual.bn1.running_mean"][0] = -0.0  # signed zero and NaN must survive an exact endpoint
    original["visual.bn1.running_mean"][1] = float("nan")
    unlearned = _perturbed(original)
    for alpha, expected in ((0.0, original), (1.0, unlearned)):
        souped = soup(original, unlearned, alpha)
        assert souped.keys() == expected.keys()
        for key, value in souped.items():
            assert value.dtype == expected[key].dtype
            assert torch.equal(_bits(value), _bits(expected[key])), key


def test_soup_interpolates_weights_and_takes_integer_buffers_from_the_heavier_side(trained_bundle):
    original = state_copy(trained_bundle.model)
    unlearned = _perturbed(original)
    souped = soup(original, unlearned, 0.25)
    weight = "visual.conv1.weight"
    assert torch.allclose(souped[weight], 0.25 * unlearned[weight] + 0.75 * original[weight], atol=1e-6)
    counter = "visual.bn1.num_batches_tracked"
    assert torch.equal(souped[counter], original[counter])
    assert torch.equal(soup(original, unlearned, 0.75)[counter], unlearned[counter])
    trained_bundle.model.load_state_dict(souped)  # a soup is a loadable model


def _table(*rows):
    return [{"alpha": a, "remembered": f, "retain_accuracy": r} for a, f, r in rows]


def test_soup_alpha_rule_keeps_forgetting_then_maximises_retain():
    table = _table((1.0, 0.0, 0.90), (0.9, 0.0, 0.92), (0.8, 0.0, 0.92), (0.7, 0.1, 0.95))
    assert choose_alpha(table, threshold=0.0)["alpha"] == 0.9  # 0.7 forgets less; 0.9 / 0.8 tie: the larger α
    assert choose_alpha(table, threshold=0.1)["alpha"] == 0.7  # a looser stop threshold admits it


def test_soup_alpha_rule_never_forgets_less_than_the_unsouped_model():
    table = _table((1.0, 0.2, 0.80), (0.9, 0.2, 0.85), (0.8, 0.3, 0.90))
    assert choose_alpha(table, threshold=0.0)["alpha"] == 0.9


def test_forget_margins_are_positive_exactly_where_the_target_is_still_predicted(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    classnames, templates = sorted({r.label for r in small_records["test"]}), ["a picture of a {}."]
    as_target = LabelledImages(test_images, [r.caption for r in small_records["test"]], torch.zeros(len(test_images), dtype=torch.long))
    margins = forget_margins(model, tokenizer, test_images, classnames, templates, index=0)
    assert margins.shape == (len(test_images),) and (margins > 0).any() and (margins < 0).any()
    assert float((margins > 0).float().mean()) == pytest.approx(accuracy(model, tokenizer, as_target, classnames, templates))


def test_distillation_is_zero_for_the_teacher_itself(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    images, texts = test_images[:16], [r.caption for r in small_records["test"][:16]]
    classnames, templates = ["circle", "square", "star"], ["a picture of a {}."]
    teacher = copy.deepcopy(model)
    terms = reminding_terms(model, teacher, tokenizer, images, texts, classnames, templates, temperature=2.0)
    assert float(terms["distillation"].detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # a changed student must show a positive KD loss, or the term measures nothing
        model.visual.attnpool.c_proj.weight.add_(0.05 * torch.randn_like(model.visual.attnpool.c_proj.weight))
    terms = reminding_terms(model, teacher, tokenizer, images, texts, classnames, templates, temperature=2.0)
    assert float(terms["distillation"].detach()) > 1e-4
    logits = torch.randn(4, 3)
    assert float(distillation_kl(logits, logits, 3.0)) == pytest.approx(0.0, abs=1e-7)


def _bn_gap(model, x) -> float:
    layers = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    inputs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: inputs.append(i[0])) for m in layers]
    with torch.no_grad():
        model.encode_image(x)
    for h in hooks:
        h.remove()
    return sum(float((a.mean(dim=(0, 2, 3)) - m.running_mean).norm()) for m, a in zip(layers, inputs))


def test_alignment_moves_batch_statistics_towards_the_running_statistics(trained_bundle, test_images):
    from unlearning.metrics import prepare_images

    model = trained_bundle.model
    images = test_images[:32]
    aligned = align_to_batchnorm(model, images, steps=15, lr=0.05, l2=1e-3, batch_size=32)
    assert aligned.shape == images.shape and aligned.is_floating_point()
    assert _bn_gap(model, aligned) < 0.9 * _bn_gap(model, prepare_images(model, images))
    assert all(p.grad is None for p in model.parameters())  # only the perturbation learned


def test_alignment_is_skipped_for_a_tower_without_batchnorm(test_images):
    vit = load_model("TinyCLIP-ViT32", device="cpu").model
    assert align_to_batchnorm(vit, test_images[:4], steps=2, lr=0.05, l2=1e-3, batch_size=4) is None


def test_three_stage_forgets_a_subgroup_and_keeps_its_siblings(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    eval_set = EvalSet(small_records["test"], test_images)
    value, label = best_known_subgroup(model, tokenizer, small_records["test"], test_images).split(" ")
    target = ForgetTarget(kind="subgroup", class_name=label, attribute="colour", value=value)
    before = evaluate(model, tokenizer, eval_set, [target]).metrics
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=1024)
    original = copy.deepcopy(model).requires_grad_(False)

    result = run_method("three_stage", model, tokenizer, target, data, REMIND_ALL, original=original)

    after = evaluate(model, tokenizer, eval_set, [target]).metrics
    assert before["forget_accuracy"] >= 0.5
    assert after["forget_accuracy"] <= 0.5 * before["forget_accuracy"]
    # Targeted: the siblings lose far less than the subgroup. Measured on the test models of
    # ERASURE_TEST_SEED 0-3: siblings -2.5, -7.5, -5 and -12.5 pt (the champion: 0.0 / -2.5 pt, docs/benchmarks.md).
    sibling_drop = before["sibling_accuracy"] - after["sibling_accuracy"]
    assert sibling_drop <= 0.2 and sibling_drop <= 0.4 * (before["forget_accuracy"] - after["forget_accuracy"])
    assert before["retain_accuracy"] - after["retain_accuracy"] <= 0.08
    assert len(result.summary["selected_tensors"]) == FAST["top_k_tensors"]
    assert {"forgetting", "reminding", "restoring"} == {row["stage"] for row in result.history}
    assert 0.0 < result.summary["alpha"] <= 1.0


def test_only_the_fisher_selected_tensors_move_when_reminding_is_scoped_to_them(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target = ForgetTarget(kind="subgroup", class_name="circle", attribute="colour", value="red")
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=256)
    original = copy.deepcopy(model).requires_grad_(False)

    config = {**FAST, "max_steps": 3, "remind_steps": 2, "align_steps": 1, "remind_scope": "selected", "soup_alphas": [1.0]}
    result = run_method("three_stage", model, tokenizer, target, data, config, original=original)

    selected = set(result.summary["selected_tensors"])
    assert len(selected) == config["top_k_tensors"] and all(p.ndim >= 2 for n, p in model.named_parameters() if n in selected)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])}
    assert changed and changed <= selected
