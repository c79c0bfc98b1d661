"""Bad input never harms state: each case ends with one clear error and leaves the registry,
the aliases and earlier requests untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import main as cli
from flows.erasure import erasure_flow
from tasks import ledger, registry
from tasks.request import RequestError, load_request
from unlearning.data import read_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def untouched(settings) -> None:
    """Champion still v1, no new version, no previous alias."""
    assert [str(v.version) for v in registry.list_versions(settings.model_name)] == ["1"]
    assert str(registry.get_version_by_alias(settings.model_name, "champion").version) == "1"
    assert registry.get_version_by_alias(settings.model_name, "previous") is None


def forget_manifest(tmp_path: Path, small_records, rows: int = 6) -> Path:
    """A forget manifest of real circle images copied next to it."""
    circles = [r for r in small_records["val"] if r.label == "circle"][:rows]
    folder = tmp_path / "forget"
    (folder / "images").mkdir(parents=True)
    copies = []
    for r in circles:
        target = folder / "images" / Path(r.image_path).name
        shutil.copy(r.image_path, target)
        copies.append(r.__class__(str(target), r.label, r.caption, "forget", r.attributes))
    return write_manifest(copies, folder / "manifest.jsonl")


def run(request_id: str, **fields) -> dict:
    body = {"request_id": request_id, "requester": "test", "target": {"kind": "class", "class_name": "circle"},
            "method": "cliperase", "method_config": {"max_steps": 5}, **fields}
    return erasure_flow(body)


@pytest.mark.parametrize("body, field", [
    ({"request_id": "r1", "requester": "me", "target": {"kind": "class"}}, "target.class_name"),
    ({"request_id": "r1", "requester": "me", "target": {"kind": "class", "class_name": "circle"}, "colour": "red"}, "colour"),
    ({"request_id": "../r1", "requester": "me", "target": {"kind": "class", "class_name": "circle"}}, "request_id"),
    ({"request_id": "r1", "requester": "me", "target": {"kind": "class", "class_name": "circle"}, "method": "forgetall"}, "method"),
])
def test_malformed_request_names_the_field(body, field):
    with pytest.raises(RequestError) as error:
        load_request(json.dumps(body))
    assert field in str(error.value)


def test_malformed_request_file_via_cli_exits_1_with_one_line(store, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"request_id": "r1", "requester": "me", "target": {"kind": "class"}')  # truncated JSON
    assert cli(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    untouched(store)


def test_unknown_method_config_key_fails_before_training(store):
    with pytest.raises(ValueError, match="method_config.learning_rate"):
        run("cfg", method_config={"learning_rate": 1.0})
    untouched(store)


def test_unknown_class(store):
    with pytest.raises(ValueError, match="dragon"):
        run("dragon", target={"kind": "class", "class_name": "dragon"})
    untouched(store)


def test_empty_forget_manifest(store, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="not_empty|empty"):
        run("empty", forget_manifest=str(empty))
    untouched(store)


def test_corrupt_image(store, tmp_path, small_records):
    manifest = forget_manifest(tmp_path, small_records)
    Path(read_manifest(manifest)[0].image_path).write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="image_decodes"):
        run("corrupt", forget_manifest=str(manifest))
    untouched(store)


def test_path_traversal(store, tmp_path, small_records):
    manifest = forget_manifest(tmp_path, small_records)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["image_path"] = "../../etc/passwd.png"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="image_inside_root"):
        run("traversal", forget_manifest=str(manifest))
    untouched(store)


def test_missing_s3_object(store, s3_env):
    s3_env.create_bucket("erasure-data")
    with pytest.raises(FileNotFoundError, match="s3://erasure-data/nothing/manifest.jsonl"):
        run("s3-missing", forget_manifest="s3://erasure-data/nothing/manifest.jsonl")
    untouched(store)


def test_duplicate_request_id_reports_the_earlier_result(store, monkeypatch):
    import tasks.stages

    gates = {"max_forget_accuracy": 0.05, "max_retain_drop": 0.1, "max_heldout_drop": 0.1}
    first = run("dup", method="finetune", gates=gates)
    assert first.status == "rejected"
    versions = len(registry.list_versions(store.model_name))
    monkeypatch.setattr(tasks.stages, "prepare_data", lambda *a, **k: pytest.fail("a duplicate must not run again"))
    again = run("dup", method="finetune", gates=gates)
    assert again.idempotent and again.status == "rejected"
    with pytest.raises(ledger.RequestConflict, match="dup"):  # same id, other content: refused, not answered
        run("dup", method="finetune")
    assert len(registry.list_versions(store.model_name)) == versions
    assert len([e for e in ledger.entries(MlflowClient(), store.experiment) if e.request_id == "dup"]) == 1


def test_forget_row_of_another_class_is_refused_naming_it(store, tmp_path, small_records):
    manifest = forget_manifest(tmp_path, small_records)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[2]["label"] = "square"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf'forget_row_in_target failed for 1 row \(e.g. {rows[2]["image_path"]} \(labelled "square", row 3\)'):
        run("wrong-label", forget_manifest=str(manifest))
    untouched(store)


def test_a_forget_set_fetched_from_s3_is_gone_when_its_update_ends(store, s3_env, tmp_path, small_records, monkeypatch):
    from tasks.settings import get_settings
    from tasks.storage import upload_folder

    manifest = forget_manifest(tmp_path, small_records)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows = [{**r, "image_path": f"images/{Path(r['image_path']).name}"} for r in rows]  # relative: fetched with the manifest
    rows[2]["label"] = "square"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bucket = s3_env.create_bucket()
    upload_folder(manifest.parent, f"s3://{bucket}/requests/fetched")
    fetched = tmp_path / "fetched"
    monkeypatch.setenv("ERASURE_FETCH_DIR", str(fetched))
    get_settings.cache_clear()
    # the refusal names the manifest by its local copy: it was fetched under the fetch folder
    with pytest.raises(ValueError, match=rf"^forget manifest {fetched}/erasure-fetched-\w+/manifest-\w+/{bucket}/requests/fetched/manifest.jsonl: "
                                         r"check forget_row_in_target failed for 1 row"):
        run("fetched-then-refused", forget_manifest=f"s3://{bucket}/requests/fetched/manifest.jsonl")
    assert fetched.is_dir() and not list(fetched.iterdir())  # the forget images left with the update
    untouched(store)


def test_unknown_subgroup_value_fails_before_any_work_listing_known_values(store, monkeypatch):
    import tasks.data

    monkeypatch.setattr(tasks.data, "cached_validate_request_data", lambda *a, **k: pytest.fail("validation ran for an unknown target"))
    with pytest.raises(ValueError, match=r"^target.value: .*'teal'.* known values: .*red"):
        run("teal", target={"kind": "subgroup", "class_name": "circle", "attribute": "colour", "value": "teal"})
    untouched(store)
