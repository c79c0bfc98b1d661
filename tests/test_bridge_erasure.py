"""Deleted images in a versioned data lake (moto's S3) end in a promoted champion that forgot them,
and their previous versions deleted for good: reconcile → ledger → batch → certificate."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from flows.batch import batch_flow
from tasks import ledger, registry
from tasks.bridge import BridgeSettings, ensure_queue, reconcile
from tasks.champion import carried
from tasks.settings import get_settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_versioned_lake_deletion_is_erased_and_its_versions_deleted(moto_env, store, small_records, monkeypatch):
    moto = moto_env
    for name, value in {"ERASURE_MAX_FORGET_ACCURACY": "0.25", "ERASURE_MAX_RETAIN_DROP": "0.1", "ERASURE_MAX_HELDOUT_DROP": "0.1"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()

    # The lake: some of the model's training images, under their own keys, with a manifest.
    train = small_records["train"]
    red_circles = [r for r in train if r.label == "circle" and r.attribute("colour") == "red"][:8]
    others = [r for r in train if r.label != "circle"][:8]
    bucket = moto.create_bucket(versioned=True)
    rows = []
    for number, record in enumerate(red_circles + others):
        key = f"users/u{number % 3}/img{number}.png"
        moto.s3.put_object(Bucket=bucket, Key=key, Body=open(record.image_path, "rb").read())
        rows.append({"image_path": key.removeprefix("users/"), "label": record.label, "caption": record.caption,
                     "split": "train", "attributes": record.attributes})
    moto.s3.put_object(Bucket=bucket, Key="users/manifest.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    bridge = BridgeSettings(bucket=bucket, prefix="users/", manifest=f"s3://{bucket}/users/manifest.jsonl",
                            queue_url=f"{moto.endpoint_url}/123456789012/{bucket}-q", debounce_s=0, wait_time_s=1,
                            method="cliperase", method_config={"max_steps": 200, "lr": 3e-4, "batch_size": 32, "forget_batch_size": 16, "forget_weight": 10.0})
    ensure_queue(bridge, settings)

    # A user's images are deleted: delete markers, and no notification (moto sends none for versioned deletes).
    deleted = [f"users/u{n % 3}/img{n}.png" for n in range(len(red_circles))]
    moto.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in deleted]})
    (found,) = [r for r in reconcile(settings, bridge) if r.request_id]
    assert found.filed and found.target_kind == "association"

    report = batch_flow(settings=settings)
    (outcome,) = [o for o in report.requests if o.request_id == found.request_id]
    assert outcome.status == "promoted", outcome.reason
    (update,) = report.updates
    assert update.after["forget_accuracy"] < update.before["forget_accuracy"]
    champion = registry.get_version_by_alias(settings.model_name, registry.CHAMPION)
    assert found.request_id in carried(champion.tags)[1]
    assert {t.kind for t in carried(champion.tags)[0]} == {"association"}

    # The versions that held the images are gone for good; the delete markers stay; the certificate says so.
    versions = moto.s3.list_object_versions(Bucket=bucket, Prefix="users/")
    assert not {v["Key"] for v in versions.get("Versions", [])} & set(deleted)
    assert {m["Key"] for m in versions["DeleteMarkers"]} == set(deleted)
    client = MlflowClient()
    state = ledger.find(client, settings.experiment, found.request_id)
    certificate = client.download_artifacts(state.run_id, "certificate/source-versions-deleted.json")
    gone = json.load(open(certificate))["deleted"]
    assert {g["key"] for g in gone} == set(deleted) and not any(g["already_gone"] for g in gone)
    assert reconcile(settings, bridge) == []  # nothing left to erase


def test_unversioned_lake_deletion_of_a_class_is_erased_data_free_through_the_queue(moto_env, store, small_records, monkeypatch):
    """Without versioning the deleted images are gone: moto's `ObjectRemoved:Delete` notifications
    → SQS → the bridge files a data-free lipschitz request for the class → batch → promoted."""
    from tasks.bridge import FALLBACK_METHOD, poll

    moto = moto_env
    for name in ("ERASURE_MAX_FORGET_ACCURACY", "ERASURE_MAX_RETAIN_DROP", "ERASURE_MAX_HELDOUT_DROP"):
        monkeypatch.setenv(name, "1.0")  # this test checks the path; lipschitz's forgetting is tests/test_lipschitz.py's
    get_settings.cache_clear()
    settings = get_settings()
    train = small_records["train"]
    circles, others = [r for r in train if r.label == "circle"][:3], [r for r in train if r.label != "circle"][:3]
    bucket = moto.create_bucket(versioned=False)
    rows = []
    for number, record in enumerate(circles + others):
        moto.s3.put_object(Bucket=bucket, Key=f"lake/img {number}.png", Body=open(record.image_path, "rb").read())
        rows.append({"image_path": f"img {number}.png", "label": record.label, "caption": record.caption, "split": "train",
                     "attributes": record.attributes})
    moto.s3.put_object(Bucket=bucket, Key="lake/manifest.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    bridge = BridgeSettings(bucket=bucket, prefix="lake/", manifest=f"s3://{bucket}/lake/manifest.jsonl",
                            queue_url=f"{moto.endpoint_url}/123456789012/{bucket}-q", debounce_s=0, wait_time_s=1,
                            # the path, not the forgetting: a minimal synthetic set and two steps
                            fallback_method_config={"seed": 0, "lr": 3e-3, "max_steps": 2, "n_stop_images": 4, "anchor_random_words": 8,
                                                    "synthesis": {"n_images": 8, "min_steps": 5, "max_steps": 10}})
    queue_url, _ = ensure_queue(bridge, settings)
    bridge = bridge.model_copy(update={"queue_url": queue_url})

    moto.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"lake/img {n}.png"} for n in range(len(circles))]})
    (filed,) = [r for r in poll(settings, bridge) if r.request_id]
    assert filed.filed and (filed.target_kind, filed.method) == ("class", FALLBACK_METHOD)

    report = batch_flow(settings=settings)
    (outcome,) = [o for o in report.requests if o.request_id == filed.request_id]
    assert outcome.status == "promoted", outcome.reason
    champion = registry.get_version_by_alias(settings.model_name, registry.CHAMPION)
    assert str(champion.version) == outcome.model_version
    assert [t.name for t in carried(champion.tags)[0]] == ["circle"] and carried(champion.tags)[1] == [filed.request_id]
    assert not any(r.request_id for r in poll(settings, bridge))  # the notifications were consumed: nothing more to file
