"""The deletion bridge: S3 deletions in a watched bucket become erasure requests, through SQS.

The data lake's bucket notifies an SQS queue of ``ObjectRemoved:*`` events. :func:`poll` long-polls
the queue, gathers a burst of deletions (until the queue has been quiet for ``debounce_s``), maps
the deleted objects to the lake manifest's rows, files ONE request for the burst with
:func:`tasks.intake.submit`, announces it, and only then deletes the burst's messages: a message
whose handling failed stays in the queue and, after the queue's ``maxReceiveCount``, lands in the
dead-letter queue.

The deleted images are no longer at their keys:

- *Versioned bucket*: the newest version before the delete marker still holds the image. It is
  downloaded as forget data (an ``association`` target over a local forget manifest) and, once
  the erasure is promoted, :func:`delete_source_versions` deletes it for good.
- *Unversioned bucket*: nothing is left to read. If the deleted rows are all rows of one class (or
  of one subgroup) in the lake manifest, the request erases that class (subgroup) with the
  data-free ``lipschitz`` method on a synthetic forget set; otherwise nothing is filed.

Request ids come from the deleted objects' identities (``deletion-<12 hex>``), and objects already
named by a ledger request (tag ``erasure.origin_objects``) are dropped, so a redelivered message, or
a deletion found again by :func:`reconcile`, never files a second request.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from mlflow import MlflowClient
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks import intake, ledger
from tasks.request import AUTO_METHOD, METHOD_NAMES, ErasureRequest, RequestOrigin, SourceObject, TargetSpec
from tasks.settings import ErasureSettings
from tasks.storage import is_s3, parse_s3_uri, s3_client

logger = logging.getLogger(__name__)

REQUESTER = "s3-deletion-bridge"
SOURCE = "s3-deletion-bridge"  # the ``source`` of the request.received event
DEFAULT_QUEUE_NAME = "clip-erasure-deletions"
NOTIFICATION_ID = "clip-erasure-deletion-bridge"  # our entry in the bucket's notification configuration
FALLBACK_METHOD = "lipschitz"  # data-free: forgets a class or subgroup from a synthetic forget set
VERSIONS_NOTE = "previous object versions read as forget data; deleted for good after promotion"
# The ledger keeps origin identities in one tag of at most 4900 chars, 13 chars each: a larger
# burst would lose identities from the tag and could be filed twice.
MAX_OBJECTS_PER_REQUEST = 350


class BridgeError(ValueError):
    """Bridge settings or a notification the bridge cannot use; the message names the field and the fix."""


class BridgeSettings(BaseSettings):
    """What the deletion bridge watches and where it files requests (``ERASURE_BRIDGE_*`` env vars)."""

    model_config = SettingsConfigDict(env_prefix="ERASURE_BRIDGE_", env_file=".env", extra="ignore")

    queue_url: str = Field(default="", description="SQS queue receiving the bucket's ObjectRemoved notifications; "
                                                    f"empty: ensure_queue creates {DEFAULT_QUEUE_NAME!r}.")
    bucket: str = Field(description="The data lake's bucket whose deletions are watched.")
    prefix: str = Field(default="", description='Watched key prefix, e.g. "images/"; "" watches the whole bucket.')
    manifest: str = Field(description="The lake's manifest, s3://bucket/path/manifest.jsonl (or .csv): image_path, label, "
                                      "caption, attributes; image_path relative to the manifest's folder or s3:// absolute. It "
                                      "must keep the rows of deleted images (the data the model was trained on), or their "
                                      "deletions are skipped as not in the manifest.")
    sqs_endpoint_url: str | None = Field(default=None, description="SQS endpoint; default: ERASURE_S3_ENDPOINT_URL.")
    debounce_s: float = Field(default=5.0, ge=0, allow_inf_nan=False,
                              description="Deletions arriving until the queue has been quiet this long become one request.")
    max_batch_s: float = Field(default=60.0, gt=0, allow_inf_nan=False, description="A burst is cut after this many seconds.")
    max_batch_objects: int = Field(default=300, ge=1, le=MAX_OBJECTS_PER_REQUEST,
                                   description="A burst is cut after this many messages; a request names at most this many objects.")
    wait_time_s: int = Field(default=10, ge=0, le=20, description="SQS long-poll wait (0-20 s).")
    model: str | None = Field(default=None, description="Registered model to erase from; default: the configured champion.")
    method: str = Field(default="auto", description="Method for requests with forget data (previous versions).")
    method_config: dict[str, Any] = Field(default_factory=dict, description=(
        'Overrides of that method\'s hyperparameters, as in a request (JSON, e.g. {"max_steps": 200}); not for the data-free fallback.'))
    fallback_method_config: dict[str, Any] = Field(default_factory=dict, description=(
        f"Overrides of the data-free {FALLBACK_METHOD}'s hyperparameters for deletions without previous versions (JSON)."))
    reconcile_interval_s: float = Field(default=300.0, gt=0, allow_inf_nan=False,
                                        description="How often run() lists delete markers to catch missed notifications.")

    @field_validator("manifest")
    @classmethod
    def _manifest_on_s3(cls, value: str) -> str:
        if not is_s3(value) or value.endswith("/"):
            raise ValueError(f"manifest must be the lake manifest's s3:// URI (got {value!r}) — set ERASURE_BRIDGE_MANIFEST="
                             '"s3://lake/images/manifest.jsonl"')
        parse_s3_uri(value)
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value != AUTO_METHOD and value not in METHOD_NAMES:
            raise ValueError(f"unknown method {value!r} — use {AUTO_METHOD!r} or one of: {', '.join(METHOD_NAMES)}")
        return value

    @field_validator("prefix")
    @classmethod
    def _relative_prefix(cls, value: str) -> str:
        return value.lstrip("/")

    @property
    def queue_name(self) -> str:
        """The queue's name: the last part of ``queue_url``, or :data:`DEFAULT_QUEUE_NAME`."""
        return self.queue_url.rstrip("/").rpartition("/")[2] or DEFAULT_QUEUE_NAME

    def watches(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix)


def load_bridge_settings(**values) -> BridgeSettings:
    """``BridgeSettings`` from keyword arguments and ``ERASURE_BRIDGE_*`` variables, with one line per problem.

    Raises:
        BridgeError: naming each missing or wrong setting's environment variable and the fix.
    """
    try:
        return BridgeSettings(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else "settings"
            message = "required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
            lines.append(f"ERASURE_BRIDGE_{name.upper()}: {message}" + (
                f" — {BridgeSettings.model_fields[name].description}" if error["type"] == "missing" else ""))
        raise BridgeError("\n".join(lines)) from None


@dataclass(frozen=True)
class Deletion:
    """One ``ObjectRemoved`` record of an S3 notification."""

    bucket: str
    key: str  # decoded (notifications carry it URL-encoded)
    event_name: str  # e.g. "ObjectRemoved:Delete", "ObjectRemoved:DeleteMarkerCreated"
    version_id: str | None = None  # the deleted version, or the new delete marker's id
    sequencer: str | None = None
    event_time: str | None = None


@dataclass
class PollResult:
    """What one burst led to: a request filed (or found filed), or why none was.

    ``request_id`` is None when no request was filed: then ``error`` says why (the burst's
    messages stay in the queue), or the burst held nothing to erase (``skipped``, ``already_filed``).
    """

    request_id: str | None = None
    filed: bool = False  # a new ledger entry (False: the ledger had it already)
    announced: bool = False  # the Prefect server confirmed the request.received event
    target_kind: str | None = None
    method: str | None = None
    note: str = ""
    objects: list[SourceObject] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<identity>: reason", no keys (they may name people)
    already_filed: list[str] = field(default_factory=list)  # request ids already holding some of the objects
    error: str | None = None


@dataclass
class BridgeClients:
    """The boto3 clients one bridge uses (creating a client costs ~0.2 s: make them once)."""

    s3: object
    sqs: object

    @classmethod
    def create(cls, settings: ErasureSettings, bridge: BridgeSettings) -> "BridgeClients":
        return cls(s3_client(settings), sqs_client(settings, bridge))


def sqs_client(settings: ErasureSettings, bridge: BridgeSettings):
    """A boto3 SQS client for ``bridge.sqs_endpoint_url`` (default: the S3 endpoint); AWS credential chain."""
    config = Config(retries={"mode": "standard", "max_attempts": 5})
    return boto3.session.Session().client("sqs", endpoint_url=bridge.sqs_endpoint_url or settings.s3_endpoint_url,
                                          region_name=settings.s3_region, config=config)


# -- notifications ------------------------------------------------------------------------------

def parse_notification(body: str) -> list[Deletion]:
    """The ``ObjectRemoved:*`` records of one SQS message body (S3's event JSON, also wrapped by SNS).

    ``s3:TestEvent`` and other S3 events (``ObjectCreated:*``) give no deletions.

    Raises:
        BridgeError: the body is not an S3 event notification (it then stays in the queue and, after
            the queue's maxReceiveCount, goes to the dead-letter queue).
    """
    try:
        event = json.loads(body)
    except (json.JSONDecodeError, TypeError) as exc:
        raise BridgeError(f"message body is not JSON ({exc}) — the queue must receive S3 event notifications only") from None
    if isinstance(event, dict) and event.get("Type") == "Notification" and isinstance(event.get("Message"), str):
        return parse_notification(event["Message"])  # S3 -> SNS -> SQS fan-out
    if isinstance(event, dict) and event.get("Event") == "s3:TestEvent":
        return []
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        raise BridgeError("message body is no S3 event notification (no \"Records\" list, not an s3:TestEvent) — "
                          "the queue must receive S3 event notifications only")
    deletions = []
    for number, record in enumerate(records):
        where = f"Records[{number}]"
        if not isinstance(record, dict) or not isinstance(record.get("eventName"), str):
            raise BridgeError(f"{where}: no eventName — not an S3 event record")
        name = record["eventName"].removeprefix("s3:")
        if record.get("eventSource", "aws:s3") != "aws:s3":
            raise BridgeError(f"{where}: eventSource {record.get('eventSource')!r} is not aws:s3 — send S3 notifications only")
        if not name.startswith("ObjectRemoved:"):
            continue
        s3 = record.get("s3")
        bucket = (s3 or {}).get("bucket", {}).get("name") if isinstance(s3, dict) else None
        obj = (s3 or {}).get("object") if isinstance(s3, dict) else None
        if not isinstance(bucket, str) or not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
            raise BridgeError(f"{where}: {name} record without s3.bucket.name or s3.object.key")
        deletions.append(Deletion(bucket=bucket, key=urllib.parse.unquote_plus(obj["key"]), event_name=name,
                                  version_id=obj.get("versionId") or None, sequencer=obj.get("sequencer"),
                                  event_time=record.get("eventTime")))
    return deletions


def request_id_for(objects: list[SourceObject]) -> str:
    """The request id of a set of deleted objects: the same objects always give the same id."""
    identities = sorted({o.identity for o in objects})
    return "deletion-" + hashlib.sha256(",".join(identities).encode()).hexdigest()[:12]


# -- one poll cycle -----------------------------------------------------------------------------

def poll(settings: ErasureSettings, bridge: BridgeSettings, stop: threading.Event | None = None,
         clients: BridgeClients | None = None) -> list[PollResult]:
    """Receive one burst of notifications, file its request(s), then delete the messages handled.

    Waits up to ``bridge.wait_time_s`` for a first message, then keeps receiving until the queue has
    been quiet for ``debounce_s`` (at most ``max_batch_s``, or ``max_batch_objects`` messages). Deleted
    objects with a previous version become one association request, those without one a data-free
    request (see the module doc). A message is deleted only when every object it names is filed,
    already in the ledger, or nothing to erase; the others become visible again.

    Args:
        stop: when set, collecting stops early and what was received is handled.
        clients: boto3 clients to reuse; default: new ones.

    Returns:
        One result per request filed or refused, plus one listing what was skipped or already filed
        (and unreadable messages); [] when nothing was received or nothing needed a request.
    """
    if not bridge.queue_url:
        raise BridgeError("ERASURE_BRIDGE_QUEUE_URL: required to poll — set it to the SQS queue's URL (ensure_queue creates one)")
    clients = clients or BridgeClients.create(settings, bridge)
    messages = _receive_burst(clients.sqs, bridge, stop)
    if not messages:
        return []
    deletions: dict[tuple[str, str], _Deleted] = {}
    unreadable: dict[str, str] = {}
    for message_id, message in messages.items():
        try:
            records = parse_notification(message["Body"])
        except BridgeError as exc:
            logger.error("SQS message %s left in the queue: %s", message_id, exc)
            unreadable[message_id] = f"message {message_id}: {exc}"
            continue
        for deletion in records:
            if not bridge.watches(deletion.bucket, deletion.key):
                continue
            entry = deletions.setdefault((deletion.bucket, deletion.key), _Deleted(deletion.bucket, deletion.key))
            entry.message_ids.add(message_id)
            entry.deleted_at = min(filter(None, (entry.deleted_at, _parse_time(deletion.event_time))), default=None)
    resolved, skipped = _resolve(clients.s3, list(deletions.values()))
    results, failed = _file(settings, bridge, clients.s3, resolved, skipped)
    if unreadable:
        results.append(PollResult(error="\n".join(unreadable.values())))
    handled = [(message_id, message) for message_id, message in messages.items() if message_id not in failed | unreadable.keys()]
    for message_id, message in handled:
        clients.sqs.delete_message(QueueUrl=bridge.queue_url, ReceiptHandle=message["ReceiptHandle"])
    logger.info("deletion bridge: %d message(s) received, %d deleted, %d left in the queue",
                len(messages), len(handled), len(messages) - len(handled))
    return results


def _receive_burst(sqs, bridge: BridgeSettings, stop: threading.Event | None) -> dict[str, dict]:
    """Messages of one burst by message id (a message seen twice keeps its newest receipt handle)."""
    messages: dict[str, dict] = {}

    def receive(wait_s: float) -> int:
        answer = sqs.receive_message(QueueUrl=bridge.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=min(20, math.ceil(wait_s)))
        got = answer.get("Messages", [])
        for message in got:
            messages[message["MessageId"]] = message
        return len(got)

    if not receive(bridge.wait_time_s):
        return messages
    started = last_arrival = time.monotonic()
    while not (stop and stop.is_set()) and len(messages) < bridge.max_batch_objects:
        now = time.monotonic()
        quiet_left = bridge.debounce_s - (now - last_arrival)
        if quiet_left <= 0 or now - started >= bridge.max_batch_s:
            break
        if receive(min(quiet_left, bridge.max_batch_s - (now - started))):
            last_arrival = time.monotonic()
    return messages


@dataclass
class _Deleted:
    """A deleted key of the watched bucket, and what is known of it."""

    bucket: str
    key: str
    message_ids: set[str] = field(default_factory=set)
    deleted_at: datetime | None = None
    previous_version: str | None = None  # newest version before the delete marker (versioned buckets)

    @property
    def source(self) -> SourceObject:
        return SourceObject(bucket=self.bucket, key=self.key, version_id=self.previous_version)


def _resolve(s3, deleted: list[_Deleted], versions: dict[str, list[dict]] | None = None) -> tuple[list[_Deleted], list[str]]:
    """Find each deleted key's previous version; drop keys that hold an object again.

    Args:
        versions: the keys' version listings (newest first, delete markers included) when already
            listed (:func:`reconcile`); default: listed here.
    """
    kept, skipped = [], []
    for entry in deleted:
        listing = versions[entry.key] if versions is not None else _key_versions(s3, entry.bucket, entry.key)
        if listing and not listing[0].get("IsDeleteMarker"):
            skipped.append(f"{entry.source.identity}: the key holds an object again (re-uploaded, or only an old version was deleted)")
            continue
        entry.previous_version = next((v["VersionId"] for v in listing if not v.get("IsDeleteMarker")), None)
        if entry.deleted_at is None and listing:
            entry.deleted_at = listing[0].get("LastModified")
        kept.append(entry)
    return kept, skipped


def _key_versions(s3, bucket: str, key: str) -> list[dict]:
    """Every version and delete marker of exactly ``key``, newest first."""
    found: list[dict] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        found += [{**v, "IsDeleteMarker": False} for v in page.get("Versions", []) if v["Key"] == key]
        found += [{**m, "IsDeleteMarker": True} for m in page.get("DeleteMarkers", []) if m["Key"] == key]
    return sorted(found, key=lambda v: (not v.get("IsLatest"), -v["LastModified"].timestamp()))


def _file(settings: ErasureSettings, bridge: BridgeSettings, s3, deleted: list[_Deleted],
          skipped: list[str]) -> tuple[list[PollResult], set[str]]:
    """File the requests for ``deleted``; returns the results and the message ids that must stay queued."""
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    origins = _ledger_origins(client, settings.experiment)
    already = sorted({origins[e.source.identity] for e in deleted if e.source.identity in origins})
    failed: set[str] = set()
    for request_id in already:  # filed before but perhaps never announced (the last try failed in between)
        try:
            _announce_existing(client, settings, request_id)
        except Exception as exc:
            logger.error("could not announce already filed request %s: %s", request_id, exc)
            failed |= {m for e in deleted if origins.get(e.source.identity) == request_id for m in e.message_ids}
    fresh = [e for e in deleted if e.source.identity not in origins]
    results: list[PollResult] = []
    if fresh:
        rows = _lake_rows(s3, bridge)
        mapped = []
        for entry in fresh:
            if (entry.bucket, entry.key) in rows:
                mapped.append(entry)
            else:
                logger.warning("deleted object %s is not in the lake manifest: skipped", entry.source.identity)
                skipped.append(f"{entry.source.identity}: not in the lake manifest")
        with_versions = [e for e in mapped if e.previous_version]
        # A request names at most max_batch_objects (the ledger's origin tag holds that many). The
        # data-free group stays whole: it must be a whole class or subgroup.
        step = bridge.max_batch_objects
        groups = [with_versions[i:i + step] for i in range(0, len(with_versions), step)]
        groups.append([e for e in mapped if not e.previous_version])
        for group in filter(None, groups):
            result = _file_group(settings, bridge, s3, group, rows, client)
            results.append(result)
            if result.error:
                failed |= {m for e in group for m in e.message_ids}
    if skipped or already:
        results.append(PollResult(skipped=skipped, already_filed=already))
    return results, failed


def _file_group(settings: ErasureSettings, bridge: BridgeSettings, s3, group: list[_Deleted], rows: dict, client) -> PollResult:
    objects = [e.source for e in sorted(group, key=lambda e: (e.bucket, e.key))]
    request_id = request_id_for(objects)
    result = PollResult(objects=objects)
    try:
        if group[0].previous_version:
            target, method, note = _versions_target(settings, s3, request_id, group, rows), bridge.method, VERSIONS_NOTE
            config = bridge.method_config
        else:
            target, note = _data_free_target(group, rows)
            method, config = FALLBACK_METHOD, bridge.fallback_method_config
        times = [e.deleted_at for e in group if e.deleted_at]
        request = ErasureRequest(
            request_id=request_id, requester=REQUESTER, target=target, method=method, model=bridge.model, method_config=config,
            origin=RequestOrigin(objects=objects, note=note), **({"requested_at": min(times)} if times else {}))
        filed = intake.submit(request, settings, client)
        result.request_id, result.filed, result.target_kind, result.method, result.note = (
            request_id, filed.filed, target.kind, method, note)
        result.announced = intake.announce(filed, SOURCE)
        logger.info("deletion request %s %s: %d object(s), %s target, method %s", request_id,
                    "filed" if filed.filed else "already in the ledger", len(objects), target.kind, method)
    except Exception as exc:  # the burst's messages stay queued; after maxReceiveCount they go to the DLQ
        result.request_id = None
        result.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BridgeError) else str(exc)
        logger.error("deletion burst of %d object(s) not filed, its messages stay in the queue: %s", len(objects), result.error)
    return result


def _versions_target(settings: ErasureSettings, s3, request_id: str, group: list[_Deleted], rows: dict) -> TargetSpec:
    """Download the previous versions and write the forget manifest; an association target over it."""
    folder = deletion_folder(settings, request_id)
    lines, captions = [], []
    for entry in sorted(group, key=lambda e: (e.bucket, e.key)):
        row = rows[(entry.bucket, entry.key)]
        relative = f"images/{entry.source.identity}{PurePosixPath(entry.key).suffix.lower()}"  # no lake keys in local names
        local = folder / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        body = s3.get_object(Bucket=entry.bucket, Key=entry.key, VersionId=entry.previous_version)["Body"]
        with local.open("wb") as handle:
            shutil.copyfileobj(body, handle)
        lines.append(json.dumps({"image_path": relative, "label": row["label"], "caption": row["caption"],
                                 "split": row.get("split") or "", "attributes": row.get("attributes") or {}}) + "\n")
        captions.append(row["caption"])
    manifest = folder / "forget.jsonl"
    manifest.write_text("".join(lines))
    return TargetSpec(kind="association", captions=sorted(set(captions)), pairs_manifest=str(manifest))


def _data_free_target(group: list[_Deleted], rows: dict) -> tuple[TargetSpec, str]:
    """A class or subgroup target when the deleted rows are exactly one of those in the lake manifest.

    Raises:
        BridgeError: they are not, or the data-free method does not take that target kind.
    """
    deleted = {(e.bucket, e.key) for e in group}
    labels = {rows[k]["label"] for k in deleted}
    advice = ("enable versioning on the bucket (its previous versions then serve as forget data), or file a request "
              "with a forget_manifest")
    if len(deleted) > MAX_OBJECTS_PER_REQUEST:
        raise BridgeError(f"{len(deleted)} deleted objects without a previous version: more than one request can name "
                          f"({MAX_OBJECTS_PER_REQUEST}) — {advice}")
    if len(labels) != 1:
        raise BridgeError(f"{len(deleted)} deleted objects without a previous version span {len(labels)} classes: no data-free "
                          f"fallback (it erases one whole class or subgroup) — {advice}")
    (label,) = labels
    of_class = {k for k, row in rows.items() if row["label"] == label}
    if deleted == of_class:
        target = TargetSpec(kind="class", class_name=label)
        note = (f"unversioned bucket: the deleted images cannot be read; they were all {len(deleted)} rows of class {label!r} "
                f"in the lake manifest, so the data-free fallback erases the class with {FALLBACK_METHOD} on a synthetic forget set")
    else:
        attributes = {name for k in deleted for name in rows[k]["attributes"]}
        fits = []
        for name in sorted(attributes):
            values = {str(rows[k]["attributes"].get(name)) for k in deleted}
            if len(values) == 1 and None not in {rows[k]["attributes"].get(name) for k in deleted}:
                (value,) = values
                members = {k for k in of_class if str(rows[k]["attributes"].get(name)) == value}
                if members == deleted:
                    fits.append((name, value))
        if len(fits) != 1:
            why = "ambiguous: " + ", ".join(f"{n}={v}" for n, v in fits) if fits else "not all rows of one class or one subgroup"
            raise BridgeError(f"{len(deleted)} deleted objects of class {label!r} without a previous version are {why} in the lake "
                              f"manifest: no data-free fallback — {advice}")
        (name, value), = fits
        target = TargetSpec(kind="subgroup", class_name=label, attribute=name, value=value)
        note = (f"unversioned bucket: the deleted images cannot be read; they were all {len(deleted)} rows of subgroup "
                f"{name}={value!r} of class {label!r} in the lake manifest, so the data-free fallback erases the subgroup with "
                f"{FALLBACK_METHOD} on a synthetic forget set")
    _check_fallback_method(target.kind)
    return target, note


def _check_fallback_method(kind: str) -> None:
    from unlearning.methods import get_method  # imports torch: only on this path

    if kind not in get_method(FALLBACK_METHOD).target_kinds:
        raise BridgeError(f"the data-free method {FALLBACK_METHOD} does not forget {kind} targets: no fallback for this deletion")


def _ledger_origins(client: MlflowClient, experiment: str) -> dict[str, str]:
    """Identity -> request id of every lake object a ledger request already names."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    origins: dict[str, str] = {}
    token = None
    while True:
        page = client.search_runs([found.experiment_id], f"tags.`{ledger.ORIGIN_OBJECTS}` LIKE '%'", max_results=1000, page_token=token)
        for run in page:
            for identity in run.data.tags.get(ledger.ORIGIN_OBJECTS, "").split(","):
                if identity:
                    origins.setdefault(identity, run.data.tags.get(ledger.REQUEST_ID, ""))
        token = page.token
        if not token:
            return origins


def _announce_existing(client: MlflowClient, settings: ErasureSettings, request_id: str) -> None:
    state = ledger.find(client, settings.experiment, request_id, warning_days=settings.deadline_warning_days)
    if state is not None and state.status == "received":
        intake.announce(intake.Filed(state, False, state.model_name or settings.model_name), SOURCE)


def _lake_rows(s3, bridge: BridgeSettings) -> dict[tuple[str, str], dict]:
    """The lake manifest's rows by the (bucket, key) of their image."""
    bucket, key = parse_s3_uri(bridge.manifest)
    try:
        text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except ClientError as exc:
        raise BridgeError(f"ERASURE_BRIDGE_MANIFEST: cannot read {bridge.manifest} ({exc.response['Error'].get('Code')}) — "
                          "check the URI and the credentials") from None
    if key.endswith(".csv"):
        raw = [dict(row) for row in csv.DictReader(io.StringIO(text))]
        parsed = [{**{k: row.get(k) for k in ("image_path", "label", "caption", "split")},
                   "attributes": {k: v for k, v in row.items() if k not in ("image_path", "label", "caption", "split")}} for row in raw]
    else:
        parsed = [json.loads(line) for line in text.splitlines() if line.strip()]
    folder = key.rpartition("/")[0]
    rows: dict[tuple[str, str], dict] = {}
    for number, row in enumerate(parsed, start=1):
        image = str(row.get("image_path") or "")
        if not (image and row.get("label") and row.get("caption")):
            logger.warning("lake manifest row %d lacks image_path, label or caption: ignored", number)
            continue
        if is_s3(image):
            image_bucket, image_key = parse_s3_uri(image)
        else:
            relative = PurePosixPath(image)
            if relative.is_absolute() or ".." in relative.parts or "://" in image:
                logger.warning("lake manifest row %d: image path escapes the manifest's folder: ignored", number)
                continue
            image_bucket, image_key = bucket, f"{folder}/{relative.as_posix()}" if folder else relative.as_posix()
        rows[(image_bucket, image_key)] = {**row, "label": str(row["label"]), "caption": str(row["caption"]),
                                           "attributes": dict(row.get("attributes") or {})}
    return rows


# -- reconciliation -----------------------------------------------------------------------------

def reconcile(settings: ErasureSettings, bridge: BridgeSettings, clients: BridgeClients | None = None) -> list[PollResult]:
    """File what notifications missed: latest delete markers under bucket/prefix older than
    ``debounce_s`` whose previous version is readable and not yet in the ledger, as one request
    (several when more than ``max_batch_objects``).

    Returns:
        As :func:`poll`; [] when nothing was missed.
    """
    clients = clients or BridgeClients.create(settings, bridge)
    by_key: dict[str, list[dict]] = {}
    for page in clients.s3.get_paginator("list_object_versions").paginate(Bucket=bridge.bucket, Prefix=bridge.prefix):
        for version in page.get("Versions", []):
            by_key.setdefault(version["Key"], []).append({**version, "IsDeleteMarker": False})
        for marker in page.get("DeleteMarkers", []):
            by_key.setdefault(marker["Key"], []).append({**marker, "IsDeleteMarker": True})
    settled = datetime.now(timezone.utc) - timedelta(seconds=bridge.debounce_s)
    missed = []
    for key, listing in sorted(by_key.items()):
        listing.sort(key=lambda v: (not v.get("IsLatest"), -v["LastModified"].timestamp()))
        latest = listing[0]
        if latest["IsDeleteMarker"] and latest["LastModified"] <= settled and any(not v["IsDeleteMarker"] for v in listing):
            missed.append(_Deleted(bridge.bucket, key))
    if not missed:
        return []
    resolved, skipped = _resolve(clients.s3, missed, by_key)
    origins = _ledger_origins(MlflowClient(tracking_uri=settings.tracking_uri), settings.experiment)
    resolved = [e for e in resolved if e.source.identity not in origins]  # filed already: nothing missed
    if not resolved:
        return []
    results, _ = _file(settings, bridge, clients.s3, resolved, skipped)
    if resolved:
        logger.info("reconciliation found %d deletion(s) no notification had filed", len(resolved))
    return results


# -- after promotion ----------------------------------------------------------------------------

def deletion_folder(settings: ErasureSettings, request_id: str) -> Path:
    """Where a deletion request's downloaded previous versions and forget manifest live."""
    return settings.home / "deletions" / request_id


def delete_source_versions(request: ErasureRequest, settings: ErasureSettings, s3=None) -> list[dict]:
    """Delete for good the object versions a promoted deletion request read as forget data, and
    its local copies. Idempotent: a version already gone counts as deleted.

    Returns:
        One ``{"bucket", "key", "version_id", "deleted_at", "already_gone"}`` per version, for the certificate.
    """
    if request.origin is None:
        return []
    s3 = s3 or s3_client(settings)
    done = []
    for obj in request.origin.objects:
        if not obj.version_id:
            continue
        already_gone = False
        try:
            s3.head_object(Bucket=obj.bucket, Key=obj.key, VersionId=obj.version_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchVersion", "NoSuchKey"):
                raise
            already_gone = True
        if not already_gone:
            s3.delete_object(Bucket=obj.bucket, Key=obj.key, VersionId=obj.version_id)
        done.append({"bucket": obj.bucket, "key": obj.key, "version_id": obj.version_id,
                     "deleted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "already_gone": already_gone})
    shutil.rmtree(deletion_folder(settings, request.request_id), ignore_errors=True)
    logger.info("request %s: %d source version(s) deleted for good", request.request_id, len(done))
    return done


# -- setup and the service loop -----------------------------------------------------------------

def ensure_queue(bridge: BridgeSettings, settings: ErasureSettings, dlq_max_receive: int = 5,
                 clients: BridgeClients | None = None) -> tuple[str, str]:
    """Create (or update) the queue, its dead-letter queue and the bucket's notification to it (local/dev).

    The queue gets a RedrivePolicy (``dlq_max_receive`` receives, then the DLQ), a policy letting S3
    send to it, and a visibility timeout longer than a burst. The bucket's other notification
    entries are kept.

    Returns:
        ``(queue_url, dlq_url)``.
    """
    if dlq_max_receive < 1:
        raise BridgeError(f"dlq_max_receive must be >= 1 (got {dlq_max_receive}) — receives before a message goes to the DLQ")
    clients = clients or BridgeClients.create(settings, bridge)
    sqs, name = clients.sqs, bridge.queue_name
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = {"Version": "2012-10-17", "Statement": [{
        "Sid": "s3-notifications", "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"}, "Action": "sqs:SendMessage",
        "Resource": queue_arn, "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bridge.bucket}"}}}]}
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(dlq_max_receive)}),
        "Policy": json.dumps(policy),
        # A burst's first messages must stay invisible while the burst is gathered and filed.
        "VisibilityTimeout": str(math.ceil(bridge.max_batch_s) + 120),
    })
    config = clients.s3.get_bucket_notification_configuration(Bucket=bridge.bucket)
    config.pop("ResponseMetadata", None)
    queues = [c for c in config.get("QueueConfigurations", []) if c.get("Id") != NOTIFICATION_ID]
    ours = {"Id": NOTIFICATION_ID, "QueueArn": queue_arn, "Events": ["s3:ObjectRemoved:*"]}
    if bridge.prefix:
        ours["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": bridge.prefix}]}}
    config["QueueConfigurations"] = [*queues, ours]
    clients.s3.put_bucket_notification_configuration(Bucket=bridge.bucket, NotificationConfiguration=config)
    return queue_url, dlq_url


def run(settings: ErasureSettings, bridge: BridgeSettings, stop: threading.Event) -> None:
    """Poll the queue and reconcile every ``reconcile_interval_s`` until ``stop`` is set.

    Stops within about ``wait_time_s`` of ``stop`` (a long poll in flight is not interrupted). A
    failed cycle is logged and retried after a pause; its messages come back on their own.
    """
    clients = BridgeClients.create(settings, bridge)
    next_reconcile = time.monotonic()
    pause = 1.0
    logger.info("deletion bridge watching s3://%s/%s through %s", bridge.bucket, bridge.prefix, bridge.queue_name)
    while not stop.is_set():
        try:
            if time.monotonic() >= next_reconcile:
                reconcile(settings, bridge, clients)
                next_reconcile = time.monotonic() + bridge.reconcile_interval_s
            if not poll(settings, bridge, stop, clients) and bridge.wait_time_s == 0:
                stop.wait(1.0)  # no long poll to wait in: do not spin on an empty queue
            pause = 1.0
        except Exception as exc:
            logger.error("deletion bridge cycle failed (retrying in %.0f s): %s", pause, exc)
            stop.wait(pause)
            pause = min(pause * 2, 60.0)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
