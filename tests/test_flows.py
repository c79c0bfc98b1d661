"""The erasure, guard and bootstrap flows end to end: Prefect's test server, a temporary MLflow
store, the small shapes world and the tiny CLIP trained on it."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from flows.erasure import erasure_flow
from flows.guard import guard_flow
from tasks import ledger, registry
from tasks.request import RequestError, load_request
from tasks.settings import get_settings

pytestmark = pytest.mark.usefixtures("prefect_harness")

# Lenient gates: the test model is small and trained for minutes, so it has less to keep, and its
# unseen test images follow the forgotten stop set only partly. These tests check the pipeline;
# the benchmark checks the methods.
GATES = {"max_forget_accuracy": 0.25, "max_retain_drop": 0.10, "max_heldout_drop": 0.10}
# The stop rule ends the run once circles are forgotten; the ceiling is generous because models
# trained on other machines forget at other speeds. lr 1e-4 as in test_cliperase: with the
# attribute consistency term, lr 3e-5 took these tests from ~40 s to ~85 s each (1e-4: ~50 s).
FAST = {"max_steps": 300, "lr": 1e-4}


def request(request_id: str, **overrides) -> dict:
    body = {"request_id": request_id, "requester": "test@clip-erasure", "target": {"kind": "class", "class_name": "circle"},
            "method": "cliperase", "gates": GATES, "method_config": FAST}
    return {**body, **overrides}


def aliases(settings) -> dict[str, str | None]:
    found = {a: registry.get_version_by_alias(settings.model_name, a) for a in ("champion", "previous")}
    return {a: (None if v is None else str(v.version)) for a, v in found.items()}


def version_count(settings) -> int:
    return len(registry.list_versions(settings.model_name))


def test_happy_path_promotes_and_records_everything(store, monkeypatch):
    monkeypatch.setenv("ERASURE_DEPTH_EVIDENCE", "true")  # the default outside the tests
    get_settings.cache_clear()
    report = erasure_flow(request("req-happy"))
    assert report.status == "promoted", report.gates
    assert aliases(store) == {"champion": report.model_version, "previous": "1"}
    assert report.after["forget_accuracy"] <= GATES["max_forget_accuracy"]
    assert report.timings.unlearn_s > 0 and report.timings.evaluate_s > 0

    version = MlflowClient().get_model_version(store.model_name, report.model_version)
    assert json.loads(version.tags["erasure.targets"]) == [{"kind": "class", "class_name": "circle"}]
    assert json.loads(version.tags["erasure.request_ids"]) == ["req-happy"]
    assert version.tags["erasure.parent_version"] == "1" and version.tags["erasure.method"] == "cliperase"

    entry = ledger.find(MlflowClient(), store.experiment, "req-happy")
    assert entry.status == "promoted" and entry.model_version == report.model_version
    artifacts = {a.path for a in MlflowClient().list_artifacts(entry.run_id)}
    assert {"certificate", "gates", "plots", "validation", "request.json"} <= artifacts
    certificate = json.loads(open(MlflowClient().download_artifacts(entry.run_id, "certificate/certificate.json")).read())
    assert certificate["decision"] == "promoted" and certificate["model_version"] == report.model_version
    depth = certificate["depth"]  # the depth evidence, beside the champion's before the erasure
    assert {"depth/relearn@10", "depth/probe", "depth/knn", "depth/mia_auc", "depth/paraphrase", "depth/forget_R@5"} <= set(depth["after"])
    assert set(depth["before"]) == set(depth["after"]) and depth["oracle"] is None  # no oracle is cached for the test model
    assert depth["after"]["depth/relearn@0"] < depth["before"]["depth/relearn@0"]
    assert "Depth of forgetting" in open(MlflowClient().download_artifacts(entry.run_id, "certificate/certificate.md")).read()
    assert {a.path for a in MlflowClient().list_artifacts(entry.run_id, "plots")} >= {"plots/depth.png"}

    # idempotent: the same request id is answered from the ledger, nothing new is registered
    again = erasure_flow(request("req-happy"))
    assert again.idempotent and again.status == "promoted"
    assert version_count(store) == 2


def test_failing_gate_registers_rejected_and_keeps_champion(store, monkeypatch):
    # fine-tuning on retain forgets nothing in a few steps: the forget gate must fail, and so must
    # a depth gate switched on (circles still cluster together in image space)
    monkeypatch.setenv("ERASURE_DEPTH_EVIDENCE", "true")
    get_settings.cache_clear()
    report = erasure_flow(request("req-reject", method="finetune", method_config={"max_steps": 8},
                                  gates={**GATES, "max_knn_recall": 0.05}))
    assert report.status == "rejected"
    assert {"forget_accuracy", "knn_recall"} <= {g.name for g in report.gates if not g.passed}
    assert "relearn_accuracy" not in {g.name for g in report.gates}  # switched off: not a gate
    assert aliases(store) == {"champion": "1", "previous": None}
    version = MlflowClient().get_model_version(store.model_name, report.model_version)
    assert version.tags["status"] == "rejected"
    assert ledger.find(MlflowClient(), store.experiment, "req-reject").status == "rejected"


def test_guard_rolls_back_and_reopens_the_requests(store, monkeypatch):
    # A quick promotion under open gates (four fine-tuning steps): the guard is what is tested, and
    # the circle it promised to forget is still known, which the guard's forget check must catch.
    open_gates = {"max_forget_accuracy": 1.0, "max_retain_drop": 1.0, "max_heldout_drop": 1.0}
    promoted = erasure_flow(request("req-guarded", method="finetune", method_config={"max_steps": 4}, gates=open_gates))
    assert promoted.status == "promoted"
    monkeypatch.setenv("ERASURE_MIN_RETAIN_ACCURACY", "0.3")  # the small test model's level
    monkeypatch.setenv("ERASURE_MAX_FORGET_ACCURACY", "1.0")
    get_settings.cache_clear()
    assert guard_flow()["passed"]

    monkeypatch.setenv("ERASURE_MIN_RETAIN_ACCURACY", "0.999")  # the regression suite now demands more
    monkeypatch.setenv("ERASURE_MAX_FORGET_ACCURACY", str(GATES["max_forget_accuracy"]))  # and the circle must be gone
    get_settings.cache_clear()
    verdict = guard_flow()
    assert not verdict["passed"] and verdict["rollback"]["champion"] == "1"
    assert [f.split()[0] for f in verdict["failures"]] == ["retain", "forget"]
    assert aliases(store)["champion"] == "1" and aliases(store)["previous"] != promoted.model_version
    rolled = MlflowClient().get_model_version(store.model_name, promoted.model_version)
    assert rolled.tags["status"] == "rolled_back"
    entry = ledger.find(MlflowClient(), store.experiment, "req-guarded")
    assert entry.status == "pending" and "rolled back" in entry.reason


def test_crash_after_registration_leaves_aliases_unchanged(store, monkeypatch):
    import tasks.stages

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash while writing the certificate")

    monkeypatch.setattr(tasks.stages, "write_certificate", crash)
    open_gates = {"max_forget_accuracy": 1.0, "max_retain_drop": 1.0, "max_heldout_drop": 1.0}  # a quick promotion
    with pytest.raises(RuntimeError, match="injected crash"):
        erasure_flow(request("req-crash", method="finetune", method_config={"max_steps": 4}, gates=open_gates))
    assert aliases(store) == {"champion": "1", "previous": None}
    assert version_count(store) == 2  # registered for audit, never served
    assert ledger.find(MlflowClient(), store.experiment, "req-crash").status == "failed"


def test_unknown_class_fails_before_training_and_changes_nothing(store):
    with pytest.raises(ValueError, match="dragon"):
        erasure_flow(request("req-dragon", target={"kind": "class", "class_name": "dragon"}))
    assert aliases(store) == {"champion": "1", "previous": None} and version_count(store) == 1
    assert ledger.find(MlflowClient(), store.experiment, "req-dragon").status == "failed"


def test_malformed_request_is_refused_before_the_flow():
    with pytest.raises(RequestError, match="target"):
        load_request(json.dumps({"request_id": "x", "requester": "me", "target": {"kind": "planet"}}))
