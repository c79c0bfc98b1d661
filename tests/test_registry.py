"""tasks.registry on a private SQLite store and on a real MLflow server: versions, aliases, serving."""

from __future__ import annotations

import base64
import filecmp
import io
import json
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks.registry import (
    configure_mlflow,
    download_version,
    get_version_by_alias,
    list_versions,
    promote,
    register_model_folder,
    rollback_to,
)
from tasks.settings import ErasureSettings, get_settings
from unlearning.data import load_image
from unlearning.metrics import encode_images, zero_shot_classifier
from unlearning.models import WEIGHTS_FILE, load_model, save_model

TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two randomly initialised TinyCLIP-RN32 folders with different weights."""
    root = tmp_path_factory.mktemp("models")
    return [save_model(load_model("TinyCLIP-RN32", device="cpu"), root / f"m{n}") for n in (1, 2)]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _alias(name: str, alias: str) -> str | None:
    version = get_version_by_alias(name, alias)
    return None if version is None else str(version.version)


def test_settings_derive_the_store_from_home(tmp_path):
    local = ErasureSettings(home=tmp_path / "h")
    assert (local.tracking_uri, local.artifact_location, local.world_dir) == (
        f"sqlite:///{tmp_path}/h/mlflow.db", str(tmp_path / "h" / "mlartifacts"), tmp_path / "h" / "world")
    # A tracking server proxies artifacts itself, so no client-side location is forced on it.
    served = ErasureSettings(home=tmp_path, tracking_uri="http://127.0.0.1:5000")
    assert (served.artifact_location, served.mlflow_ui_url) == (None, "http://127.0.0.1:5000")


def test_experiment_gets_the_configured_artifact_location(mlflow_store):
    experiment = mlflow.get_experiment(configure_mlflow(mlflow_store))

    assert experiment.name == mlflow_store.experiment
    assert experiment.artifact_location.endswith(mlflow_store.artifact_location)


def test_champion_serves_embeddings_and_zero_shot_through_pyfunc(mlflow_store, model_dirs, tmp_path):
    name = mlflow_store.model_name
    version = register_model_folder(model_dirs[0], mlflow_store, {"request_id": "req-1"})
    new, old = promote(name, version.version)

    assert (str(version.version), version.tags) == ("1", {"request_id": "req-1"})
    assert (str(new.version), old) == ("1", None) and _alias(name, "champion") == "1"

    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    bundle = load_model(f"local-dir:{model_dirs[0]}", device="cpu")
    texts = ["a photo of a circle.", "a photo of a small red square."]
    with torch.no_grad():
        expected_text = bundle.model.encode_text(bundle.tokenizer(texts), normalize=True)
    out = served.predict(pd.DataFrame({"text": texts}))
    torch.testing.assert_close(torch.tensor(out["embedding"].tolist()), expected_text, rtol=0, atol=1e-5)

    pngs, classes = [_png(seed) for seed in range(4)], ["circle", "square", "triangle"]
    images = torch.from_numpy(np.stack([load_image(io.BytesIO(p), bundle.image_size) for p in pngs])).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = encode_images(bundle.model, images) @ zero_shot_classifier(bundle.model, bundle.tokenizer, classes, [TEMPLATE])
        expected_probs = (bundle.model.logit_scale.exp() * logits).softmax(dim=-1)
    out = served.predict(pd.DataFrame({"image": pngs}), params={"classnames": classes, "template": TEMPLATE})
    probs = torch.tensor([[row[c] for c in classes] for row in out["probabilities"]])
    torch.testing.assert_close(probs, expected_probs, rtol=0, atol=1e-5)
    assert list(out["label"]) == [classes[i] for i in expected_probs.argmax(dim=-1)]

    as_base64 = served.predict(pd.DataFrame({"image": [base64.b64encode(pngs[0]).decode()]}))
    assert np.allclose(as_base64["embedding"][0], out["embedding"][0], atol=1e-6)
    with pytest.raises(Exception, match="exactly one"):
        served.predict(pd.DataFrame({"text": ["a circle"], "image": [pngs[0]]}))

    folder = download_version(name, "champion", tmp_path / "download")
    assert filecmp.cmp(folder / WEIGHTS_FILE, model_dirs[0] / WEIGHTS_FILE, shallow=False)
    assert load_model(f"local-dir:{folder}", device="cpu").model_cfg == bundle.model_cfg


def test_promote_then_rollback_moves_aliases_and_tags_the_rolled_back_version(mlflow_store, model_dirs, tmp_path):
    name = mlflow_store.model_name
    first = register_model_folder(model_dirs[0], mlflow_store, {"request_id": "a"})
    second = register_model_folder(model_dirs[1], mlflow_store, {"request_id": "b"})
    promote(name, first.version)

    new, old = promote(name, second.version)

    assert (str(new.version), str(old.version)) == ("2", "1")
    assert (_alias(name, "champion"), _alias(name, "previous")) == ("2", "1")
    champion = download_version(name, "champion", tmp_path / "champion")
    assert filecmp.cmp(champion / WEIGHTS_FILE, model_dirs[1] / WEIGHTS_FILE, shallow=False)

    restored, rolled_back = rollback_to(name, "1", reason="retain accuracy fell by 0.10")

    assert (str(restored.version), str(rolled_back.version)) == ("1", "2")
    assert (_alias(name, "champion"), _alias(name, "previous")) == ("1", "2")
    # Status follows the aliases: v2 is still `previous` until rollback_champion moves that alias on.
    assert rolled_back.tags["rollback_reason"] == "retain accuracy fell by 0.10" and "erasure.rolled_back_at" in rolled_back.tags
    assert rolled_back.tags["status"] == "previous" and restored.tags["status"] == "champion"
    assert [str(v.version) for v in list_versions(name)] == ["2", "1"]
    assert get_version_by_alias(name, "no-such-alias") is None
    assert get_version_by_alias("no-such-model", "champion") is None


def test_model_artifacts_can_live_in_s3(mlflow_store, s3_env, model_dirs, tmp_path, monkeypatch):
    bucket = s3_env.create_bucket()
    monkeypatch.setenv("ERASURE_ARTIFACT_LOCATION", f"s3://{bucket}/mlflow")
    # configure_mlflow must hand our endpoint to MLflow's own S3 client.
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
    get_settings.cache_clear()

    version = register_model_folder(model_dirs[0], get_settings(), {})

    keys = [obj["Key"] for obj in s3_env.client.list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]]
    assert any(key.endswith(WEIGHTS_FILE) for key in keys)
    folder = download_version(get_settings().model_name, version.version, tmp_path / "download")
    assert filecmp.cmp(folder / WEIGHTS_FILE, model_dirs[0] / WEIGHTS_FILE, shallow=False)


def test_register_and_alias_over_http(mlflow_server, mlflow_server_store, model_dirs, tmp_path):
    name = mlflow_server_store.model_name
    version = register_model_folder(model_dirs[0], mlflow_server_store, {"request_id": "http"})
    promote(name, version.version)

    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion") as response:
        served = json.load(response)["model_version"]
    tags = {t["key"]: t["value"] for t in served["tags"]}
    assert (served["version"], tags["request_id"], tags["status"]) == (str(version.version), "http", "champion")
    folder = download_version(name, "champion", tmp_path / "download")
    assert filecmp.cmp(folder / WEIGHTS_FILE, model_dirs[0] / WEIGHTS_FILE, shallow=False)
