"""The ``lipschitz`` method (Kravets & Namboodiri): loss, layer mask, rollback, and real forgetting."""

import copy

import pytest
import torch

from unlearning.data import load_images
from unlearning.methods import ForgetTarget, UnlearningData, run_method
from unlearning.methods.lipschitz import keep_top_k, lipschitz_loss, perturb, restore, snapshot, tower_parameters, without_direction
from unlearning.metrics import prepare_images, zero_shot_accuracy
from unlearning.world import SHAPES

NEVER_UPDATED = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection", "logit_scale")


def _optimizer(towers, lr=1e-4):
    return torch.optim.Adam([p for params in towers.values() for p in params.values()], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=0.2)


def _batch(model, small_records, label="circle", n=16):
    records = [r for r in small_records["train"] if r.label == label][:n]
    return prepare_images(model, load_images(records, 32))


def test_loss_decreases_when_minimised_on_a_fixed_batch(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    x, text = _batch(model, small_records), tokenizer(["a picture of a circle."])
    # The noisy anchors e_x~ carry no gradient, so each step minimises K against fixed anchors; that
    # is the objective checked here (re-drawing anchors from the moving model can make K rise).
    x_noisy, e_noisy = perturb(model, x, 0.5, 4, torch.Generator().manual_seed(0))
    towers = tower_parameters(model)
    optimizer = _optimizer(towers, lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = lipschitz_loss(model, text, x, x_noisy, e_noisy)
        loss.backward()
        keep_top_k(towers, {"visual": 4, "text": 6})
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.98 * losses[0], losses


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0, 2.0])
def test_without_direction_scales_only_the_component_along_the_direction(share):
    generator = torch.Generator().manual_seed(0)
    features, direction = torch.randn(4, 3, 16, generator=generator), 5 * torch.randn(16, generator=generator)
    unit = direction / direction.norm()
    out = without_direction(features, direction, share)

    assert torch.allclose(out @ unit, (1 - share) * (features @ unit), atol=1e-5)
    orthogonal = lambda f: f - (f @ unit).unsqueeze(-1) * unit  # noqa: E731
    assert torch.allclose(orthogonal(out), orthogonal(features), atol=1e-5)


def test_text_term_pulls_towards_the_given_text_noise(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    x, text = _batch(model, small_records, n=8), tokenizer(["a picture of a circle."])
    x_noisy, e_noisy = perturb(model, x, 0.5, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        e_text = model.encode_text(text)
        default = lipschitz_loss(model, text, x, x_noisy, e_noisy)
        same = lipschitz_loss(model, text, x, x_noisy, e_noisy, text_noisy=e_noisy)
        at_text = lipschitz_loss(model, text, x, x_noisy, e_noisy, text_noisy=e_text.expand_as(e_noisy))

    assert torch.equal(default, same)
    assert at_text < default  # the text term vanishes when the text sits where it is pulled


def test_mask_keeps_exactly_k_tensors_per_tower_and_never_the_excluded_ones(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    x = _batch(model, small_records, n=8)
    x_noisy, e_noisy = perturb(model, x, 0.5, 2, torch.Generator().manual_seed(0))
    lipschitz_loss(model, tokenizer(["a picture of a circle."]), x, x_noisy, e_noisy).backward()
    towers = tower_parameters(model)
    assert not any(name in towers["text"] or name in towers["visual"] for name in NEVER_UPDATED)
    assert not any("conv" in n or "bn" in n or "downsample" in n for n in towers["visual"])  # RN50 freeze list
    assert all(n.startswith("transformer.") for n in towers["text"])

    kept = keep_top_k(towers, {"visual": 3, "text": 5})

    for tower, k in (("visual", 3), ("text", 5)):
        with_grad = [n for n, p in towers[tower].items() if p.grad is not None]
        assert len(with_grad) == k and set(with_grad) <= set(kept)
    assert len(kept) == 8
    # kept tensors are the ones with the largest mean |grad| in their tower: re-run and compare
    model.zero_grad(set_to_none=True)
    lipschitz_loss(model, tokenizer(["a picture of a circle."]), x, x_noisy, e_noisy).backward()
    scores = {n: p.grad.abs().mean().item() for n, p in towers["text"].items() if p.grad is not None}
    assert set(sorted(scores, key=scores.get, reverse=True)[:5]) == {n for n in kept if n.startswith("transformer.")}


def test_rollback_restores_model_and_optimiser_bit_for_bit(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    x, text = _batch(model, small_records, n=8), tokenizer(["a picture of a circle."])
    towers = tower_parameters(model)
    optimizer = _optimizer(towers)
    generator = torch.Generator().manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        lipschitz_loss(model, text, x, *perturb(model, x, 0.5, 2, generator)).backward()
        keep_top_k(towers, {"visual": 3, "text": 5})
        optimizer.step()

    step()  # the optimiser has state to roll back to
    saved = snapshot(model, optimizer)
    weights, adam = {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict()
    adam_state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in adam["state"].items()}
    for _ in range(3):
        step()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in weights.items())

    for _ in range(2):  # a snapshot can be restored more than once
        restore(model, optimizer, saved)
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k]), k
        restored = optimizer.state_dict()["state"]
        assert restored.keys() == adam_state.keys()
        for i, s in adam_state.items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(restored[i][k]), torch.as_tensor(v)), (i, k)
        step()


def test_forgetting_the_synthetic_set_transfers_to_real_images_of_the_target(trained_bundle, small_records, test_images):
    """When lipschitz reports its held-out synthetic images forgotten, real images of the class are
    forgotten too and the other classes are kept. Which classes it manages depends on the model, so
    this tries the classes the model knows (≥ 60 %) from the best known down, and one of them must be
    forgotten on real images. Forgetting the synthetic set does not always transfer (on the seeded
    champion it did for every shape, with up to 2.3 % left, docs/benchmarks.md), so a class that is
    forgotten only on the synthetic set is recorded and the next one tried."""
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    classnames = sorted(SHAPES)
    labels = torch.tensor([classnames.index(r.label) for r in small_records["test"]])
    # Shortened for test time: smaller synthetic set, fewer synthesis steps, a larger lr.
    config = {"seed": 0, "lr": 3e-3, "max_steps": 30, "n_stop_images": 16, "anchor_random_words": 32,
              "synthesis": {"n_images": 32, "min_steps": 100, "max_steps": 120}}

    def accuracies(candidate, target):
        result = zero_shot_accuracy(candidate, tokenizer, test_images, labels, classnames)
        others = labels != target
        return result.per_class[classnames[target]], float((result.predictions[others] == labels[others]).float().mean())

    per_class = zero_shot_accuracy(model, tokenizer, test_images, labels, classnames).per_class
    tried = {}
    for name in sorted((c for c in per_class if per_class[c] >= 0.6), key=per_class.get, reverse=True):
        target = classnames.index(name)
        candidate = copy.deepcopy(model)
        untouched = {n: p.detach().clone() for n, p in candidate.named_parameters() if not n.startswith("transformer.")}
        rows = []
        data = UnlearningData(classnames=classnames, forget_index=target)  # no real image of any class
        result = run_method("lipschitz", candidate, tokenizer, ForgetTarget(kind="class", class_name=name), data, config,
                            progress=rows.append)

        # the mechanics hold whether or not this class was forgotten
        for param, before in untouched.items():  # only text-transformer tensors move (k_visual is 0)
            assert torch.equal(dict(candidate.named_parameters())[param], before), param
        assert rows == result.history and 0 < len(rows) <= 30
        assert {"step", "epoch", "loss", "synthetic_forget_acc", "sigma", "k_visual", "k_text", "layers"} <= set(rows[0])
        assert all(len([n for n in r["layers"] if n.startswith("transformer.")]) == r["k_text"] for r in rows)
        synthetic = result.artifacts["synthetic_images"]
        assert synthetic.dtype == torch.uint8 and synthetic.shape == (48, 3, 32, 32)
        assert all(p.grad is None for p in candidate.parameters())

        tried[name] = {"synthetic": result.summary["synthetic_forget_acc"]}
        if result.summary["synthetic_forget_acc"] <= 0.25:
            forget_before, retain_before = accuracies(model, target)
            forget_after, retain_after = accuracies(candidate, target)
            tried[name].update(real_before=forget_before, real_after=forget_after)
            if forget_after <= 0.5 * forget_before:  # it transferred to real images of the class
                # weak test models lose up to ~10 pt of the other classes (the champion: < 1 pt, docs/benchmarks.md)
                assert retain_after >= retain_before - 0.15, (name, retain_before, retain_after)
                return
    pytest.fail(f"lipschitz forgot none of the classes the model knows on real images (per class: synthetic stop-set "
                f"accuracy, real accuracy before/after): {tried}")
