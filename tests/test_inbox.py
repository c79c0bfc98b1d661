"""The request inbox on a real MLflow store, a real S3 API (SeaweedFS) and a real Prefect server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks import inbox, ledger
from tasks.inbox import Inbox
from tasks.ledger import RETRYABLE
from tasks.registry import configure_mlflow

REQUESTER = "privacy@example.org"


def body(request_id: str, class_name: str = "circle", **fields) -> dict:
    return {"request_id": request_id, "requester": REQUESTER, "target": {"kind": "class", "class_name": class_name}, **fields}


def drop(folder: Path, name: str, content: dict | str) -> Path:
    """Write a request file as a user would, dated a minute back so the settle window has passed."""
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


@pytest.fixture
def settings(mlflow_store):
    """This test's store with file locks (no Prefect server needed to file)."""
    settings = mlflow_store.model_copy(update={"locks": "file"})
    configure_mlflow(settings)
    return settings


def wait_for(condition, timeout_s: float = 10) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; returns whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def by_name(items: list[inbox.InboxItem]) -> dict[str, inbox.InboxItem]:
    return {item.name: item for item in items}


def received_events(request_id: str, timeout_s: float = 30) -> list:
    """The request-received events of ``request_id`` on the current Prefect server, once any arrived."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from tasks.events import REQUEST_RECEIVED

    deadline, found = time.monotonic() + timeout_s, []
    with get_client(sync_client=True) as prefect:
        while not found and time.monotonic() < deadline:
            page = prefect.read_events(EventFilter(event=EventNameFilter(name=[REQUEST_RECEIVED])), limit=50)
            found = [e for e in page.events if e.payload.get("request_id") == request_id]
            if not found:
                time.sleep(0.25)
    return found


def test_local_inbox_files_waits_refuses_and_finishes(settings, caplog):
    caplog.set_level(logging.DEBUG, logger="tasks.inbox")
    client = MlflowClient(settings.tracking_uri)
    folder = settings.home / "inbox"
    folder.mkdir(parents=True)
    drop(folder, "req-a.json", body("req-a"))
    drop(folder, "broken.json", {"request_id": "req-broken", "requester": REQUESTER})  # no target
    drop(folder, "not-json.json", "request_id = req-x")
    for ignored in (".hidden.json", "upload.json.part", "upload.json.tmp"):
        drop(folder, ignored, body("req-ignored"))
    (folder / "sub").mkdir()
    drop(folder / "sub", "nested.json", body("req-nested"))

    watched = Inbox(settings)  # the default inbox: <home>/inbox; one object, as watch() holds
    assert watched.location == str(folder)
    items = by_name(watched.scan())
    assert set(items) == {"req-a.json", "broken.json", "not-json.json"}
    assert (items["req-a.json"].outcome, items["req-a.json"].request_id) == ("filed", "req-a")
    assert (folder / "req-a.json").exists()  # it waits in the inbox until its request is finished
    state = ledger.find(client, settings.experiment, "req-a")
    assert state.status == "received" and len(state.attempts) == 1

    reason = (folder / "failed" / "broken.json.reason.txt").read_text()
    assert reason.startswith("target: required") and reason.count("\n") == 1
    assert items["broken.json"].outcome == "failed" and items["broken.json"].moved_to == str(folder / "failed" / "broken.json")
    assert not (folder / "broken.json").exists() and (folder / "failed" / "broken.json").exists()
    assert "not JSON" in (folder / "failed" / "not-json.json.reason.txt").read_text()
    assert ledger.find(client, settings.experiment, "req-broken") is None
    assert [s.request_id for s in ledger.entries(client, settings.experiment)] == ["req-a"]  # nothing else was filed
    assert all((folder / name).exists() for name in (".hidden.json", "upload.json.part", "upload.json.tmp", "sub/nested.json"))

    # a rescan files nothing new; a conflicting copy and a second broken file of the same name go to failed/
    drop(folder, "req-a-changed.json", body("req-a", class_name="square"))
    drop(folder, "broken.json", "{}")
    items = by_name(watched.scan())
    assert items["req-a.json"].outcome == "waiting" and not items["req-a.json"].announced
    assert len(ledger.find(client, settings.experiment, "req-a").attempts) == 1
    assert items["req-a-changed.json"].outcome == "failed"
    assert "req-a" in (folder / "failed" / "req-a-changed.json.reason.txt").read_text()
    assert items["broken.json"].moved_to == str(folder / "failed" / "broken-2.json")  # the first one is not overwritten
    assert (folder / "failed" / "broken.json.reason.txt").read_text() == reason
    assert ledger.find(client, settings.experiment, "req-a").request_hash == state.request_hash

    # a retryable failure keeps waiting; one only a changed request can fix goes to failed/ with the ledger's reason
    drop(folder, "req-b.json", body("req-b"))
    watched.scan()
    ledger.set_status(client, state.run_id, "failed", reason="OSError: store unreachable", **{RETRYABLE: "true"})
    run_b = ledger.find(client, settings.experiment, "req-b").run_id
    ledger.set_status(client, run_b, "failed", reason="ValueError: forget_manifest: no rows\nsecond line", **{RETRYABLE: "false"})
    items = by_name(watched.scan())
    assert items["req-a.json"].outcome == "waiting" and (folder / "req-a.json").exists()
    assert items["req-b.json"].outcome == "failed" and not (folder / "req-b.json").exists()
    assert (folder / "failed" / "req-b.json.reason.txt").read_text() == "ValueError: forget_manifest: no rows (and 1 more problem)\n"

    # finished: to done/ with the ledger state as its report, and the inbox forgets it
    ledger.set_status(client, state.run_id, "promoted", **{ledger.MODEL_VERSION: "2"})
    items = by_name(watched.scan())
    assert items["req-a.json"].outcome == "done" and items["req-a.json"].reason == "promoted"
    assert not (folder / "req-a.json").exists() and (folder / "done" / "req-a.json").exists()
    report = json.loads((folder / "done" / "req-a.json.report.json").read_text())
    assert (report["request_id"], report["status"], report["model_version"]) == ("req-a", "promoted", "2")
    assert [a["status"] for a in report["attempts"]] == ["promoted"] and report["request_hash"] == state.request_hash
    assert watched.scan() == []  # only ignored files are left

    assert REQUESTER not in caplog.text  # request contents never reach the log
    assert "req-a.json" in caplog.text and "req-b" in caplog.text


def test_fresh_file_waits_for_the_settle_window_and_bad_locations_are_refused(settings, tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "req-new.json").write_text(json.dumps(body("req-new")))
    (item,) = inbox.scan(settings, folder, settle_s=60)
    assert item.outcome == "waiting" and "later scan" in item.reason
    assert ledger.find(MlflowClient(settings.tracking_uri), settings.experiment, "req-new") is None
    (item,) = inbox.scan(settings, folder, settle_s=0)
    assert item.outcome == "filed"

    with pytest.raises(FileNotFoundError, match="missing.*is not a folder"):
        Inbox(settings, tmp_path / "missing")
    with pytest.raises(ValueError, match="bucket"):
        Inbox(settings, "s3://A/prefix")
    with pytest.raises(ValueError, match="interval_s must be positive"):
        inbox.watch(settings, folder, interval_s=0)


def test_watch_survives_a_failed_scan_and_stops_when_told(settings, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tasks.inbox")
    folder = tmp_path / "watched"
    folder.mkdir()
    stop = threading.Event()
    watcher = threading.Thread(target=inbox.watch, args=(settings, folder, 0.05, stop), daemon=True)
    drop(folder, "first.json", "[1, 2]")
    watcher.start()
    try:
        assert wait_for(lambda: (folder / "failed" / "first.json").exists())
        shutil.rmtree(folder)  # the next scans fail: the loop must go on
        assert wait_for(lambda: "scan failed" in caplog.text) and watcher.is_alive()
        folder.mkdir()
        drop(folder, "second.json", "[1, 2]")
        assert wait_for(lambda: (folder / "failed" / "second.json").exists())
        assert (folder / "failed" / "second.json.reason.txt").read_text().startswith("request: expected a JSON object")
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert not watcher.is_alive()


def test_s3_inbox(s3_env, settings):  # s3_env first, so the settings see its endpoint
    bucket = s3_env.create_bucket()
    s3 = s3_env.client
    location = f"s3://{bucket}/drop"  # no trailing slash: the same prefix
    put = lambda key, text: s3.put_object(Bucket=bucket, Key=f"drop/{key}", Body=text.encode())  # noqa: E731
    put("req-s3.json", json.dumps(body("req-s3")))
    put("broken.json", json.dumps({"request_id": "req-s3-broken", "requester": REQUESTER, "target": {"kind": "class"}}))
    put("partial.json.part", "{")
    put("done/req-s3.json", "an older file of the same name")
    s3.put_object(Bucket=bucket, Key="drop-sibling/req-other.json", Body=json.dumps(body("req-other")).encode())

    def keys() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="drop/").get("Contents", [])}

    items = by_name(inbox.scan(settings, location))
    assert set(items) == {"req-s3.json", "broken.json"}
    assert items["req-s3.json"].outcome == "filed" and "drop/req-s3.json" in keys()
    client = MlflowClient(settings.tracking_uri)
    state = ledger.find(client, settings.experiment, "req-s3")
    assert state.status == "received"
    assert items["broken.json"].moved_to == f"s3://{bucket}/drop/failed/broken.json"
    reason = s3.get_object(Bucket=bucket, Key="drop/failed/broken.json.reason.txt")["Body"].read().decode()
    assert reason.startswith("target.class_name: required") and reason.count("\n") == 1
    assert "drop/broken.json" not in keys() and ledger.find(client, settings.experiment, "req-s3-broken") is None

    ledger.set_status(client, state.run_id, "rejected", reason="failed gates: forget")
    (item,) = inbox.scan(settings, location)
    assert (item.outcome, item.moved_to) == ("done", f"s3://{bucket}/drop/done/req-s3-2.json")
    assert keys() == {"drop/partial.json.part", "drop/done/req-s3.json", "drop/done/req-s3-2.json",
                      "drop/done/req-s3-2.json.report.json", "drop/failed/broken.json", "drop/failed/broken.json.reason.txt"}
    report = json.loads(s3.get_object(Bucket=bucket, Key="drop/done/req-s3-2.json.report.json")["Body"].read())
    assert (report["status"], report["reason"]) == ("rejected", "failed gates: forget")
    assert s3.get_object(Bucket=bucket, Key="drop/done/req-s3.json")["Body"].read() == b"an older file of the same name"
    assert ledger.find(client, settings.experiment, "req-other") is None  # a sibling prefix is another inbox


@pytest.mark.usefixtures("prefect_harness")
def test_announces_once_to_a_real_prefect_server_and_retries_undelivered(settings, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.events import event_id

    folder = tmp_path / "drop"
    folder.mkdir()
    request_id = f"req-event-{os.getpid()}-{time.monotonic_ns()}"  # the harness is shared by the session
    drop(folder, "req.json", body(request_id))
    watched = Inbox(settings, folder)

    with socket.socket() as probe:  # a port nobody listens on: the server "is down"
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{dead_port}/api"}):
        (item,) = watched.scan()
    assert (item.outcome, item.announced) == ("filed", False) and "not delivered" in item.reason
    assert (folder / "req.json").exists()

    (item,) = watched.scan()  # the server is back: the waiting request is announced now
    assert (item.outcome, item.announced) == ("known", True)
    (item,) = watched.scan()
    assert (item.outcome, item.announced) == ("waiting", False)
    (item,) = Inbox(settings, folder).scan()  # a restarted inbox reads what it announced from the state file
    assert (item.outcome, item.announced) == ("waiting", False)
    state = json.loads((settings.home / inbox.STATE_FILE).read_text())
    assert list(state["inboxes"][str(folder)]) == [request_id]

    found = received_events(request_id)
    assert len(found) == 1, "no clip-erasure.request.received event reached the Prefect server"
    event = found[0]
    assert event.resource.id == f"clip-erasure.request.{request_id}" and event.payload["source"] == "inbox"
    filed = ledger.find(MlflowClient(settings.tracking_uri), settings.experiment, request_id)
    assert str(event.id) == event_id(f"request|{request_id}|{filed.request_hash}|1")

    ledger.set_status(MlflowClient(settings.tracking_uri), filed.run_id, "dry_run")
    (item,) = watched.scan()
    assert item.outcome == "done" and (folder / "done" / "req.json.report.json").exists()
    assert str(folder) not in json.loads((settings.home / inbox.STATE_FILE).read_text())["inboxes"]
    shutil.rmtree(folder)


@pytest.mark.usefixtures("prefect_harness")
def test_lease_watch_announces_a_stopped_attempt_once_under_the_inbox_event_id(settings):
    from tasks import intake
    from tasks.events import event_id
    from tasks.request import load_request

    client = MlflowClient(settings.tracking_uri)
    request_id = f"req-lease-{os.getpid()}-{time.monotonic_ns()}"  # the harness is shared by the session
    filed = intake.submit(load_request(json.dumps(body(request_id))), settings, client)
    watch = intake.LeaseWatch(settings)
    assert watch.scan() == []  # filed, not started: nothing stopped
    ledger.set_status(client, filed.state.run_id, "running", lease_seconds=0.2)
    assert watch.scan() == []  # at work, lease live
    time.sleep(0.3)  # the run "dies": no heartbeat renews its lease
    stopped = ledger.find(client, settings.experiment, request_id)
    assert stopped.status == "failed" and stopped.attempts[-1].recorded_status == "running"
    key = intake.announcement_key(stopped)
    assert key != f"request|{request_id}|{stopped.request_hash}|1", "the first announcement's id: the server would skip it"
    assert watch.scan() == [request_id]
    assert watch.scan() == []  # once per stopped attempt

    # A restarted service notes what its startup announcement covered, and posts nothing for it.
    restarted = intake.LeaseWatch(settings)
    assert restarted.scan(post=False) == [] and restarted.scan() == []

    found = received_events(request_id)
    assert [(str(e.id), e.payload["source"]) for e in found] == [(event_id(key), "lease-expired")]
