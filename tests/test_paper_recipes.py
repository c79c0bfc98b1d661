"""The papers' own recipes (``lipschitz:paper``, ``cliperase:paper``, ``three_stage:paper``) beside our
variants: registered, validated, runnable; the authors' loss reduction; LoRA that merges back; the
alignment's choice of model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from unlearning.erasure_data import build_unlearning_data
from unlearning.methods import ForgetTarget, LabelledImages, UnlearningData, get_method, run_method
from unlearning.methods.common import class_text_features, image_features
from unlearning.methods.lipschitz import PAPER_K_TEXT, PAPER_K_VISUAL, PAPER_SIGMAS, lipschitz_loss
from unlearning.methods.lora import LowRankDelta, add_lora, merge_lora
from unlearning.methods.three_stage import ThreeStageConfig, align_to_batchnorm, aligned_pool
from unlearning.synthetic import SynthesisConfig
from unlearning.world import SHAPES

PAPER_NAMES = ("lipschitz:paper", "cliperase:paper", "three_stage:paper")


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_each_paper_recipe_is_registered_beside_our_variant_and_runs_the_same_code(name):
    ours, paper = get_method(name.removesuffix(":paper")), get_method(name)
    assert paper.run is ours.run and issubclass(paper.config_cls, ours.config_cls)
    assert paper.target_kinds == ours.target_kinds and paper.needs_original == ours.needs_original
    assert paper.config_cls().model_dump() != ours.config_cls().model_dump()
    with pytest.raises(ValidationError, match="not_a_field"):
        paper.config_cls.model_validate({"not_a_field": 1})


def test_paper_configs_hold_the_papers_values():
    lipschitz = get_method("lipschitz:paper").config_cls()
    assert (lipschitz.lr, lipschitz.n_noise, lipschitz.steps_per_epoch, lipschitz.stop_forget_accuracy) == (5e-5, 25, 1, 0.1)
    assert lipschitz.sigma_schedule == [0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0] and min(lipschitz.k_visual_schedule) > 0
    assert (lipschitz.loss_reduction, lipschitz.stop_set, lipschitz.anchor_weight, lipschitz.noise_target_removal) == ("paper", "train", 0, 0)
    assert lipschitz.synthesis == SynthesisConfig.paper()
    cliperase = get_method("cliperase:paper").config_cls()
    assert (cliperase.retain_weight, cliperase.forget_weight, cliperase.consistency_weight, cliperase.lr) == (1, 3, 3, 1e-6)
    assert not any((cliperase.anchor_weight, cliperase.overshoot, cliperase.forget_consistency_weight,
                    cliperase.feature_consistency_weight, cliperase.attribute_consistency_weight))
    three_stage = get_method("three_stage:paper").config_cls()
    assert (three_stage.align_through, three_stage.forget_loss, three_stage.remind_forget_weight) == ("original", "threshold", 0)
    assert three_stage.lora_rank > 0
    with pytest.raises(ValidationError, match="remind_scope"):  # LoRA adapts the selected tensors only
        get_method("three_stage:paper").config_cls(remind_scope="all")


class LinearCLIP(torch.nn.Module):
    """A hand-built two-tower model: a linear image encoder and one learnt text embedding."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(12, 4, bias=False)
        self.text = torch.nn.Parameter(torch.randn(1, 4))

    def encode_image(self, x):
        return self.image(x.flatten(1))

    def encode_text(self, tokens):
        return self.text.expand(len(tokens), -1)


def test_the_paper_reduction_sums_over_batch_and_draws_and_divides_by_twice_the_draws():
    torch.manual_seed(0)
    model, draws, batch = LinearCLIP(), 5, 3
    x = torch.randn(batch, 3, 2, 2)
    x_noisy = x + 0.3 * torch.randn(draws, batch, 3, 2, 2)
    total = 0.0
    with torch.no_grad():
        e_noisy = model.encode_image(x_noisy.flatten(0, 1)).view(draws, batch, -1)
        e_text, e_image = model.encode_text([0])[0], model.encode_image(x)
        for d in range(draws):  # the authors' K, one image and one draw at a time
            for b in range(batch):
                out = (e_text - e_noisy[d, b]).norm() + (e_image[b] - e_noisy[d, b]).norm()
                total += float(out / (2 * (x[b] - x_noisy[d, b]).norm()))
    tokens = torch.zeros(1, 3, dtype=torch.long)

    paper = float(lipschitz_loss(model, tokens, x, x_noisy, e_noisy, reduction="paper").detach())
    mean = float(lipschitz_loss(model, tokens, x, x_noisy, e_noisy).detach())

    assert paper == pytest.approx(total / (2 * draws), rel=1e-5)
    assert mean == pytest.approx(total / (draws * batch), rel=1e-5)
    assert mean == pytest.approx(paper * 2 / batch, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        lipschitz_loss(model, tokens, x, x_noisy, e_noisy, reduction="sum")


def test_lipschitz_paper_updates_both_towers_one_step_per_epoch_on_the_papers_schedule(trained_bundle):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    classnames = sorted(SHAPES)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Smaller for test time; and a larger lr, since at 5e-5 no epoch moves this model, every one is rolled back.
    config = {"lr": 1e-3, "max_epochs": 3, "batch_size": 16, "n_noise": 8, "synthesis": SynthesisConfig.paper(n_images=16).model_dump()}
    result = run_method("lipschitz:paper", model, tokenizer, ForgetTarget(kind="class", class_name="circle"),
                        UnlearningData(classnames=classnames, forget_index=classnames.index("circle")), config)

    rows = result.history
    assert [row["epoch"] for row in rows] == list(range(len(rows)))  # one optimiser step per epoch
    first = rows[0]
    assert (first["sigma"], first["k_visual"], first["k_text"]) == (PAPER_SIGMAS[0], PAPER_K_VISUAL[0], PAPER_K_TEXT[0])
    assert {row["sigma"] for row in rows} <= set(PAPER_SIGMAS[:3])
    assert any(n.startswith("visual.") for n in first["layers"]) and any(n.startswith("transformer.") for n in first["layers"])
    assert result.artifacts["synthetic_images"].shape == (16, 3, 32, 32)  # stop set = the training set: none held out
    # the target's synthetic images are less recognised, and the kept model moved in both towers
    assert result.summary["synthetic_forget_acc"] < 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("visual.") for n in changed) and any(n.startswith("transformer.") for n in changed)


def _target_similarity(model, tokenizer, data) -> float:
    with torch.no_grad():
        classes = class_text_features(model, tokenizer, data.classnames, data.templates)
        return float((image_features(model, data.forget.images[:64]) @ classes[data.forget_index]).mean())


def test_cliperase_paper_runs_the_three_paper_terms_only_and_lowers_the_target_similarity(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target = ForgetTarget(kind="class", class_name="circle")
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_forget=64, max_retain=256)
    original = copy.deepcopy(model).requires_grad_(False)
    before = _target_similarity(model, tokenizer, data)

    # At the paper's lr 1e-6 five steps move this model too little to measure a drop.
    result = run_method("cliperase:paper", model, tokenizer, target, data, {"max_steps": 5, "lr": 1e-4, "stop_forget_accuracy": -1.0},
                        original=original)  # never stops early: on some test models 3 steps already met the stop rule

    terms = set().union(*(row.keys() for row in result.history if "loss" in row))
    assert terms == {"step", "loss", "retention", "forgetting", "consistency", "stage", "seconds", "forget_accuracy"}
    assert result.summary["steps"] == 5
    assert _target_similarity(model, tokenizer, data) < before


def test_three_stage_paper_trains_lora_on_the_selected_tensors_and_leaves_a_plain_model(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target = ForgetTarget(kind="subgroup", class_name="circle", attribute="colour", value="red")
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_forget=64, max_retain=256)
    original = copy.deepcopy(model).requires_grad_(False)
    config = {"max_steps": 4, "remind_steps": 2, "fisher_samples": 16, "top_k_tensors": 6, "align_steps": 2, "align_pool": 32,
              "soup_alphas": [1.0]}

    result = run_method("three_stage:paper", model, tokenizer, target, data, config, original=original)

    assert type(model) is type(original) and model.state_dict().keys() == original.state_dict().keys()
    selected = set(result.summary["selected_tensors"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])}
    assert changed and changed <= selected
    assert result.summary["lora_rank"] > 0 and "through the original model" in result.summary["alignment"]
    losses = [row["forget_similarity_loss"] for row in result.history if row["stage"] == "forgetting" and "loss" in row]
    assert losses and losses[-1] < losses[0]


# A Linear read through its forward, a conv kernel, weights nn.MultiheadAttention reads directly,
# open_clip's attention pool (also read directly) and a bare projection matrix.
ADAPTED = ("visual.layer1.0.conv1.weight", "visual.attnpool.c_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight",
           "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight", "text_projection")


def test_lora_starts_as_the_identity_takes_effect_on_every_adapted_weight_and_merges_into_a_plain_model(trained_bundle, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    plain_class, keys = type(model), model.state_dict().keys()
    images, tokens = test_images[:8], tokenizer(["a picture of a circle.", "a small red square"])

    def outputs():
        with torch.no_grad():
            return image_features(model, images), F.normalize(model.encode_text(tokens), dim=-1)

    start = outputs()
    adapters = add_lora(model, ADAPTED, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert len(adapters) == 2 * len(ADAPTED)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs(), start))  # B = 0: nothing moved yet
    generator = torch.Generator().manual_seed(1)
    for up in adapters[1::2]:  # each adapter alone changes what the model computes
        with torch.no_grad():
            up.copy_(0.5 * torch.randn(up.shape, generator=generator))
        moved = outputs()
        assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(moved, start))
        start = moved
    adapted = outputs()

    merge_lora(model)

    assert type(model) is plain_class and model.state_dict().keys() == keys
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs(), adapted))
    with pytest.raises(ValueError, match="matrices"):
        LowRankDelta(torch.Size([16]), rank=2, alpha=1.0)


def test_alignment_runs_through_the_model_that_align_through_names(trained_bundle, test_images):
    original = trained_bundle.model
    unlearned = copy.deepcopy(original)
    with torch.no_grad():
        unlearned.visual.layer1[0].conv1.weight.mul_(1.5)
    pool = LabelledImages(test_images[:16], ["x"] * 16, torch.zeros(16, dtype=torch.long))
    settings = {"align_steps": 3, "batch_size": 16}
    through = {model_name: align_to_batchnorm(model, pool.images, 3, 0.05, 1e-3, 16)
               for model_name, model in (("original", original), ("unlearned", unlearned))}

    for choice, other in (("original", "unlearned"), ("unlearned", "original")):
        aligned, line = aligned_pool(unlearned, original, pool, ThreeStageConfig(align_through=choice, **settings))
        assert torch.equal(aligned.images, through[choice]) and not torch.equal(aligned.images, through[other])
        assert choice in line
