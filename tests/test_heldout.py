"""Held-out suites on any data: the default on labelled data that is not the shapes world, suites
of one's own from a file, clear errors for bad suites, and no promotion without a held-out metric."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from tasks.request import RequestError, load_request
from unlearning.data import Record, write_manifest
from unlearning.erasure_data import TRAINING_TEMPLATES
from unlearning.evaluation import build_eval_set, check_gates, evaluate
from unlearning.heldout import PARAPHRASE_TEMPLATES, HeldoutSuiteError, template_seen_in
from unlearning.methods.base import ForgetTarget

CIRCLE = ForgetTarget(kind="class", class_name="circle")
GATES = {"max_forget_accuracy": 1.0, "max_retain_drop": 0.02, "max_heldout_drop": 0.02}


def own_data(records: list[Record]) -> list[Record]:
    """The world's images as a user's labelled data: the same labels, attributes under other keys,
    so the world's probes do not apply."""
    return [replace(r, attributes={"hue": r.attributes["colour"], "scale": r.attributes["size"]}) for r in records]


@pytest.fixture(scope="module")
def own_test(small_records):
    return own_data(small_records["test"])


@pytest.fixture(scope="module")
def own_captions(small_records):
    return {r.caption for r in small_records["train"]}


def words_mean(model: torch.nn.Module, tokenizer, words: list[str], meaning: str) -> None:
    """Give ``words`` the token embedding of ``meaning``: prompts using them now say ``meaning``
    too, prompts without them are untouched."""
    blank = {int(t) for t in tokenizer([""]).flatten()}
    ids = sorted({int(t) for t in tokenizer(words).flatten()} - blank)
    with torch.no_grad():
        weight = model.token_embedding.weight
        weight[ids] = weight[int(tokenizer([meaning]).flatten()[1])].clone()


def test_default_suite_on_own_data_is_the_retained_classes_under_unseen_paraphrases(trained_bundle, own_test, own_captions):
    eval_set = build_eval_set(own_test, 32, "auto", own_captions)
    assert (eval_set.heldout.name, eval_set.heldout.kind) == ("paraphrase", "templates")
    assert eval_set.heldout.templates == PARAPHRASE_TEMPLATES  # none of them occurs in the world's captions
    for template in eval_set.heldout.templates:
        assert template_seen_in(template, [*own_captions, *TRAINING_TEMPLATES, *eval_set.class_templates]) is None

    ev = evaluate(trained_bundle.model, trained_bundle.tokenizer, eval_set, [CIRCLE])
    probe = ev.confusions["heldout:paraphrase"]
    assert probe.n == sum(1 for r in own_test if r.label != "circle")  # forget images are no held-out probe
    assert "circle" not in probe.classnames and len(probe.classnames) == 7
    assert ev.metrics["heldout_accuracy"] == ev.metrics["heldout/paraphrase"] > 0.3  # 7 classes: chance is 14 %


def test_default_suite_drops_a_paraphrase_the_captions_already_use(own_test):
    captions = ["a rendering of a small red circle", "A close-up of the blue star"]
    eval_set = build_eval_set(own_test[:4], 32, "auto", captions)
    assert eval_set.heldout.templates == PARAPHRASE_TEMPLATES[2:]


def test_world_keeps_its_own_probes(small_records):
    eval_set = build_eval_set(small_records["test"][:8], 32, "auto")
    assert (eval_set.heldout.name, eval_set.heldout.probes) == ("world", ("colour", "size", "colour_shape"))
    with pytest.raises(HeldoutSuiteError, match='"world" needs'):
        build_eval_set(own_data(small_records["test"][:8]), 32, "world")


def test_a_heldout_drop_fails_the_heldout_gate_alone(trained_bundle, own_test, own_captions):
    eval_set = build_eval_set(own_test, 32, "auto", own_captions)
    model, tokenizer = trained_bundle.model, trained_bundle.tokenizer
    before = evaluate(model, tokenizer, eval_set, [CIRCLE]).metrics
    # Change only the paraphrases' own words, to mean a shape: the class prompt "a photo of a {}."
    # and the captions keep their meaning. Which shape hurts most depends on the test model.
    paraphrase_words = ["rendering", "close", "up", "the", "there", "is", "in", "scene", "example", "an", "snapshot", "one"]
    original = model.token_embedding.weight.detach().clone()
    afters = []
    for shape in ("square", "triangle", "star", "cross", "heart", "crescent", "arrow"):
        words_mean(model, tokenizer, paraphrase_words, shape)
        afters.append(evaluate(model, tokenizer, eval_set, [CIRCLE]).metrics)
        with torch.no_grad():
            model.token_embedding.weight.copy_(original)
    after = min(afters, key=lambda m: m["heldout_accuracy"])
    assert after["retain_accuracy"] == pytest.approx(before["retain_accuracy"])
    assert after["retain_R@5"] == pytest.approx(before["retain_R@5"])
    assert before["heldout_accuracy"] - after["heldout_accuracy"] > 0.1

    gates = check_gates(before, after, **GATES, heldout_suite=eval_set.heldout.label)
    assert [g.name for g in gates if not g.passed] == ["heldout_accuracy_drop"]
    heldout = next(g for g in gates if g.name == "heldout_accuracy_drop")
    assert "paraphrase (templates)" in heldout.description and "probes: paraphrase" in heldout.description


def test_named_suite_from_a_file_probes_its_own_images(tmp_path, trained_bundle, own_test, own_captions):
    probe_images = [r for r in own_test if r.label in ("circle", "square", "star", "heart")]
    write_manifest(probe_images, tmp_path / "probes" / "manifest.jsonl")
    suite = {"name": "four-shapes", "templates": ["a rendering of a {}."],
             "probes": [{"name": "hue", "attribute": "hue", "templates": ["a close-up of something {}."]}],
             "manifest": "probes/manifest.jsonl"}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))

    eval_set = build_eval_set(own_test, 32, str(path), own_captions)
    assert (eval_set.heldout.name, eval_set.heldout.kind, eval_set.heldout.source) == ("four-shapes", "probes", str(path))
    ev = evaluate(trained_bundle.model, trained_bundle.tokenizer, eval_set, [CIRCLE])
    retained_probe_images = sum(1 for r in probe_images if r.label != "circle")
    assert ev.confusions["heldout:four-shapes"].classnames == ["heart", "square", "star"]
    assert ev.confusions["heldout:four-shapes"].n == ev.confusions["heldout:hue"].n == retained_probe_images
    assert ev.metrics["heldout_accuracy"] == pytest.approx((ev.metrics["heldout/four-shapes"] + ev.metrics["heldout/hue"]) / 2)

    # what the version records names the same suite again (the guard re-checks with it)
    again = build_eval_set(own_test, 32, eval_set.heldout.reference, own_captions)
    assert again.heldout.probes == eval_set.heldout.probes and len(again.probe_records) == len(probe_images)


@pytest.mark.parametrize("content, message", [
    ('{"name": "s", "templates": ["a sketch of a thing."]}', r'templates\[0\]: a template holds the class name as "\{\}"'),
    ('{"name": "s", "templatez": ["a sketch of a {}."]}', "templatez: unknown field — allowed: name, templates, probes, manifest"),
    ('{"name": "s", "probes": [{"name": "p", "attribute": "texture", "templates": ["a {} one."]}]}',
     r'probes\[0\]\.attribute: no probe image has the attribute "texture" — use "label" or one of: hue, scale'),
    ('{"name": "s", "probes": [{"name": "p", "templates": []}]}', r"probes\[0\]\.templates: List should have at least 1 item"),
    ('{"name": "s", "templates": ["a picture of a {}."]}', r"templates\[0\]: .* the methods' training prompt"),
    ('{"name": "s", "templates": ["a sketch of a {}."], "manifest": "missing.jsonl"}', "manifest: no file at"),
    ('{"name": "s"', "malformed JSON at line 1"),
    ('{"name": "paraphrase", "templates": ["a sketch of a {}."]}', 'name "paraphrase" is a built-in suite'),
])
def test_bad_suite_file_is_refused_naming_the_field(tmp_path, own_test, content, message):
    path = tmp_path / "suite.json"
    path.write_text(content)
    with pytest.raises(HeldoutSuiteError, match=message) as error:
        build_eval_set(own_test[:8], 32, str(path))
    assert str(path) in str(error.value)


def test_bad_suite_in_a_request_or_setting_is_refused_naming_the_field(monkeypatch):
    base = {"request_id": "r1", "requester": "me", "target": {"kind": "class", "class_name": "circle"}}
    with pytest.raises(RequestError, match=r'^heldout_suite\.probes\[0\]\.templates\[0\]: a template holds'):
        load_request({**base, "heldout_suite": {"name": "s", "probes": [{"name": "p", "templates": ["no slot"]}]}})
    with pytest.raises(RequestError, match=r'^heldout_suite: "heldout\.txt" is neither a built-in suite'):
        load_request({**base, "heldout_suite": "heldout.txt"})
    assert load_request({**base, "heldout_suite": "paraphrase"}).heldout_suite == "paraphrase"

    from pydantic import ValidationError

    from tasks.settings import ErasureSettings

    monkeypatch.setenv("ERASURE_HELDOUT_SUITE", "s3://bucket/suite.json")
    with pytest.raises(ValidationError, match="heldout_suite"):
        ErasureSettings()


def test_no_heldout_metric_means_no_promotion(trained_bundle, own_test):
    # every paraphrase already occurs in the captions: the default suite has no probe left
    eval_set = build_eval_set(own_test, 32, "auto", [t.format("thing") for t in PARAPHRASE_TEMPLATES])
    assert eval_set.heldout.probes == () and eval_set.heldout.note
    metrics = evaluate(trained_bundle.model, trained_bundle.tokenizer, eval_set, [CIRCLE]).metrics
    assert "heldout_accuracy" not in metrics and "retain_accuracy" in metrics

    gates = check_gates(metrics, metrics, **GATES, heldout_suite=eval_set.heldout.label)
    assert [g.name for g in gates if not g.passed] == ["heldout_accuracy_drop"]
    heldout = next(g for g in gates if g.name == "heldout_accuracy_drop")
    assert math.isnan(heldout.value) and "cannot be promoted" in heldout.description
    # a held-out metric on one side only is no check either
    assert not next(g for g in check_gates({**metrics, "heldout_accuracy": 0.9}, metrics, **GATES) if g.name == "heldout_accuracy_drop").passed


@pytest.mark.usefixtures("prefect_harness")
def test_flow_without_a_heldout_metric_rejects_and_reports_the_suite(store):
    from mlflow import MlflowClient

    from flows.erasure import erasure_flow
    from tasks import registry

    # Lenient thresholds: only a missing held-out metric can fail. The suite's one probe offers
    # circle and square; with circle forgotten a single class is left, which checks nothing.
    suite = {"name": "circle-or-square", "probes": [{"name": "two-shapes", "templates": ["a rendering of a {}."],
                                                     "classnames": ["circle", "square"]}]}
    report = erasure_flow({"request_id": "req-no-heldout", "requester": "test@clip-erasure",
                           "target": {"kind": "class", "class_name": "circle"}, "method": "finetune",
                           "method_config": {"max_steps": 4}, "heldout_suite": suite,
                           "gates": {"max_forget_accuracy": 1.0, "max_retain_drop": 1.0, "max_heldout_drop": 1.0}})
    assert report.status == "rejected"
    assert [g.name for g in report.gates if not g.passed] == ["heldout_accuracy_drop"]
    assert "circle-or-square (probes)" in next(g for g in report.gates if g.name == "heldout_accuracy_drop").description
    assert (report.heldout_suite["name"], report.heldout_suite["kind"]) == ("circle-or-square", "probes")
    assert str(registry.get_version_by_alias(store.model_name, "champion").version) == "1"
    params = MlflowClient().get_run(report.mlflow_run_id).data.params
    assert (params["heldout.suite"], params["heldout.kind"]) == ("circle-or-square", "probes")
