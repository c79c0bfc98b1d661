"""`erasure register`: a user's model becomes the champion, scored on the owner's reference data,
and a model or reference manifest that is not usable registers nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from flows.cli import main as cli
from flows.register import register_flow
from tasks import ledger, registry, storage
from tasks.data import file_hash
from tasks.register import REFERENCE_HASH, REFERENCE_MANIFEST, reference_for_champion
from tasks.settings import get_settings
from test_byo import digits_manifest
from unlearning.data import read_manifest, write_manifest
from unlearning.models import WEIGHTS_FILE, load_model, save_model

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny CLIP in open_clip's folder layout. Untrained: registration scores whatever it is given."""
    return save_model(load_model("TinyCLIP-RN32", device="cpu", seed=0), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A small digits manifest: 6 images per digit, two each in train/val/test."""
    return digits_manifest(tmp_path_factory.mktemp("digits"), per_digit=6)


def aliases(name: str) -> dict[str, str | None]:
    found = {a: registry.get_version_by_alias(name, a) for a in ("champion", "previous")}
    return {a: (None if v is None else str(v.version)) for a, v in found.items()}


def versions(name: str) -> list[str]:
    return [str(v.version) for v in registry.list_versions(name)]


def one_error_line(capsys) -> str:
    """The CLI's error: exactly one line on stderr starts with ``erasure register: error:``."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure register: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_register_from_local_dir_sets_champion_with_baseline_and_manifest_hash(mlflow_store, model_dir, reference, capsys):
    assert cli(["register", f"local-dir:{model_dir}", "--reference-manifest", str(reference)]) == 0
    name = mlflow_store.model_name
    assert aliases(name) == {"champion": "1", "previous": None}
    version = MlflowClient().get_model_version(name, "1")
    assert version.tags[REFERENCE_MANIFEST] == str(reference.resolve())
    assert version.tags[REFERENCE_HASH] == file_hash(reference)
    assert json.loads(version.tags["erasure.targets"]) == [] and "erasure.parent_version" not in version.tags
    assert version.tags["status"] == "champion" and version.tags["erasure.source_model"] == f"local-dir:{model_dir}"

    run = MlflowClient().get_run(version.run_id)
    evaluation = json.loads(open(MlflowClient().download_artifacts(version.run_id, "evaluation.json")).read())
    test_rows = read_manifest(reference, split="test")
    per_class = {label: sum(r.label == label for r in test_rows) for label in evaluation["per_class"]}
    # the run's accuracy is the test split's per-class accuracies weighted by class size
    expected = sum(evaluation["per_class"][c] * n for c, n in per_class.items()) / len(test_rows)
    assert run.data.metrics["accuracy"] == pytest.approx(expected)
    assert float(version.tags["erasure.baseline_accuracy"]) == pytest.approx(run.data.metrics["accuracy"], abs=1e-6)
    assert sorted(evaluation["per_class"]) == sorted({r.label for r in test_rows})
    assert int(run.data.params["test_images"]) == len(test_rows)
    artifacts = {a.path for a in MlflowClient().list_artifacts(version.run_id, "plots")}
    assert "plots/per_class.png" in artifacts
    printed = capsys.readouterr().out
    assert f"registered {name} v1" in printed and "champion → v1" in printed

    # the registered folder holds open_clip's layout with safetensors, and loads back to the same weights
    folder = registry.download_version(name, "champion", mlflow_store.home / "dl")
    assert (folder / WEIGHTS_FILE).is_file()
    loaded, original = load_model(f"local-dir:{folder}", device="cpu"), load_model(f"local-dir:{model_dir}", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), original.model.state_dict().values()))


def test_register_over_a_champion_moves_previous_and_reopens_its_requests(mlflow_store, model_dir, reference):
    name = mlflow_store.model_name
    first = registry.register_model_folder(model_dir, mlflow_store, tags={"erasure.targets": json.dumps([{"kind": "class", "class_name": "three"}]),
                                                                           "erasure.request_ids": json.dumps(["req-three"])})
    registry.set_alias(name, "champion", first.version)
    client = MlflowClient()
    run = client.create_run(registry.configure_mlflow(mlflow_store), tags={"erasure.kind": "request", ledger.REQUEST_ID: "req-three"})
    ledger.set_status(client, run.info.run_id, "promoted")

    result = register_flow(f"local-dir:{model_dir}", reference_manifest=reference)
    assert result["version"] == "2" and aliases(name) == {"champion": "2", "previous": "1"}
    assert result["reopened_requests"] == ["req-three"]
    entry = ledger.find(client, mlflow_store.experiment, "req-three")
    assert entry.status == "pending" and "replaced by registered model v2" in entry.reason
    assert json.loads(client.get_model_version(name, "2").tags["erasure.targets"]) == []


def _champion_v1(settings, model_dir) -> None:
    version = registry.register_model_folder(model_dir, settings, tags={"erasure.targets": "[]", "erasure.request_ids": "[]"})
    registry.set_alias(settings.model_name, "champion", version.version)


def _pickle_only(folder: Path, model_dir: Path) -> str:
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((model_dir / "open_clip_config.json").read_text())
    torch.save({"weights": torch.zeros(2)}, folder / "open_clip_pytorch_model.bin")  # written, never read back
    return f"local-dir:{folder}"


def _garbage_config(folder: Path, model_dir: Path) -> str:
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{not json")
    (folder / WEIGHTS_FILE).write_bytes((model_dir / WEIGHTS_FILE).read_bytes())
    return f"local-dir:{folder}"


def _wrong_architecture(folder: Path, model_dir: Path) -> str:
    save_model(load_model("TinyCLIP-ViT32", device="cpu", seed=0), folder)
    (folder / "open_clip_config.json").write_text((model_dir / "open_clip_config.json").read_text())  # weights of another model
    return f"local-dir:{folder}"


@pytest.mark.parametrize("make_ref, message", [
    (lambda folder, model_dir: f"local-dir:{folder / 'nowhere'}", "does not exist"),
    (_pickle_only, "pickled weights (open_clip_pytorch_model.bin)"),
    (_garbage_config, "open_clip_config.json is not valid JSON"),
    (_wrong_architecture, "weights do not fit the architecture"),
    (lambda folder, model_dir: "TinyCLIP-RN32", "randomly initialised"),
], ids=["missing-folder", "pickle-weights", "garbage-config", "wrong-weights", "no-weights"])
def test_unloadable_model_is_one_line_error_and_registers_nothing(mlflow_store, model_dir, reference, tmp_path, capsys, make_ref, message):
    _champion_v1(mlflow_store, model_dir)
    ref = make_ref(tmp_path / "model", model_dir)
    assert cli(["register", ref, "--reference-manifest", str(reference)]) == 1
    error = one_error_line(capsys)
    assert message in error and f"model {ref}" in error
    assert versions(mlflow_store.model_name) == ["1"] and aliases(mlflow_store.model_name) == {"champion": "1", "previous": None}


def _copy(reference: Path, tmp_path: Path) -> Path:
    """The reference manifest and its images copied to ``tmp_path`` (its image paths are relative)."""
    shutil.copytree(reference.parent, tmp_path / "data")
    return tmp_path / "data" / reference.name


def test_reference_manifest_failing_validation_registers_nothing(mlflow_store, model_dir, reference, tmp_path, capsys):
    _champion_v1(mlflow_store, model_dir)
    broken = _copy(reference, tmp_path)
    missing = Path(read_manifest(broken)[0].image_path)
    missing.unlink()
    assert cli(["register", f"local-dir:{model_dir}", "--reference-manifest", str(broken)]) == 1
    error = one_error_line(capsys)
    assert "reference manifest" in error and "image_exists" in error and missing.name in error
    assert versions(mlflow_store.model_name) == ["1"] and aliases(mlflow_store.model_name) == {"champion": "1", "previous": None}


def test_reference_manifest_without_a_test_split_registers_nothing(mlflow_store, model_dir, reference, tmp_path, capsys):
    copy = _copy(reference, tmp_path)
    manifest = write_manifest([r for r in read_manifest(copy) if r.split != "test"], copy.parent / "no-test.jsonl")
    assert cli(["register", f"local-dir:{model_dir}", "--reference-manifest", str(manifest)]) == 1
    assert "no rows with split 'test'" in one_error_line(capsys)
    assert versions(mlflow_store.model_name) == []


def test_register_from_s3_prefix(mlflow_store, s3_env, model_dir, reference):
    bucket = s3_env.create_bucket()
    uri = storage.upload_folder(model_dir, f"s3://{bucket}/models/tiny")
    result = register_flow(uri, name="own-clip", reference_manifest=reference, settings=get_settings())
    assert result["aliases"] == {"champion": "1", "previous": None} and aliases("own-clip")["champion"] == "1"
    assert MlflowClient().get_model_version("own-clip", "1").tags["erasure.source_model"] == uri


def test_later_work_uses_the_registered_reference_and_warns_on_other_data(mlflow_store, model_dir, reference, tmp_path, monkeypatch):
    register_flow(f"local-dir:{model_dir}", reference_manifest=reference)
    # an erasure from the registered model is v2, whose lineage leads back to the registration
    v2 = registry.register_model_folder(model_dir, mlflow_store, tags={"erasure.parent_version": "1"})
    registry.set_alias(mlflow_store.model_name, "champion", v2.version)

    choice = reference_for_champion(get_settings())
    assert choice.manifest == reference.resolve() and choice.settings.reference_manifest == reference.resolve()
    assert choice.warning is None

    copy = _copy(reference, tmp_path)
    other = write_manifest(read_manifest(copy)[:-1], copy.parent / "other.jsonl")
    monkeypatch.setenv("ERASURE_REFERENCE_MANIFEST", str(other))
    get_settings.cache_clear()
    choice = reference_for_champion(get_settings())
    assert choice.manifest == other.resolve() and str(reference.resolve()) in choice.warning and "unset ERASURE_REFERENCE_MANIFEST" in choice.warning
    assert choice.tags["erasure.reference_warning"] == choice.warning
