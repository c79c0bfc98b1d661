"""The deletion bridge against moto's real S3 + SQS server and a private MLflow ledger."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from tasks import ledger
from tasks.bridge import (
    FALLBACK_METHOD,
    BridgeError,
    BridgeSettings,
    delete_source_versions,
    ensure_queue,
    load_bridge_settings,
    parse_notification,
    poll,
    reconcile,
    run,
)
from tasks.request import ErasureRequest
from unlearning.data import read_manifest

# (key, label, colour, size): two circles, three squares (one red), one triangle; "a b" checks URL-encoded keys.
LAKE = [("imgs/a b.png", "circle", "red", "small"), ("imgs/c2.png", "circle", "blue", "small"),
        ("imgs/s1.png", "square", "red", "large"), ("imgs/s2.png", "square", "blue", "large"),
        ("imgs/s3.png", "square", "green", "large"), ("imgs/t1.png", "triangle", "red", "small")]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _lake(moto, versioned: bool, dlq_max_receive: int = 5) -> tuple[BridgeSettings, dict[str, bytes], str]:
    """A bucket holding LAKE's images (the triangle by an s3:// path) and its manifest, watched under imgs/ by a new queue."""
    bucket = moto.create_bucket(versioned=versioned)
    images = {}
    rows = []
    for number, (key, label, colour, size) in enumerate(LAKE):
        images[key] = _png(number)
        moto.s3.put_object(Bucket=bucket, Key=key, Body=images[key])
        rows.append({"image_path": f"s3://{bucket}/{key}" if label == "triangle" else key.removeprefix("imgs/"), "label": label,
                     "caption": f"a photo of a {colour} {label}.", "split": "train", "attributes": {"colour": colour, "size": size}})
    moto.s3.put_object(Bucket=bucket, Key="imgs/manifest.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    bridge = BridgeSettings(bucket=bucket, prefix="imgs/", manifest=f"s3://{bucket}/imgs/manifest.jsonl",
                            queue_url=f"{moto.endpoint_url}/123456789012/{bucket}-q", debounce_s=1, wait_time_s=1)
    from tasks.settings import get_settings

    queue_url, dlq_url = ensure_queue(bridge, get_settings(), dlq_max_receive=dlq_max_receive)
    return bridge.model_copy(update={"queue_url": queue_url}), images, dlq_url


def _requests(settings) -> list[ledger.RequestState]:
    return ledger.entries(MlflowClient(tracking_uri=settings.tracking_uri), settings.experiment)


def _body(settings, request_id: str) -> ErasureRequest:
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    return ErasureRequest.model_validate(ledger.request_body(client, ledger.find(client, settings.experiment, request_id)))


def _queued(moto, queue_url: str) -> int:
    attributes = moto.sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def _marker_record(bucket: str, key: str, marker_version: str) -> dict:
    """A ``DeleteMarkerCreated`` record as AWS sends it (moto sends none for versioned deletes)."""
    from urllib.parse import quote_plus

    return {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-01-05T10:00:00.000Z",
            "eventName": "ObjectRemoved:DeleteMarkerCreated", "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "10.0.0.1"}, "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "clip-erasure-deletion-bridge",
                   "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": quote_plus(key), "versionId": marker_version, "sequencer": "0055AED6DCD90281E5"}}}


def test_parse_notification_reads_deletions_and_refuses_what_is_no_s3_event():
    test_event = '{"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-01-05T10:00:00.000Z", "Bucket": "lake"}'
    assert parse_notification(test_event) == []
    moto_delete = {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": "2026-01-05T10:00:00.807Z",
                                "eventName": "ObjectRemoved:Delete",
                                "s3": {"bucket": {"name": "lake"}, "object": {"key": "imgs%2Fa+b%C3%A9.png", "size": 1}}},
                               {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                "s3": {"bucket": {"name": "lake"}, "object": {"key": "imgs/new.png"}}}]}
    (deletion,) = parse_notification(json.dumps(moto_delete))
    assert (deletion.bucket, deletion.key, deletion.event_name, deletion.version_id) == ("lake", "imgs/a bé.png", "ObjectRemoved:Delete", None)

    (marker,) = parse_notification(json.dumps({"Records": [_marker_record("lake", "users/u1/img 1.jpg", "3HL4kqtJvjVBH40Nrjfkd")]}))
    assert (marker.key, marker.event_name, marker.version_id, marker.sequencer, marker.event_time) == (
        "users/u1/img 1.jpg", "ObjectRemoved:DeleteMarkerCreated", "3HL4kqtJvjVBH40Nrjfkd", "0055AED6DCD90281E5", "2026-01-05T10:00:00.000Z")
    sns = {"Type": "Notification", "Message": json.dumps({"Records": [_marker_record("lake", "k.png", "v1")]})}
    assert [d.key for d in parse_notification(json.dumps(sns))] == ["k.png"]

    for garbage, says in [("not json", "not JSON"), ('{"hello": 1}', "no S3 event notification"), ("[1, 2]", "no S3 event"),
                          ('{"Records": [{"eventSource": "aws:s3", "eventName": "ObjectRemoved:Delete", "s3": {}}]}', "s3.object.key"),
                          ('{"Records": [{"eventSource": "aws:sqs", "eventName": "ObjectRemoved:Delete"}]}', "eventSource")]:
        with pytest.raises(BridgeError, match=says):
            parse_notification(garbage)


def test_bridge_settings_name_the_variable_to_fix(monkeypatch):
    monkeypatch.delenv("ERASURE_BRIDGE_BUCKET", raising=False)
    with pytest.raises(BridgeError, match="ERASURE_BRIDGE_BUCKET: required") as error:
        load_bridge_settings(manifest="https://lake/manifest.jsonl", method="lipschits")
    assert "ERASURE_BRIDGE_MANIFEST: manifest must be the lake manifest's s3:// URI" in str(error.value)
    assert "ERASURE_BRIDGE_METHOD: unknown method 'lipschits'" in str(error.value)


def test_unversioned_class_deletion_files_one_data_free_request_through_moto_notifications(moto_env, mlflow_store):
    moto, settings = moto_env, mlflow_store
    bridge, _, _ = _lake(moto, versioned=False)
    moto.s3.put_object(Bucket=bridge.bucket, Key="imgs/stray.png", Body=b"not in the manifest")
    moto.s3.put_object(Bucket=bridge.bucket, Key="other/c2.png", Body=b"outside the prefix")
    moto.s3.delete_objects(Bucket=bridge.bucket, Delete={"Objects": [{"Key": "imgs/a b.png"}, {"Key": "imgs/stray.png"}]})
    moto.s3.delete_object(Bucket=bridge.bucket, Key="imgs/c2.png")
    moto.s3.delete_object(Bucket=bridge.bucket, Key="other/c2.png")
    # Keep a copy of moto's notifications to deliver again below (visibility 0: they stay in the queue).
    copies = [m["Body"] for m in moto.sqs.receive_message(QueueUrl=bridge.queue_url, MaxNumberOfMessages=10,
                                                          VisibilityTimeout=0).get("Messages", [])]
    assert any("imgs%2Fa+b.png" in body for body in copies), copies

    results = poll(settings, bridge)

    (filed,) = [r for r in results if r.request_id]
    assert filed.filed and filed.error is None
    assert (filed.target_kind, filed.method) == ("class", FALLBACK_METHOD)
    assert sorted(o.key for o in filed.objects) == ["imgs/a b.png", "imgs/c2.png"]
    assert sum("not in the lake manifest" in line for r in results for line in r.skipped) == 1
    request = _body(settings, filed.request_id)
    assert request.target.class_name == "circle" and request.method == FALLBACK_METHOD and request.requester == "s3-deletion-bridge"
    assert "data-free fallback" in request.origin.note and "synthetic" in request.origin.note
    assert [(s.request_id, s.status) for s in _requests(settings)] == [(filed.request_id, "received")]
    assert _queued(moto, bridge.queue_url) == 0  # every message handled was deleted

    # The same notifications delivered again (twice each): nothing new is filed, and they are consumed.
    for body in copies * 2:
        moto.sqs.send_message(QueueUrl=bridge.queue_url, MessageBody=body)
    again = poll(settings, bridge)
    assert not any(r.request_id or r.error for r in again)  # no request built for objects the ledger has
    assert [filed.request_id] == [rid for r in again for rid in r.already_filed]
    assert len(_requests(settings)) == 1 and _queued(moto, bridge.queue_url) == 0

    # The service loop, as `erasure serve` runs it: one row of a subgroup (the red square, the only
    # red one among the squares) is deleted while it runs.
    stop = threading.Event()
    service = threading.Thread(target=run, args=(settings, bridge, stop), daemon=True)
    service.start()
    moto.s3.delete_object(Bucket=bridge.bucket, Key="imgs/s1.png")
    deadline = time.monotonic() + 30
    while len(_requests(settings)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    service.join(timeout=10)
    assert not service.is_alive(), "run() did not stop within 10 s of the stop event"
    (subgroup,) = [s for s in _requests(settings) if s.request_id != filed.request_id]
    request = _body(settings, subgroup.request_id)
    assert (request.target.kind, request.target.class_name, request.target.attribute, request.target.value) == (
        "subgroup", "square", "colour", "red")
    assert request.method == FALLBACK_METHOD and "subgroup" in request.origin.note


def test_versioned_deletions_read_previous_versions_and_delete_them_after_promotion(moto_env, mlflow_store):
    moto, settings = moto_env, mlflow_store
    bridge, images, _ = _lake(moto, versioned=True)
    deleted = ["imgs/a b.png", "imgs/t1.png"]
    originals = {k: v["VersionId"] for k in deleted
                 for v in moto.s3.list_object_versions(Bucket=bridge.bucket, Prefix=k)["Versions"] if v["Key"] == k}
    markers = {k: moto.s3.delete_object(Bucket=bridge.bucket, Key=k)["VersionId"] for k in deleted}
    assert _queued(moto, bridge.queue_url) <= 1  # at most the s3:TestEvent: moto notifies no versioned delete
    moto.sqs.purge_queue(QueueUrl=bridge.queue_url)

    # What AWS would send: DeleteMarkerCreated records. Filed in another ledger, they give the id reconcile gives.
    record = json.dumps({"Records": [_marker_record(bridge.bucket, k, markers[k]) for k in deleted]})
    moto.sqs.send_message(QueueUrl=bridge.queue_url, MessageBody=record)
    (from_queue,) = [r for r in poll(settings.model_copy(update={"experiment": "other-ledger"}), bridge) if r.request_id]
    (found,) = [r for r in reconcile(settings, bridge.model_copy(update={"debounce_s": 0})) if r.request_id]
    assert found.request_id == from_queue.request_id and found.filed and found.target_kind == "association"

    request = _body(settings, found.request_id)
    assert {(o.key, o.version_id) for o in request.origin.objects} == set(originals.items())
    assert request.origin.note == "previous object versions read as forget data; deleted for good after promotion"
    assert request.target.captions == ["a photo of a red circle.", "a photo of a red triangle."]
    forget = read_manifest(request.target.pairs_manifest)
    assert {r.caption: open(r.image_path, "rb").read() for r in forget} == {
        "a photo of a red circle.": images["imgs/a b.png"], "a photo of a red triangle.": images["imgs/t1.png"]}

    # The record delivered to this ledger: already filed, consumed, nothing new.
    moto.sqs.send_message(QueueUrl=bridge.queue_url, MessageBody=record)
    again = poll(settings, bridge)
    assert not any(r.request_id or r.error for r in again) and [found.request_id] == [i for r in again for i in r.already_filed]
    assert len(_requests(settings)) == 1 and _queued(moto, bridge.queue_url) == 0

    gone = delete_source_versions(request, settings)
    assert {(g["key"], g["version_id"], g["already_gone"]) for g in gone} == {(k, v, False) for k, v in originals.items()}
    left = moto.s3.list_object_versions(Bucket=bridge.bucket, Prefix="imgs/")
    assert not {v["VersionId"] for v in left.get("Versions", [])} & set(originals.values())
    assert {m["Key"] for m in left["DeleteMarkers"]} == set(deleted)  # the keys stay deleted
    assert not Path(request.target.pairs_manifest).exists()  # the local copies too
    assert all(g["already_gone"] for g in delete_source_versions(request, settings))
    assert reconcile(settings, bridge.model_copy(update={"debounce_s": 0})) == []  # nothing left to find


def test_a_burst_that_cannot_be_handled_stays_queued_then_goes_to_the_dead_letter_queue(moto_env, mlflow_store):
    moto, settings = moto_env, mlflow_store
    bridge, _, dlq_url = _lake(moto, versioned=False, dlq_max_receive=2)
    moto.sqs.purge_queue(QueueUrl=bridge.queue_url)  # the s3:TestEvent
    moto.sqs.set_queue_attributes(QueueUrl=bridge.queue_url, Attributes={"VisibilityTimeout": "1"})
    # A circle and a square, no previous versions, neither a whole class nor a subgroup: no fallback.
    moto.s3.delete_objects(Bucket=bridge.bucket, Delete={"Objects": [{"Key": "imgs/c2.png"}, {"Key": "imgs/s2.png"}]})
    moto.sqs.send_message(QueueUrl=bridge.queue_url, MessageBody="not an S3 event")
    bridge = bridge.model_copy(update={"debounce_s": 0})

    first = poll(settings, bridge)
    assert any("2 classes" in (r.error or "") for r in first) and any("not JSON" in (r.error or "") for r in first)
    assert not any(r.request_id for r in first) and _requests(settings) == []
    received = _queued(moto, bridge.queue_url)
    assert received >= 2  # nothing deleted

    # After the 1 s visibility timeout the messages come back once (receive 2 of 2) ...
    deadline = time.monotonic() + 10
    second = []
    while not second and time.monotonic() < deadline:
        second = poll(settings, bridge)
    assert any("2 classes" in (r.error or "") for r in second) and not any(r.request_id for r in second)
    # ... and the next receive moves them to the dead-letter queue.
    in_dlq: dict[str, str] = {}
    while len(in_dlq) < received and time.monotonic() < deadline + 10:
        assert poll(settings, bridge) == []
        for message in moto.sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            in_dlq[message["MessageId"]] = message["Body"]
    assert len(in_dlq) == received and "not an S3 event" in in_dlq.values()
    assert _queued(moto, bridge.queue_url) == 0
