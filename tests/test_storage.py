"""tasks.storage against a real S3 API (SeaweedFS): models and manifests round-trip, unsafe paths don't."""

from __future__ import annotations

import io
import json
import secrets

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tasks.settings import ErasureSettings, get_settings
from tasks.storage import fetch_manifest, parse_s3_uri, resolve_model_ref, upload_folder
from unlearning.data import read_manifest
from unlearning.models import WEIGHTS_FILE, load_model, save_model


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    """A randomly initialised TinyCLIP-RN32 saved in open_clip's folder layout."""
    return save_model(load_model("TinyCLIP-RN32", device="cpu"), tmp_path_factory.mktemp("model") / "m1")


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """One bucket for the module: SeaweedFS grows volumes per bucket, so buckets cost ~0.5 s each."""
    return s3_server.create_bucket()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own inside the shared bucket."""
    return f"t-{secrets.token_hex(4)}"


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _put_manifest(server, bucket: str, key: str, image_paths: list[str]) -> str:
    rows = [{"image_path": path, "label": "circle", "caption": "a photo of a circle.", "split": "forget"} for path in image_paths]
    server.client.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(row) + "\n" for row in rows).encode())
    return f"s3://{bucket}/{key}"


def test_model_folder_round_trips_through_s3_bit_for_bit(s3_env, bucket, prefix, random_model_dir, tmp_path):
    upload_folder(random_model_dir, f"s3://{bucket}/{prefix}/models/m1")
    # A sibling whose name extends the prefix must not leak into the download.
    s3_env.client.put_object(Bucket=bucket, Key=f"{prefix}/models/m10/decoy.txt", Body=b"x")

    ref = resolve_model_ref(f"s3://{bucket}/{prefix}/models/m1", None, tmp_path / "cache")

    assert ref.startswith("local-dir:")
    assert sorted(p.name for p in (tmp_path / "cache" / bucket / prefix / "models" / "m1").iterdir()) == sorted(
        p.name for p in random_model_dir.iterdir())
    original, loaded = load_file(random_model_dir / WEIGHTS_FILE), load_model(ref, "cpu").model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[name], loaded[name]) for name in original)


def test_non_s3_refs_pass_through_unchanged(tmp_path):
    for ref in ("TinyCLIP-RN32", "ViT-B-32:openai", f"local-dir:{tmp_path}"):
        assert resolve_model_ref(ref, ErasureSettings(), tmp_path) == ref


def test_fetch_manifest_downloads_referenced_images(s3_env, bucket, prefix, tmp_path, monkeypatch):
    shared = s3_env.create_bucket()
    client = s3_env.client
    for n in range(3):
        client.put_object(Bucket=bucket, Key=f"{prefix}/r1/images/{n}.png", Body=_png(n))
    client.put_object(Bucket=shared, Key="pool/3.png", Body=_png(3))
    monkeypatch.setenv("ERASURE_ALLOWED_BUCKETS", f"{bucket},{shared}")
    get_settings.cache_clear()
    uri = _put_manifest(s3_env, bucket, f"{prefix}/r1/manifest.jsonl",
                        ["images/0.png", "./images/1.png", "images/2.png", f"s3://{shared}/pool/3.png"])

    local = fetch_manifest(uri, tmp_path / "fetched")

    records = read_manifest(local)
    assert local == tmp_path / "fetched" / bucket / prefix / "r1" / "manifest.jsonl"
    assert [open(r.image_path, "rb").read() for r in records] == [_png(n) for n in range(4)]
    assert all(r.split == "forget" and r.label == "circle" for r in records)


@pytest.mark.parametrize("image_path", [
    "../escape.png",
    "images/../../escape.png",
    "/etc/passwd",
    "s3://other-bucket/x.png",
    "https://example.com/x.png",
    "images\\..\\..\\x.png",
])
def test_fetch_manifest_rejects_paths_outside_prefix_and_allowed_buckets(s3_env, bucket, prefix, tmp_path, image_path):
    client = s3_env.client
    # Real objects on both sides of the boundary: rejection must not depend on existence, and
    # must come before any download.
    client.put_object(Bucket=bucket, Key=f"{prefix}/r1/images/a.png", Body=_png(0))
    client.put_object(Bucket=bucket, Key=f"{prefix}/escape.png", Body=_png(1))
    uri = _put_manifest(s3_env, bucket, f"{prefix}/r1/manifest.jsonl", ["images/a.png", image_path])

    with pytest.raises(ValueError, match="escapes|not allowed|must be relative"):
        fetch_manifest(uri, tmp_path / "fetched")
    assert not list(tmp_path.rglob("*.png"))


def test_manifest_outside_allowed_buckets_is_rejected(s3_env, bucket, prefix, tmp_path, monkeypatch):
    uri = _put_manifest(s3_env, bucket, f"{prefix}/manifest.jsonl", ["a.png"])
    monkeypatch.setenv("ERASURE_ALLOWED_BUCKETS", "somewhere-else")
    get_settings.cache_clear()

    with pytest.raises(ValueError, match="not allowed"):
        fetch_manifest(uri, tmp_path)


def test_missing_objects_give_one_line_errors_naming_the_uri(s3_env, bucket, prefix, tmp_path):
    uri = _put_manifest(s3_env, bucket, f"{prefix}/r1/manifest.jsonl", ["images/missing.png"])
    cases = [
        (lambda: fetch_manifest(f"s3://{bucket}/{prefix}/nothing/manifest.jsonl", tmp_path), f"s3://{bucket}/{prefix}/nothing/manifest.jsonl"),
        (lambda: fetch_manifest(uri, tmp_path), f"s3://{bucket}/{prefix}/r1/images/missing.png"),
        (lambda: resolve_model_ref(f"s3://{bucket}/{prefix}/models/none", None, tmp_path), f"s3://{bucket}/{prefix}/models/none"),
        (lambda: resolve_model_ref("s3://no-such-bucket-here/m", None, tmp_path), "s3://no-such-bucket-here/m"),
    ]
    for call, named in cases:
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert named in str(error.value) and "\n" not in str(error.value)


def test_wrong_or_missing_credentials_are_reported_as_permission_error(s3_env, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(PermissionError, match=f"access to s3://{bucket}/m denied"):
        resolve_model_ref(f"s3://{bucket}/m", None, tmp_path)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PermissionError, match=f"no AWS credentials to read s3://{bucket}/m"):
        resolve_model_ref(f"s3://{bucket}/m", None, tmp_path)


def test_parse_s3_uri():
    assert parse_s3_uri("s3://data/requests/r1/manifest.jsonl") == ("data", "requests/r1/manifest.jsonl")
    assert parse_s3_uri("s3://data") == ("data", "")
    for bad in ("data/x", "/local/path", "s3://", "s3://Bad_Bucket/x"):
        with pytest.raises(ValueError, match="S3 URI"):
            parse_s3_uri(bad)


def test_allowed_buckets_read_from_env_as_list_or_csv(monkeypatch):
    monkeypatch.setenv("ERASURE_ALLOWED_BUCKETS", "data, models")
    assert ErasureSettings().allowed_buckets == ["data", "models"]
    monkeypatch.setenv("ERASURE_ALLOWED_BUCKETS", '["data"]')
    assert ErasureSettings().allowed_buckets == ["data"]
