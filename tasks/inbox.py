"""The request inbox: a folder (or S3 prefix) where people drop request JSON files.

Each :func:`scan` reads the top-level ``*.json`` files once and files every valid request through
:func:`tasks.intake.submit`. A file stays where it is while its request still needs work (received,
pending, running, failed but retryable), so a crash at any point leaves it to the next scan. A
request that is finished moves to ``done/<name>`` next to ``done/<name>.report.json`` (its ledger
state); an invalid, conflicting or hopelessly failed one moves to ``failed/<name>`` next to
``failed/<name>.reason.txt`` (one line naming the field). :func:`watch` scans in a loop.

Once a request waits in the ledger, the inbox announces it (``clip-erasure.request.received``) so
a serving deployment runs a batch now (when an attempt's lease runs out, the run killed, the
service's lease watch announces it again); the announced ``(request_id, hash, attempts)`` are kept
in ``<home>/inbox-state.json`` so a 2 s rescan, or a restart, does not post again.

Request contents (the requester may be personal data) are never logged: only file names, request
ids and statuses.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from botocore.exceptions import ClientError
from mlflow import MlflowClient

from tasks import events, intake, ledger
from tasks.registry import configure_mlflow
from tasks.request import ErasureRequest, RequestError, load_request
from tasks.settings import ErasureSettings
from tasks.storage import is_s3, parse_s3_uri, s3_client, s3_errors

DONE, FAILED = "done", "failed"
STATE_FILE = "inbox-state.json"
MAX_REQUEST_BYTES = 1 << 20  # requests are a few hundred bytes; anything this big is not one
SETTLE_S = 1.0  # a local file younger than this may still be being written: read it next scan
SOURCE = "inbox"

Outcome = Literal["filed", "known", "done", "failed", "waiting"]
logger = logging.getLogger(__name__)


@dataclass
class InboxItem:
    """What one scan did with one file.

    ``outcome``: ``filed`` (new in the ledger, left in the inbox), ``known`` (already in the ledger,
    first seen by this inbox), ``waiting`` (in the ledger, nothing to do this scan), ``done``
    (moved to ``done/``) or ``failed`` (moved to ``failed/``). ``announced``: the request-received
    event was delivered during this scan.
    """

    name: str
    request_id: str | None
    outcome: Outcome
    reason: str = ""
    moved_to: str | None = None
    announced: bool = False


@dataclass
class _Entry:
    name: str
    settled: bool  # False: maybe still being written


class _Folder(Protocol):
    """The few operations the inbox needs, on a local folder or an S3 prefix; paths are relative."""

    location: str

    def entries(self) -> list[_Entry]: ...
    def read(self, name: str) -> bytes: ...
    def exists(self, path: str) -> bool: ...
    def write_text(self, path: str, text: str) -> None: ...
    def move(self, name: str, path: str) -> None: ...  # FileNotFoundError: the source is gone
    def delete(self, path: str) -> None: ...
    def uri(self, path: str) -> str: ...


class _LocalFolder:
    def __init__(self, root: Path, settle_s: float):
        self.root, self.settle_s, self.location = root, settle_s, str(root)

    def entries(self) -> list[_Entry]:
        now = time.time()
        found = []
        with os.scandir(self.root) as scan:
            for entry in scan:
                if not _is_request_name(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue  # folders (done/, failed/), symlinks, sockets: not dropped requests
                stat = entry.stat(follow_symlinks=False)
                found.append(_Entry(entry.name, now - stat.st_mtime >= self.settle_s))
        return sorted(found, key=lambda e: e.name)

    def read(self, name: str) -> bytes:
        try:
            with open(self.root / name, "rb") as handle:
                return handle.read(MAX_REQUEST_BYTES + 1)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise RequestError(f"request: cannot read the file ({exc.strerror}) — make it readable and drop it again") from None

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.root / path)

    def write_text(self, path: str, text: str) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".", suffix=".tmp", delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, target)

    def move(self, name: str, path: str) -> None:
        (self.root / path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / name, self.root / path)

    def delete(self, path: str) -> None:
        (self.root / path).unlink(missing_ok=True)

    def uri(self, path: str) -> str:
        return str(self.root / path)


class _S3Folder:
    def __init__(self, bucket: str, prefix: str, client):
        self.bucket, self.prefix, self.client = bucket, prefix, client
        self.location = f"s3://{bucket}/{prefix}"

    def entries(self) -> list[_Entry]:
        found = []
        with s3_errors(self.location):
            # The delimiter keeps done/ and failed/ (and any other sub-prefix) out of the listing.
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self.prefix):]
                    if _is_request_name(name):
                        found.append(_Entry(name, True))  # an S3 object is whole once listed
        return sorted(found, key=lambda e: e.name)

    def read(self, name: str) -> bytes:
        with s3_errors(self.uri(name)):
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
            return body.read(MAX_REQUEST_BYTES + 1)

    def exists(self, path: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + path)
            return True
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def write_text(self, path: str, text: str) -> None:
        with s3_errors(self.uri(path)):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=text.encode())

    def move(self, name: str, path: str) -> None:
        # S3 has no rename: copy, then delete; a crash in between leaves the source for the next scan.
        with s3_errors(self.uri(name)):
            self.client.copy_object(Bucket=self.bucket, Key=self.prefix + path,
                                    CopySource={"Bucket": self.bucket, "Key": self.prefix + name})
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def delete(self, path: str) -> None:
        with s3_errors(self.uri(path)):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + path)

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{path}"


class Inbox:
    """One inbox, scanned again and again (what :func:`watch` holds).

    Args:
        settings: the ledger's store, ``home`` (default inbox and state file) and S3 endpoint.
        location: a local folder or ``s3://bucket/prefix/``; default ``<home>/inbox`` (created).
        settle_s: local files modified less than this long ago are left for a later scan.

    Raises:
        FileNotFoundError: ``location`` is a local path that is not a folder.
        ValueError: ``location`` is a malformed ``s3://`` URI.
    """

    def __init__(self, settings: ErasureSettings, location: str | Path | None = None, settle_s: float = SETTLE_S):
        self.settings = settings
        self.folder = _open_folder(settings, location, settle_s)
        self.state_path = settings.home / STATE_FILE
        self._unannounced: set[str] = set()  # keys with no Prefect server to tell, in this process
        self._warned: set[str] = set()  # keys whose undelivered event was already logged as a warning

    @property
    def location(self) -> str:
        return self.folder.location

    def scan(self) -> list[InboxItem]:
        """One pass over the inbox's top-level ``*.json`` files; see the module docstring."""
        configure_mlflow(self.settings)
        client = MlflowClient(self.settings.tracking_uri)
        announced = self._load_announced()
        still_waiting: dict[str, str] = {}  # request id -> announced key, for the state file
        items = []
        for entry in self.folder.entries():
            try:
                item = self._handle(entry, client, announced, still_waiting)
            except FileNotFoundError:  # removed or moved by someone else since the listing
                continue
            except Exception as exc:  # the store or S3 hiccuped: the file stays for the next scan
                logger.warning("inbox %s: %s not processed (%s): left for the next scan", self.location, entry.name,
                               type(exc).__name__)
                logger.debug("inbox %s: %s not processed", self.location, entry.name, exc_info=True)
                item = InboxItem(entry.name, None, "waiting", f"not processed: {type(exc).__name__}: {_one_line(str(exc))}")
            items.append(item)
        if still_waiting != announced:
            self._save_announced(still_waiting)
        return items

    def _handle(self, entry: _Entry, client: MlflowClient, announced: dict[str, str], still_waiting: dict[str, str]) -> InboxItem:
        name = entry.name
        if not entry.settled:
            return InboxItem(name, None, "waiting", "modified moments ago (maybe still being written): read on a later scan")
        try:
            request = self._read_request(entry)
        except ValueError as exc:  # RequestError, and any other refusal of the content
            return self._refuse(name, None, _one_line(str(exc)))
        try:
            filed = intake.submit(request, self.settings, client)
        except ledger.RequestConflict as exc:
            return self._refuse(name, request.request_id, _one_line(str(exc)))
        state = filed.state
        if filed.done:
            return self._finish(name, filed)
        if state.status == "failed" and client.get_run(state.run_id).data.tags.get(ledger.RETRYABLE) == "false":
            return self._refuse(name, state.request_id, _one_line(state.reason) or "failed, and only a changed request can succeed",
                                status="failed")
        return self._wait(name, filed, announced, still_waiting)

    def _read_request(self, entry: _Entry) -> ErasureRequest:
        data = self.folder.read(entry.name)  # reads at most MAX_REQUEST_BYTES + 1
        if len(data) > MAX_REQUEST_BYTES:
            raise RequestError(f"request: the file holds more than the {MAX_REQUEST_BYTES} bytes a request may "
                               "— drop the request JSON alone")
        try:
            text = data.decode("utf-8-sig")  # editors on Windows write a BOM
        except UnicodeDecodeError:
            raise RequestError("request: not UTF-8 text — save the request as UTF-8 JSON") from None
        if not text.strip():
            raise RequestError('request: the file is empty — write the request JSON, e.g. {"request_id": ...}, and drop it again')
        if not text.lstrip().startswith(("{", "[")):  # load_request would read other text as a file path
            raise RequestError("request: not JSON (it does not start with '{') — put the request's fields between braces")
        return load_request(text)

    def _wait(self, name: str, filed: intake.Filed, announced: dict[str, str], still_waiting: dict[str, str]) -> InboxItem:
        state = filed.state
        # Announced once per filing or rerun; an attempt whose lease ran out (killed, e.g. with its
        # service) is announced again by the service's lease watch (intake.LeaseWatch), not here:
        # two announcements would start two batches.
        key = f"{state.request_hash}|{len(state.attempts)}"
        outcome: Outcome = "filed" if filed.filed else "known"
        memory_key = f"{state.request_id}|{key}"
        at_work = state.status in ledger.LEASED or (state.status == "received" and len(state.attempts) > 1)  # a batch opened it
        if announced.get(state.request_id) == key or still_waiting.get(state.request_id) == key or at_work:
            still_waiting[state.request_id] = key
            return InboxItem(name, state.request_id, outcome if filed.filed else "waiting")
        if memory_key in self._unannounced:  # no server to tell, already known in this process
            return InboxItem(name, state.request_id, outcome if filed.filed else "waiting")
        try:
            posted = intake.announce(filed, source=SOURCE)
        except events.EventNotDelivered as exc:
            log = logger.debug if memory_key in self._warned else logger.warning
            self._warned.add(memory_key)
            log("inbox %s: %s (request %s, %s): event not delivered, trying again next scan: %s", self.location, name,
                state.request_id, state.status, exc)
            return InboxItem(name, state.request_id, outcome, "request-received event not delivered: tried again next scan")
        if posted:
            still_waiting[state.request_id] = key
            self._warned.discard(memory_key)
        else:  # no Prefect server: the scheduled batch finds the request in the ledger
            self._unannounced.add(memory_key)
        logger.info("inbox %s: %s (request %s): %s, %s", self.location, name, state.request_id,
                    "filed" if filed.filed else f"already in the ledger as {state.status}", "announced" if posted else "not announced")
        return InboxItem(name, state.request_id, outcome, announced=posted)

    def _finish(self, name: str, filed: intake.Filed) -> InboxItem:
        state = filed.state
        destination = self._free_name(DONE, name)
        sidecar = f"{destination}.report.json"
        self.folder.write_text(sidecar, json.dumps(state.as_dict(), indent=2, default=str) + "\n")
        moved = self._move(name, destination, sidecar)
        logger.info("inbox %s: %s (request %s): %s, moved to %s", self.location, name, state.request_id, state.status, moved)
        return InboxItem(name, state.request_id, "done", state.status, moved)

    def _refuse(self, name: str, request_id: str | None, reason: str, status: str = "invalid") -> InboxItem:
        destination = self._free_name(FAILED, name)
        sidecar = f"{destination}.reason.txt"
        self.folder.write_text(sidecar, reason + "\n")
        moved = self._move(name, destination, sidecar)
        # the reason may quote the file's content (the requester): it goes to the sidecar, not to the log
        logger.warning("inbox %s: %s (request %s): %s, moved to %s (reason in %s)", self.location, name, request_id or "-",
                       status, moved, self.folder.uri(sidecar))
        return InboxItem(name, request_id, "failed", reason, moved)

    def _move(self, name: str, destination: str, sidecar: str) -> str:
        """Move ``name`` to ``destination`` and return its new URI; FileNotFoundError: it was gone."""
        try:
            self.folder.move(name, destination)
        except FileNotFoundError:  # another scanner moved it first: drop our sidecar, keep theirs
            self.folder.delete(sidecar)
            raise
        return self.folder.uri(destination)

    def _free_name(self, folder: str, name: str) -> str:
        """``folder/name``, or ``folder/<stem>-2.json``, ``-3``, ... when that is taken."""
        stem, suffix = os.path.splitext(name)
        for number in range(1, 101):
            candidate = f"{folder}/{name}" if number == 1 else f"{folder}/{stem}-{number}{suffix}"
            if not self.folder.exists(candidate):
                return candidate
        return f"{folder}/{stem}-{secrets.token_hex(4)}{suffix}"

    def _load_announced(self) -> dict[str, str]:
        try:
            state = json.loads(self.state_path.read_text())
            mine = state.get("inboxes", {}).get(self.location, {})
            return {str(k): str(v) for k, v in mine.items()} if isinstance(mine, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:  # a damaged state file costs a re-announce, nothing more
            logger.warning("inbox state %s unreadable (%s): announcing waiting requests again", self.state_path, type(exc).__name__)
            return {}

    def _save_announced(self, waiting: dict[str, str]) -> None:
        """Keep only the requests still waiting in this inbox (others' inboxes untouched), written atomically."""
        try:
            state = json.loads(self.state_path.read_text())
            inboxes = state["inboxes"] if isinstance(state, dict) and isinstance(state.get("inboxes"), dict) else {}
        except (OSError, ValueError, KeyError):
            inboxes = {}
        if waiting:
            inboxes[self.location] = waiting
        else:
            inboxes.pop(self.location, None)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.state_path.parent, prefix=".inbox-state-", suffix=".tmp", delete=False) as handle:
            json.dump({"inboxes": inboxes}, handle, indent=1, sort_keys=True)
        os.replace(handle.name, self.state_path)


def scan(settings: ErasureSettings, location: str | Path | None = None, settle_s: float = SETTLE_S) -> list[InboxItem]:
    """Scan an inbox once.

    Args:
        settings: ledger store, ``home`` and S3 endpoint.
        location: a local folder or ``s3://bucket/prefix/``; default ``<home>/inbox``.
        settle_s: local files modified less than this long ago are left for a later scan.

    Returns:
        One item per request file seen, in name order.
    """
    return Inbox(settings, location, settle_s).scan()


def watch(settings: ErasureSettings, location: str | Path | None = None, interval_s: float = 2.0,
          stop: threading.Event | None = None, settle_s: float = SETTLE_S) -> None:
    """Scan the inbox every ``interval_s`` seconds until ``stop`` is set (for a thread of ``erasure serve``).

    A scan that fails (the store or S3 unreachable) is logged and the next one runs as planned.

    Raises:
        ValueError: ``interval_s`` is not positive, or ``location`` is a malformed ``s3://`` URI.
        FileNotFoundError: ``location`` is a local path that is not a folder.
    """
    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}: pass the seconds between scans, e.g. 2")
    stop = stop or threading.Event()
    inbox = Inbox(settings, location, settle_s)  # a bad location fails here, not once per scan
    logger.info("watching inbox %s every %.1f s", inbox.location, interval_s)
    while not stop.is_set():
        try:
            inbox.scan()
        except Exception as exc:
            logger.warning("inbox %s: scan failed, next one in %.1f s: %s", inbox.location, interval_s, _one_line(str(exc)))
            logger.debug("inbox %s: scan failed", inbox.location, exc_info=True)
        stop.wait(interval_s)


def _open_folder(settings: ErasureSettings, location: str | Path | None, settle_s: float) -> _Folder:
    if location is None:
        root = settings.home / "inbox"
        root.mkdir(parents=True, exist_ok=True)
        return _LocalFolder(root, settle_s)
    if is_s3(location):
        bucket, prefix = parse_s3_uri(str(location))
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        return _S3Folder(bucket, prefix, s3_client(settings))
    root = Path(location).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"inbox {root} is not a folder: create it, or pass an existing folder or s3://bucket/prefix/")
    return _LocalFolder(root, settle_s)


def _is_request_name(name: str) -> bool:
    """A dropped request: ``*.json`` at the top level; dotfiles and partial uploads (``*.tmp``, ``*.part``) are not."""
    return bool(name) and "/" not in name and not name.startswith(".") and name.lower().endswith(".json")


def _one_line(text: str) -> str:
    """The first line of an error (each line of a RequestError names one field), counting the rest."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (f" (and {len(lines) - 1} more problem{'s' * (len(lines) > 2)})" if len(lines) > 1 else "")
