"""Purge of superseded versions after the rollback window, on real MLflow stores (local folder and S3)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import flow
from test_registry import model_dirs  # noqa: F401  (fixture)

from flows.cli import main
from flows.purge import purge_flow
from tasks import ledger, registry
from tasks.champion import rollback_champion
from tasks.purge import weight_files
from tasks.registry import VersionPurged
from unlearning.models import WEIGHTS_FILE

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _aliases(name: str) -> dict[str, str | None]:
    found = {a: registry.get_version_by_alias(name, a) for a in ("champion", "previous")}
    return {a: None if v is None else str(v.version) for a, v in found.items()}


def _version(name: str, number: str):
    return MlflowClient().get_model_version(name, number)


def _champion_history(settings, folders) -> dict[str, str]:
    """v1 (no erasure, with a run holding a metric, a param, a note and a stray weights copy) replaced
    by v2, which carries the promoted erasure req-a (with a ledger run)."""
    client = MlflowClient()
    experiment_id = registry.configure_mlflow(settings)
    run_v1 = client.create_run(experiment_id, run_name="bootstrap").info.run_id
    client.log_metric(run_v1, "retain_accuracy", 0.9)
    client.log_param(run_v1, "method", "bootstrap")
    client.log_artifact(run_v1, str(folders[0] / WEIGHTS_FILE), "checkpoint")
    client.log_text(run_v1, "trained on the shapes world", "notes.txt")
    v1 = str(registry.register_model_folder(folders[0], settings, {"erasure.request_ids": "[]"}, run_id=run_v1).version)
    v2 = str(registry.register_model_folder(folders[1], settings, {"erasure.request_ids": json.dumps(["req-a"]),
                                                                  "erasure.parent_version": v1}).version)
    request_run = client.create_run(experiment_id, run_name="req-a").info.run_id
    for key, value in {"erasure.kind": "request", ledger.REQUEST_ID: "req-a", ledger.STATUS: "promoted"}.items():
        client.set_tag(request_run, key, value)
    registry.promote(settings.model_name, v1)
    registry.promote(settings.model_name, v2)
    return {"v1": v1, "v2": v2, "run_v1": run_v1, "request_run": request_run}


def _purged_certificate(run_id: str, tmp_path: Path) -> list[dict]:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="certificate/purged.json", dst_path=str(tmp_path))
    return json.loads(Path(local).read_text())


def test_purge_deletes_the_weights_of_versions_missing_a_promoted_erasure(mlflow_store, model_dirs, tmp_path):  # noqa: F811
    name = mlflow_store.model_name
    ids = _champion_history(mlflow_store, model_dirs)
    v1, v2 = ids["v1"], ids["v2"]
    artifacts = Path(mlflow_store.artifact_location)
    assert len(list(artifacts.rglob("*.safetensors"))) == 3  # two logged models and the run's copy

    waiting = purge_flow()  # the default window of 7 days has not passed
    assert (waiting.purged, waiting.would_purge, waiting.window_days) == ([], [], 7)
    assert "inside the rollback window of 7 days" in next(k.reason for k in waiting.kept if k.version == v1)

    dry = purge_flow(window_days=0, dry_run=True)
    assert dry.purged == [] and [(e.version, e.missed_requests) for e in dry.would_purge] == [(v1, ["req-a"])]
    assert {Path(f.path).name for f in dry.would_purge[0].files} == {WEIGHTS_FILE} and len(dry.would_purge[0].files) == 2
    assert len(list(artifacts.rglob("*.safetensors"))) == 3 and "erasure.purged_at" not in _version(name, v1).tags

    report = purge_flow(window_days=0)
    assert [(e.version, len(e.files)) for e in report.purged] == [(v1, 2)] and report.would_purge == []
    assert {k.version: k.reason for k in report.kept} == {v2: "the champion"}

    # weights gone from the logged model and the run; everything else stays
    assert weight_files(_version(name, v1)) == [] and len(weight_files(_version(name, v2))) == 1
    assert len(list(artifacts.rglob("*.safetensors"))) == 1
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        registry.download_version(name, v1, tmp_path / "v1")
    assert (registry.download_version(name, "champion", tmp_path / "v2") / WEIGHTS_FILE).is_file()
    tags = _version(name, v1).tags
    assert tags["status"] == "purged" and tags["erasure.request_ids"] == "[]" and "req-a" in tags["erasure.purged_reason"]
    assert json.loads(tags["erasure.purged_files"]) == {"files": 2, "bytes": report.purged[0].bytes} and report.purged[0].bytes > 0
    run = MlflowClient().get_run(ids["run_v1"])
    assert (run.data.metrics, run.data.params) == ({"retain_accuracy": 0.9}, {"method": "bootstrap"})
    assert "notes.txt" in {a.path for a in MlflowClient().list_artifacts(ids["run_v1"])}
    assert mlflow.models.get_model_info(f"models:/{name}/{v1}").flavors  # MLmodel stays: the registry UI still shows it

    certificate = _purged_certificate(ids["request_run"], tmp_path / "cert")
    assert certificate == [{"model": name, "version": v1, "purged_at": tags["erasure.purged_at"], "files": 2,
                            "bytes": report.purged[0].bytes}]

    again = purge_flow(window_days=0)
    assert again.purged == [] and "already purged" in next(k.reason for k in again.kept if k.version == v1)
    assert _purged_certificate(ids["request_run"], tmp_path / "cert-again") == certificate

    # a rollback to the purged version is refused before any alias moves
    @flow(name="rollback-to-purged")
    def rollback_to_purged() -> dict:
        return rollback_champion(mlflow_store, name, v1, "manual")

    with pytest.raises(VersionPurged, match=f"version {v1} of {name} was purged at .*rollback window of 0 days had passed; it holds no "
                                            f"weights; re-register a model with `erasure register`"):
        rollback_to_purged()
    assert _aliases(name) == {"champion": v2, "previous": v1}
    assert registry.sync_status_tags(name) == {v1: "purged", v2: "champion"}
    assert ledger.find(MlflowClient(), mlflow_store.experiment, "req-a").status == "promoted"


def test_rollback_inside_the_window_still_works(mlflow_store, model_dirs, capsys):  # noqa: F811
    name = mlflow_store.model_name
    ids = _champion_history(mlflow_store, model_dirs)

    assert main(["purge"]) == 0  # the default window: v1 keeps its weights and stays a rollback target
    assert weight_files(_version(name, ids["v1"])) and "erasure.purged_at" not in _version(name, ids["v1"]).tags

    assert main(["rollback", "--reason", "second thoughts"]) == 0
    assert _aliases(name) == {"champion": ids["v1"], "previous": None}
    assert registry.sync_status_tags(name) == {ids["v1"]: "champion", ids["v2"]: "rolled_back"}
    assert ledger.find(MlflowClient(), mlflow_store.experiment, "req-a").status == "pending"


def test_loading_the_champion_leaves_no_copy_of_its_weights_behind(mlflow_store, model_dirs, tmp_path, monkeypatch):  # noqa: F811
    import tempfile

    from tasks.champion import load_champion

    ids = _champion_history(mlflow_store, model_dirs)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    champion = load_champion(mlflow_store)
    assert champion.version == ids["v2"] and champion.bundle.model is not None
    assert not list(scratch.rglob(WEIGHTS_FILE))  # no copy of a version outside the registry's purge


def test_cli_purge_dry_run_lists_and_changes_nothing(mlflow_store, model_dirs, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    name = mlflow_store.model_name
    ids = _champion_history(mlflow_store, model_dirs)
    capsys.readouterr()

    assert main(["purge", "--dry-run", "--window-days", "0"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "would purge" in line)
    assert row.split("│")[1].strip() == ids["v1"] and "req-a" in row and "dry run, nothing changed" in out
    assert weight_files(_version(name, ids["v1"])) and "erasure.purged_at" not in _version(name, ids["v1"]).tags

    assert main(["purge", "--window-days", "-1"]) == 1
    assert "window_days must be >= 0" in capsys.readouterr().err
    assert main(["purge", "--window-days", "0"]) == 0
    assert main(["rollback", "--to", ids["v1"]]) == 1
    assert f"version {ids['v1']} of {name} was purged" in capsys.readouterr().err
    assert _aliases(name) == {"champion": ids["v2"], "previous": ids["v1"]}


def test_purge_on_an_s3_artifact_store(mlflow_store, s3_env, model_dirs, monkeypatch):  # noqa: F811
    from tasks.settings import get_settings

    bucket = s3_env.create_bucket()
    monkeypatch.setenv("ERASURE_ARTIFACT_LOCATION", f"s3://{bucket}/mlflow")
    get_settings.cache_clear()
    settings = get_settings()
    ids = _champion_history(settings, model_dirs)

    def weight_keys() -> list[str]:
        listed = s3_env.client.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])
        return [o["Key"] for o in listed if o["Key"].endswith(".safetensors")]

    assert len(weight_keys()) == 3
    report = purge_flow(window_days=0, settings=settings)
    assert [e.version for e in report.purged] == [ids["v1"]]
    (kept,) = weight_keys()
    assert weight_files(_version(settings.model_name, ids["v2"]))[0].uri == f"s3://{bucket}/{kept}"
    assert weight_files(_version(settings.model_name, ids["v1"])) == []


def test_rollback_window_setting_must_not_be_negative(tmp_path):
    from pydantic import ValidationError

    from tasks.settings import ErasureSettings

    assert ErasureSettings(home=tmp_path, rollback_window_days=0).rollback_window_days == 0
    with pytest.raises(ValidationError, match="ERASURE_ROLLBACK_WINDOW_DAYS"):
        ErasureSettings(home=tmp_path, rollback_window_days=-0.5)
