"""CLIPErase: its three loss terms, and forgetting a class / an association on the small trained CLIP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet, evaluate
from unlearning.methods import ForgetTarget, run_method
from unlearning.methods.cliperase import cliperase_terms
from unlearning.methods.common import random_word, swap_class_names
from unlearning.metrics import encode_images, encode_texts

# The stop rule ends a run as soon as the held-out forget images are forgotten; the step ceiling is
# generous because test models trained on different machines forget at different speeds (a CI
# machine's model needed more than the 40 steps that sufficed here). lr 1e-4: with the attribute
# consistency term on, the test models of ERASURE_TEST_SEED 1 and 3 still had 8 % of their stop
# set left after 200 steps at 6e-5; at 1e-4 they stop in ~110 s, seed 0 in ~20 s.
FAST = {"max_steps": 300, "lr": 1e-4, "stop_forget_accuracy": 0.05, "stop_forget_recall": 0.05}


def _pairs(records, images, n=16):
    return images[:n], [r.caption for r in records[:n]]


def test_consistency_kl_is_zero_when_the_model_is_its_own_teacher(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    images, texts = _pairs(small_records["test"], test_images)
    is_forget = torch.arange(len(images)) < 4
    teacher = copy.deepcopy(model)
    assert float(cliperase_terms(model, teacher, tokenizer, images, texts, is_forget)["consistency"].detach()) == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():  # a changed student must show a positive KL, or the term measures nothing
        model.text_projection.add_(0.05 * torch.randn_like(model.text_projection))
    assert float(cliperase_terms(model, teacher, tokenizer, images, texts, is_forget)["consistency"].detach()) > 1e-4


def _opt_in_term_case(term, trained_bundle, small_records, test_images):
    """A batch whose optional ``term`` is absent unless asked for, and 0 while the model is its
    own teacher; returns what the caller needs to move the model and compute the term again."""
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    images, texts = _pairs(small_records["test"], test_images)
    is_forget = torch.arange(len(images)) < 4
    teacher = copy.deepcopy(model)
    assert term not in cliperase_terms(model, teacher, tokenizer, images, texts, is_forget)
    terms = cliperase_terms(model, teacher, tokenizer, images, texts, is_forget, **{term: True})
    assert float(terms[term].detach()) == pytest.approx(0.0, abs=1e-6)
    return model, teacher, tokenizer, images, texts, is_forget


def test_forget_consistency_is_zero_for_the_teacher_itself_and_grows_when_the_forget_images_move(trained_bundle, small_records, test_images):
    model, teacher, tokenizer, images, texts, is_forget = _opt_in_term_case("forget_consistency", trained_bundle, small_records, test_images)

    with torch.no_grad():  # move the image tower only: the forget images' ranking of the retain texts changes
        model.visual.attnpool.c_proj.weight.add_(0.05 * torch.randn_like(model.visual.attnpool.c_proj.weight))
    terms = cliperase_terms(model, teacher, tokenizer, images, texts, is_forget, forget_consistency=True)
    assert float(terms["forget_consistency"].detach()) > 1e-4


def test_feature_consistency_is_the_retain_pairs_embedding_distance_from_the_teacher(trained_bundle, small_records, test_images):
    model, teacher, tokenizer, images, texts, is_forget = _opt_in_term_case("feature_consistency", trained_bundle, small_records, test_images)

    with torch.no_grad():  # move the text tower only: the term must equal the retain texts' squared drift
        model.text_projection.add_(0.05 * torch.randn_like(model.text_projection))
    terms = cliperase_terms(model, teacher, tokenizer, images, texts, is_forget, feature_consistency=True)
    retain_texts = [t for t, f in zip(texts, is_forget) if not f]
    drift = (encode_texts(model, tokenizer, retain_texts) - encode_texts(teacher, tokenizer, retain_texts)).square().sum(-1).mean()
    assert float(drift) > 1e-4
    assert float(terms["feature_consistency"].detach()) == pytest.approx(float(drift), rel=1e-3)


def test_attribute_consistency_is_zero_for_the_teacher_itself_and_grows_when_the_text_tower_moves(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    records = small_records["test"][:16]
    images, texts = _pairs(small_records["test"], test_images)
    is_forget = torch.arange(len(images)) < 4
    classnames = sorted({r.label for r in records})
    labels = torch.tensor([classnames.index(r.label) for r in records])[~is_forget]
    attribute_texts = swap_class_names([t for t, f in zip(texts, is_forget) if not f], labels, classnames, "blob")
    assert all(r.label not in t and "blob" in t for r, t in zip(records[4:], attribute_texts))
    teacher = copy.deepcopy(model)
    assert "attribute_consistency" not in cliperase_terms(model, teacher, tokenizer, images, texts, is_forget)
    terms = cliperase_terms(model, teacher, tokenizer, images, texts, is_forget, attribute_texts=attribute_texts)
    assert float(terms["attribute_consistency"].detach()) == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():  # move the text tower only: the retain images rank the swapped captions differently
        model.text_projection.add_(0.05 * torch.randn_like(model.text_projection))
    terms = cliperase_terms(model, teacher, tokenizer, images, texts, is_forget, attribute_texts=attribute_texts)
    assert float(terms["attribute_consistency"].detach()) > 1e-4


def test_swap_class_names_replaces_whole_words_of_the_own_class_only():
    classnames = ["square", "red circle"]
    texts = ["a small red square", "squares are not a square.", "a large red circle", "a red square", "a caption"]
    labels = torch.tensor([0, 0, 1, 1, -1])
    assert swap_class_names(texts, labels, classnames, "blob") == [
        "a small red blob", "squares are not a blob.", "a large blob", "a red square", "a caption"]
    assert swap_class_names(["a square"], torch.tensor([0]), classnames, r"x\1") == [r"a x\1"]  # the word is not a regex


def test_random_word_never_returns_part_of_the_avoided_name(trained_bundle):
    class Tokenizer:  # decodes every id to "tri", which is part of the name, except 5
        vocab_size = 10

        def decode(self, ids):
            return "tri" if ids[0] != 5 else "blob"

    assert random_word(Tokenizer(), torch.Generator().manual_seed(0), avoid="triangle") == "blob"
    with pytest.raises(ValueError, match="no word outside 'blobtriangle'"):  # a tokenizer with nothing else to offer
        random_word(Tokenizer(), torch.Generator().manual_seed(0), avoid="blobtriangle")
    words = {random_word(trained_bundle.tokenizer, torch.Generator().manual_seed(i), avoid="triangle") for i in range(20)}
    assert len(words) > 10 and not any(w.lower() in "triangle" for w in words)


def test_forgetting_term_is_the_mean_dot_product_of_forget_pairs(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    images, texts = _pairs(small_records["test"], test_images)
    is_forget = torch.arange(len(images)) % 3 == 0
    terms = cliperase_terms(model, copy.deepcopy(model), tokenizer, images, texts, is_forget)
    expected = (encode_images(model, images[is_forget]) * encode_texts(model, tokenizer, [t for t, f in zip(texts, is_forget) if f])).sum(-1).mean()
    assert float(terms["forgetting"].detach()) == pytest.approx(float(expected), abs=1e-4)
    retain = ~is_forget
    img, txt = encode_images(model, images[retain]), encode_texts(model, tokenizer, [t for t, f in zip(texts, retain) if f])
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    labels = torch.arange(len(img))
    clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert float(terms["retention"].detach()) == pytest.approx(float(clip_loss.detach()), abs=1e-3)


def _best_class(model, tokenizer, eval_set) -> str:
    """The class the model knows best, so that forgetting it is a measurable drop."""
    per_class = evaluate(model, tokenizer, eval_set, []).per_class
    return max(per_class, key=per_class.get)


def test_relabel_teaches_forget_images_their_nearest_other_class_through_the_image_tower(trained_bundle, small_records):
    from unlearning.methods.cliperase import relabel_loss
    from unlearning.methods.common import class_text_features, zero_shot_logits

    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    data = build_unlearning_data(ForgetTarget(kind="class", class_name="circle"), small_records["train"], 32, max_forget=32, max_retain=32)
    images = data.forget.images
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        logits = zero_shot_logits(model, images, class_text_features(model, tokenizer, data.classnames, data.templates))
    assert logits.argmax(1).eq(data.forget_index).float().mean() > 0.5  # the model still calls them circles

    loss = relabel_loss(model, teacher, tokenizer, images, data)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.parameters())  # the image tower learns too
    logits[:, data.forget_index] = float("-inf")  # the loss's labels: the best class that is not the forgotten one
    expected = F.cross_entropy(zero_shot_logits(teacher, images, class_text_features(teacher, tokenizer, data.classnames, data.templates)),
                               logits.argmax(1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_image_shift_pulls_forget_images_towards_the_nearest_other_class_centroid(trained_bundle, small_records):
    from unlearning.methods.cliperase import image_shift_loss, retain_centroids

    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    data = build_unlearning_data(ForgetTarget(kind="class", class_name="circle"), small_records["train"], 32, max_forget=32, max_retain=256)
    teacher = copy.deepcopy(model).requires_grad_(False)
    centroids = retain_centroids(teacher, data)
    assert centroids[data.forget_index].abs().sum() == 0 and (centroids.norm(dim=1) > 0).sum() == len(data.classnames) - 1
    loss = image_shift_loss(model, teacher, data.forget.images, centroids)
    loss.backward()
    assert 0 < loss.item() < 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.transformer.parameters())  # images only


def test_the_deep_preset_starts_from_a_word_the_model_never_read(trained_bundle, small_records):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    target = ForgetTarget(kind="class", class_name="circle")
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_forget=32, max_retain=64, max_val=32)
    token = tokenizer.encode("circle")[0]
    before = model.token_embedding.weight[token].detach().clone()
    result = run_method("cliperase:deep", model, tokenizer, target, data, {"min_steps": 2, "max_steps": 2},
                        original=copy.deepcopy(model).requires_grad_(False))
    assert result.summary["steps"] == 2  # min_steps ran even where the stop rule held
    after = model.token_embedding.weight[token].detach()
    assert F.cosine_similarity(after, before, dim=0) < 0.5  # a fresh embedding, not the trained one nudged
    assert any(k == "relabel" for row in result.history for k in row)


def test_cliperase_forgets_a_class_and_keeps_the_others(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    eval_set = EvalSet(small_records["test"], test_images)
    target = ForgetTarget(kind="class", class_name=_best_class(model, tokenizer, eval_set))
    before = evaluate(model, tokenizer, eval_set, [target]).metrics
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=1024)

    # lr 2e-4: on an fp32-trained test model (2-core AVX2 EPYC) lr 1e-4 took ~190 steps, 183 s; 2e-4 81 steps, 78 s.
    result = run_method("cliperase", model, tokenizer, target, data, {**FAST, "lr": 2e-4}, original=copy.deepcopy(model).requires_grad_(False))

    after = evaluate(model, tokenizer, eval_set, [target]).metrics
    assert before["forget_accuracy"] >= 0.5
    assert result.summary["stopped"] and result.summary["forget_accuracy"] <= FAST["stop_forget_accuracy"], result.summary  # on the stop set
    # Unseen test images of the class follow only partly on the weak test models: a fresh-clone
    # model went from 91.7 % to 25 % while its val stop set reached 4 % (the benchmark measures
    # the real target on the champion: 0.5 % left on average).
    assert after["forget_accuracy"] <= 0.5 * before["forget_accuracy"]
    assert before["retain_accuracy"] - after["retain_accuracy"] <= 0.08
    assert result.summary["steps"] <= FAST["max_steps"]


def test_cliperase_erases_an_association_and_keeps_other_captions(trained_bundle, small_records, test_images):
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    records = small_records["train"] + small_records["val"] + small_records["test"]
    target = ForgetTarget(kind="association", captions=sorted({r.caption for r in records if "red" in r.caption.split()}))
    eval_set = EvalSet(small_records["test"], test_images)
    before = evaluate(model, tokenizer, eval_set, [target]).metrics
    data = build_unlearning_data(target, small_records["train"] + small_records["val"], 32, max_retain=1024)

    # Ranks among ~100 captions flip late (measured: nothing moves for ~25 steps), so this test
    # affords more, smaller steps than the class test.
    config = {**FAST, "lr": 1e-4, "batch_size": 32, "forget_batch_size": 16}
    run_method("cliperase", model, tokenizer, target, data, config, original=copy.deepcopy(model).requires_grad_(False))

    after = evaluate(model, tokenizer, eval_set, [target]).metrics
    assert after["forget_accuracy"] <= 0.5 * before["forget_accuracy"]
    assert before["retain_R@5"] - after["retain_R@5"] <= 0.10
