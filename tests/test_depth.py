"""Depth measures: the probe, kNN, relearning curve and the whole set on the small world."""

from __future__ import annotations

import time

import pytest
import torch

from unlearning.data import load_images
from unlearning.depth import (
    depth_measures,
    distance_to,
    knn_predict,
    knn_recall,
    linear_probe_accuracy,
    relearn_curve,
    unseen_paraphrases,
)
from unlearning.erasure_data import _spread
from unlearning.evidence import forget_membership_auc
from unlearning.heldout import PARAPHRASE_TEMPLATES
from unlearning.methods import ForgetTarget, LabelledImages
from unlearning.models import state_copy
from unlearning.world import SHAPES


def _blobs(centres: torch.Tensor, counts: list[int], spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian points around each centre, ``counts[i]`` of label i."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([centre + spread * torch.randn(n, centres.shape[1], generator=generator) for centre, n in zip(centres, counts)])
    return x, torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])


def _probe_sets(counts: list[int], spread: float, dims: int = 16):
    centres = torch.zeros(2, dims)
    centres[1, 0] = 1.0  # the target sits one unit away along the first axis
    return [_blobs(centres, counts, spread, seed) for seed in (0, 1, 2)]


def test_probe_separates_separable_embeddings_even_when_the_target_is_rare():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = _probe_sets([400, 20], spread=0.1)
    assert linear_probe_accuracy(train_x, train_y, val_x, val_y, test_x, test_y) > 0.97


def test_probe_is_at_chance_on_labels_unrelated_to_the_embeddings():
    generator = torch.Generator().manual_seed(3)
    x = [torch.randn(400, 16, generator=generator) for _ in range(3)]
    y = [(torch.rand(400, generator=generator) < 0.3).long() for _ in range(3)]
    assert abs(linear_probe_accuracy(x[0], y[0], x[1], y[1], x[2], y[2]) - 0.5) < 0.1


def test_probe_is_deterministic_and_refuses_a_single_class():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = _probe_sets([200, 50], spread=0.6)
    first = linear_probe_accuracy(train_x, train_y, val_x, val_y, test_x, test_y)
    assert 0.5 < first < 1.0  # overlapping clusters: neither trivial nor chance
    assert linear_probe_accuracy(train_x, train_y, val_x, val_y, test_x, test_y) == first
    with pytest.raises(ValueError, match="train_y"):
        linear_probe_accuracy(train_x, torch.zeros_like(train_y), val_x, val_y, test_x, test_y)


def test_knn_recalls_well_separated_clusters_and_loses_a_merged_one():
    centres = torch.eye(3, 8) * 4
    bank_x, bank_labels = _blobs(centres, [30, 30, 30], spread=0.3, seed=0)
    query_x, query_labels = _blobs(centres, [10, 10, 10], spread=0.3, seed=1)
    assert knn_recall(bank_x, bank_labels, query_x, query_labels, 2) == 1.0

    # The target (2) now lives inside class 1's cluster and is outnumbered there.
    merged = centres.clone()
    merged[2] = merged[1]
    bank_x, bank_labels = _blobs(merged, [30, 30, 6], spread=0.3, seed=0)
    query_x, query_labels = _blobs(merged, [10, 10, 10], spread=0.3, seed=1)
    assert knn_recall(bank_x, bank_labels, query_x, query_labels, 2) < 0.3
    assert knn_recall(bank_x, bank_labels, query_x, query_labels, [1, 2]) == 1.0  # either counts as a target
    assert knn_recall(bank_x, bank_labels, query_x, query_labels, 7) != knn_recall(bank_x, bank_labels, query_x, query_labels, 7)  # NaN


def test_knn_breaks_a_tie_for_the_nearest_neighbour():
    bank_x = torch.tensor([[1.0, 0.1], [1.0, -0.3], [1.0, 0.6], [1.0, -0.8]])
    bank_labels = torch.tensor([5, 3, 5, 3])  # two votes each among the 4 nearest
    assert knn_predict(bank_x, bank_labels, torch.tensor([[1.0, 0.0]]), k=4).tolist() == [5]
    assert knn_predict(bank_x, bank_labels, torch.tensor([[1.0, -0.25]]), k=4).tolist() == [3]
    # A majority outvotes the nearest neighbour.
    assert knn_predict(torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.2]]), torch.tensor([3, 5, 5]), torch.tensor([[1.0, 0.0]]),
                       k=3).tolist() == [5]


def test_distance_to_the_oracle_is_per_shared_measure():
    assert distance_to({"depth/knn": 0.9, "depth/probe": 0.5, "x": 1.0}, {"depth/knn": 0.6, "depth/probe": 0.75}) == pytest.approx(
        {"depth/knn": 0.3, "depth/probe": 0.25})


def test_unseen_paraphrases_leave_out_a_phrasing_the_captions_use():
    assert unseen_paraphrases([]) == PARAPHRASE_TEMPLATES
    kept = unseen_paraphrases(["A rendering of a small red circle", "a photo of a star"])
    assert "a rendering of a {}." not in kept and len(kept) == len(PARAPHRASE_TEMPLATES) - 1


def _labelled(records, images, label: int) -> LabelledImages:
    return LabelledImages(images, [r.caption for r in records], torch.full((len(records),), label))


def test_relearning_teaches_a_class_name_the_model_never_saw(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer

    shape = SHAPES.index("circle")
    attack_rows = [r for r in small_records["train"] if r.label == "circle"][:8]
    test_rows = [i for i, r in enumerate(small_records["test"]) if r.label == "circle"]
    attack = _labelled(attack_rows, load_images(attack_rows, 32), shape)
    evaluation = _labelled([small_records["test"][i] for i in test_rows], test_images[test_rows], shape)
    # The circle under a made-up name: the model knows the shape but not the word, as after an
    # erasure that removed only the name.
    classnames = [*SHAPES[:shape], "zorblat", *SHAPES[shape + 1:]]
    state = state_copy(model)

    curve = relearn_curve(model, tokenizer, attack, evaluation, classnames, checkpoints=(20, 0, 10))

    assert list(curve) == [0, 10, 20]
    assert curve[0] <= 0.3 and curve[20] >= curve[0] + 0.4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture
def reference(small_records):
    return small_records["train"] + small_records["val"] + small_records["test"]


def test_depth_measures_of_a_class_are_all_there_and_bounded(trained_bundle, small_records, reference, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target = ForgetTarget(kind="class", class_name="circle")
    state = state_copy(model)

    started = time.perf_counter()
    measures = depth_measures(model, tokenizer, target, reference, image_size=32, images={"test": test_images})
    elapsed = time.perf_counter() - started

    keys = [f"depth/relearn@{n}" for n in (0, 5, 10, 20)] + ["depth/probe", "depth/knn", "depth/mia_auc", "depth/paraphrase",
                                                              "depth/forget_R@5"]
    assert list(measures) == keys
    assert all(0.0 <= v <= 1.0 for v in measures.values()), measures
    assert measures["depth/probe"] > 0.6  # the trained model's features tell circles apart
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert elapsed < 90  # seconds on the tiny model; the bound only catches a gross regression on a loaded machine

    # The MIA is evidence's own, computed on shared features: same members, same signal.
    members = _spread([r for r in small_records["train"] if r.label == "circle"], 256, 0)
    test_rows = [i for i, r in enumerate(small_records["test"]) if r.label == "circle"]
    classnames = sorted(SHAPES)  # the reference data's classes, in their order
    label = classnames.index("circle")
    expected = forget_membership_auc(model, tokenizer, _labelled(members, load_images(members, 32), label),
                                     _labelled([small_records["test"][i] for i in test_rows], test_images[test_rows], label),
                                     classnames=classnames)
    assert measures["depth/mia_auc"] == pytest.approx(expected, abs=1e-6)


def test_depth_measures_of_an_association_are_its_pairs_only(trained_bundle, small_records, reference, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    # The world's train and test captions differ: one of each, so that the pairs have members and unseen ones.
    shape = small_records["test"][0].label
    target = ForgetTarget(kind="association", captions=[small_records["test"][0].caption, f"a picture of a {shape}"])

    measures = depth_measures(model, tokenizer, target, reference, image_size=32)

    assert set(measures) == {"depth/mia_auc", "depth/forget_R@5"} and all(0.0 <= v <= 1.0 for v in measures.values())
    assert depth_measures(model, tokenizer, target, reference, image_size=32, images={"test": test_images}) == measures
    with pytest.raises(ValueError, match=r"images\['test'\]"):
        depth_measures(model, tokenizer, target, reference, image_size=32, images={"test": test_images[:5]})


def test_targets_of_one_model_share_its_image_features(trained_bundle, reference, test_images, monkeypatch):
    import unlearning.depth

    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    targets = [ForgetTarget(kind="class", class_name=c) for c in ("circle", "square")]
    alone = [depth_measures(model, tokenizer, t, reference, image_size=32, images={"test": test_images}) for t in targets]

    encoded_rows = []
    encode = unlearning.depth.encode_images
    monkeypatch.setattr(unlearning.depth, "encode_images", lambda m, pixels, *a, **k: encoded_rows.append(len(pixels)) or encode(m, pixels, *a, **k))
    memo: dict = {}
    shared = [depth_measures(model, tokenizer, targets[0], reference, image_size=32, images={"test": test_images}, encoded=memo)]
    first = sum(encoded_rows)
    shared.append(depth_measures(model, tokenizer, targets[1], reference, image_size=32, images={"test": test_images}, encoded=memo))
    second = sum(encoded_rows) - first

    for one, other in zip(alone, shared):
        assert one.keys() == other.keys() and all(other[k] == pytest.approx(v, abs=1e-4) for k, v in one.items())
    assert first >= len(test_images) + 256  # the test split, the probe bank, the members, the val images
    assert 0 < second <= 256  # the second target's own members only: nothing else is encoded again
