"""Synthetic forget sets (Kravets Step A): images grown from noise until the model sees the target."""

import torch

from conftest import best_known_subgroup
from unlearning.metrics import encode_images, zero_shot_classifier
from unlearning.synthetic import SynthesisConfig, synthesize
from unlearning.world import COLOURS, SHAPES

TEMPLATES = ["a picture of a {}."]


def _target_probabilities(model, tokenizer, images, classnames, target):
    logits = model.logit_scale.exp().clamp(max=100) * encode_images(model, images) @ zero_shot_classifier(model, tokenizer, classnames, TEMPLATES)
    return logits.softmax(dim=-1)


def test_synthesis_raises_the_target_probability_and_survives_uint8(trained_bundle):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    classnames, target = list(SHAPES), SHAPES.index("square")
    config = SynthesisConfig(n_images=16, high_prob=0.6, min_steps=20, max_steps=100, steps_per_round=25)

    start = synthesize(model, tokenizer, classnames, target, config.model_copy(update={"max_steps": 0}), TEMPLATES)
    grown = synthesize(model, tokenizer, classnames, target, config, TEMPLATES)

    assert grown.images.dtype == torch.uint8 and grown.images.shape == (16, 3, 32, 32)
    assert config.min_steps <= grown.steps <= config.max_steps  # nothing is accepted before min_steps
    assert float(grown.target_prob.mean()) > float(start.target_prob.mean()) + 0.2
    # the reported probabilities are those of the stored uint8 images
    probs = _target_probabilities(model, tokenizer, grown.images, classnames, target)
    assert torch.allclose(probs[:, target], grown.target_prob, atol=1e-4)
    accepted = grown.accepted
    assert accepted.any()
    assert bool((probs[accepted].argmax(dim=-1) == target).all())
    assert bool((probs[accepted, target] > grown.threshold[accepted]).all())
    # failing images lower their own threshold, never below the floor
    assert bool((grown.threshold >= 0.45 - 1e-6).all()) and bool((grown.threshold <= config.high_prob).all())
    # the model is left as it was, gradients flags included
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad and p.grad is None


def test_synthesis_works_for_subgroups_and_is_seeded(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    classnames = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    # seeds 1 and 2 barely know "red circle": its probability climbed only from 7e-7 to 2e-5 in 100 steps
    target = classnames.index(best_known_subgroup(model, tokenizer, small_records["test"], test_images))
    config = SynthesisConfig(n_images=8, min_steps=0, max_steps=100)  # 40 climbed only to 0.09 on a fresh-clone test model

    start = synthesize(model, tokenizer, classnames, target, config.model_copy(update={"max_steps": 0}), TEMPLATES)
    first = synthesize(model, tokenizer, classnames, target, config, TEMPLATES)
    again = synthesize(model, tokenizer, classnames, target, config, TEMPLATES)

    assert float(first.target_prob.mean()) > float(start.target_prob.mean()) + 0.1
    assert torch.equal(first.images, again.images)
    # and a paper-only configuration (no transfer aids) still climbs
    paper = synthesize(model, tokenizer, classnames, target, SynthesisConfig.paper(n_images=8, high_prob=0.99, max_steps=100), TEMPLATES)
    assert float(paper.target_prob.mean()) > float(start.target_prob.mean()) + 0.1
