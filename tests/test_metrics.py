"""Evaluation primitives on hand-built cases with known answers."""

import pytest
import torch
import torch.nn.functional as F

from unlearning.metrics import accuracy_from_predictions, auc, retrieval_recall, zero_shot_accuracy, zero_shot_classifier


class AxisCLIP(torch.nn.Module):
    """A stand-in CLIP: image i of class c embeds to axis c (plus a little noise); the text
    "... <class c>" embeds to axis c. Zero-shot answers are therefore known exactly."""

    def __init__(self, classnames):
        super().__init__()
        self.classnames = classnames
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.visual = type("V", (), {"image_size": 4})()
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def encode_image(self, x):
        # the class index is written into the first pixel
        index = x[:, 0, 0, 0].round().long()
        return F.one_hot(index, len(self.classnames)).float() + 0.01 * x[:, 1, 0, :len(self.classnames)]

    def encode_text(self, tokens):
        return F.one_hot(tokens, len(self.classnames)).float()


def axis_tokenizer(classnames):
    return lambda texts: torch.tensor([next(i for i, c in enumerate(classnames) if t.endswith(c)) for t in texts])


def images_for(labels):
    x = torch.zeros(len(labels), 3, 4, 4)
    x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float)
    return x


def test_zero_shot_accuracy_per_class_and_confusion_on_known_case():
    classes = ["circle", "square", "star"]
    model, tokenizer = AxisCLIP(classes), axis_tokenizer(classes)
    true = torch.tensor([0, 0, 1, 1, 2, 2])
    shown = [0, 0, 1, 2, 2, 2]  # one square is drawn as a star
    result = zero_shot_accuracy(model, tokenizer, images_for(shown), true, classes, templates=("a photo of a {}", "art of a {}"))
    assert result.accuracy == pytest.approx(5 / 6)
    assert result.per_class == {"circle": 1.0, "square": 0.5, "star": 1.0}
    assert result.confusion.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert result.accuracy_over(["square"]) == pytest.approx(0.5)


def test_template_ensemble_averages_normalised_embeddings():
    classes = ["a", "b"]
    weights = zero_shot_classifier(AxisCLIP(classes), axis_tokenizer(classes), classes, ["x {}", "y {}"])
    assert torch.allclose(weights, torch.eye(2))


def test_accuracy_from_predictions_counts():
    result = accuracy_from_predictions(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["x", "y"])
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.per_class == {"x": 0.5, "y": 1.0}


def test_retrieval_recall_known_ranks():
    texts = torch.eye(4)
    # image 0 matches text 0 best; image 1 ranks its text 2nd; images 2, 3 rank theirs last
    images = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0.9, 0.8, 0.7, 0.1], [0.4, 0.3, 0.2, 0.1]])
    recall = retrieval_recall(images, texts, ks=(1, 2, 4))
    assert recall["i2t_R@1"] == pytest.approx(1 / 4)
    assert recall["i2t_R@2"] == pytest.approx(2 / 4)
    assert recall["i2t_R@4"] == pytest.approx(1.0)


def test_retrieval_counts_identical_captions_as_hits():
    texts = F.normalize(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]]), dim=-1)  # texts 0 and 1 are the same caption
    images = torch.tensor([[0.0, 1.0], [1.0, 0], [0, 1.0]])  # image 0 retrieves text 2 (wrong); image 1 retrieves text 0 (same as its own)
    recall = retrieval_recall(images, texts, ks=(1,))
    assert recall["i2t_R@1"] == pytest.approx(2 / 3)


def test_auc_of_separable_identical_and_reversed_scores():
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert auc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
