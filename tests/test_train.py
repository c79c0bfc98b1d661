"""Bootstrap training: the CLIP loss falls and the recipe's pieces behave."""

import math

import torch

from unlearning.data import load_images
from unlearning.models import load_model
from unlearning.train import TrainConfig, lr_at, param_groups, train_clip


def test_a_few_steps_lower_the_contrastive_loss(small_records):
    torch.manual_seed(0)
    bundle = load_model("TinyCLIP-RN32", device="cpu")
    train = small_records["train"][:512]
    history = train_clip(bundle.model, bundle.tokenizer, load_images(train, 32), [r.caption for r in train],
                         TrainConfig(steps=30, batch_size=64, lr=2e-3, warmup_steps=5, log_every=1), progress=False)
    first = sum(r["loss"] for r in history[:3]) / 3
    last = sum(r["loss"] for r in history[-3:]) / 3
    assert last < first - 0.2
    assert bundle.model.logit_scale.exp() <= 100 + 1e-4
    assert not bundle.model.training  # handed back in eval mode


def test_same_seed_trains_the_same_model(small_records):
    """Seeded init + seeded batches: a machine retrains its test model bit for bit."""
    train = small_records["train"][:256]
    states = []
    for _ in range(2):
        bundle = load_model("TinyCLIP-RN32", device="cpu", seed=3)
        train_clip(bundle.model, bundle.tokenizer, load_images(train, 32), [r.caption for r in train],
                   TrainConfig(steps=3, batch_size=32, warmup_steps=1, seed=3), progress=False)
        states.append(bundle.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert lr_at(0, config) < lr_at(9, config) == config.lr
    assert lr_at(55, config) < config.lr
    assert math.isclose(lr_at(100, config), 0.0, abs_tol=1e-12)


def test_weight_decay_skips_embeddings_norms_and_biases():
    bundle = load_model("TinyCLIP-RN32", device="cpu")
    decay, no_decay = param_groups(bundle.model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for name, p in bundle.model.named_parameters():
        if "token_embedding" in name or "logit_scale" in name or p.ndim < 2:
            assert id(p) not in decayed, name
    assert no_decay["weight_decay"] == 0.0 and decay["params"]
