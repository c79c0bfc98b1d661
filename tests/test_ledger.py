"""The request ledger on a real MLflow store: attempts, conflicts, leases, deadlines, and the CLI over it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks import ledger
from tasks.locks import LockTimeout, exclusive
from tasks.registry import configure_mlflow
from tasks.request import RequestError, load_request

REPO = Path(__file__).resolve().parents[1]
MODEL = "shapes-clip"


def request(request_id: str, requested_at: datetime | None = None, **fields):
    body = {"request_id": request_id, "requester": "privacy@example.org", "target": {"kind": "class", "class_name": "circle"},
            **fields}
    if requested_at is not None:
        body["requested_at"] = requested_at.isoformat()
    return load_request(body)


@pytest.fixture
def ledger_store(mlflow_store):
    """(client, experiment id, settings) on this test's own MLflow store, with file locks."""
    settings = mlflow_store.model_copy(update={"locks": "file"})
    return MlflowClient(), configure_mlflow(mlflow_store), settings


def test_failed_then_rejected_reads_rejected_with_both_attempts(ledger_store):
    client, experiment_id, settings = ledger_store
    first = ledger.start_attempt(client, experiment_id, request("req-1"), MODEL)
    ledger.set_status(client, first, "running")
    ledger.set_status(client, first, "failed", reason="RuntimeError: out of memory")
    state = ledger.find(client, settings.experiment, "req-1")
    assert (state.status, state.run_id, len(state.attempts)) == ("failed", first, 1)
    assert state.status in ledger.RERUNNABLE  # the flow runs it again

    # the resubmission (a later requested_at, same content) runs as attempt 2, in a run the flow started itself
    second = client.create_run(experiment_id, run_name="req-1").info.run_id
    assert ledger.start_attempt(client, experiment_id, request("req-1", datetime.now(timezone.utc) + timedelta(hours=1)), MODEL,
                                run_id=second) == second
    ledger.set_status(client, second, "running")
    ledger.set_status(client, second, "rejected", reason="failed gates: forget", **{ledger.MODEL_VERSION: "2"})

    state = ledger.find(client, settings.experiment, "req-1")
    assert (state.status, state.reason, state.run_id, state.model_version) == ("rejected", "failed gates: forget", second, "2")
    assert [(a.number, a.status, a.run_id) for a in state.attempts] == [(1, "failed", first), (2, "rejected", second)]
    assert [(row["attempt"], row["status"]) for row in state.history] == [
        (1, "received"), (1, "running"), (1, "failed"), (2, "received"), (2, "running"), (2, "rejected")]
    assert all(a.lease_until is None for a in state.attempts)  # finished attempts hold no lease
    # how the flow decides: a terminal state is answered from the ledger, no third attempt starts
    assert state.status in ledger.TERMINAL and state.status not in ledger.RERUNNABLE
    assert [s.request_id for s in ledger.entries(client, settings.experiment)] == ["req-1"]
    assert [s.request_id for s in ledger.entries(client, settings.experiment, status="failed")] == []
    assert ledger.request_body(client, state)["request_id"] == "req-1"
    assert load_request(ledger.request_body(client, first)).content_hash() == state.request_hash


def test_latest_attempt_wins_over_older_ones(ledger_store):
    """The old ledger read the oldest run of an id, so a later success never showed."""
    client, experiment_id, settings = ledger_store
    for status in ("failed", "failed", "promoted"):
        run_id = ledger.start_attempt(client, experiment_id, request("req-3"), MODEL)
        ledger.set_status(client, run_id, status)
    state = ledger.find(client, settings.experiment, "req-3")
    assert state.status == "promoted" and [a.number for a in state.attempts] == [1, 2, 3]
    assert ledger.entries(client, settings.experiment, status="promoted")[0].request_id == "req-3"


def test_runs_recorded_before_attempts_still_read(ledger_store):
    client, experiment_id, settings = ledger_store
    legacy = client.create_run(experiment_id, tags={ledger.KIND: "request", ledger.REQUEST_ID: "req-old"}).info.run_id
    ledger.set_status(client, legacy, "promoted")
    state = ledger.find(client, settings.experiment, "req-old")
    assert (state.status, state.request_hash, [a.number for a in state.attempts]) == ("promoted", "", [1])
    ledger.check_resubmission(state, request("req-old"))  # no hash recorded: nothing to compare
    ledger.set_status(client, state.run_id, "pending", reason="rolled back")  # what a rollback does
    assert ledger.start_attempt(client, experiment_id, request("req-old"), MODEL)
    assert [a.number for a in ledger.find(client, settings.experiment, "req-old").attempts] == [1, 2]


def test_same_id_other_content_is_a_conflict(ledger_store):
    client, experiment_id, settings = ledger_store
    original = request("req-2")
    ledger.start_attempt(client, experiment_id, original, MODEL)
    changed = request("req-2", target={"kind": "class", "class_name": "square"})
    with pytest.raises(ledger.RequestConflict, match="req-2") as caught:
        ledger.start_attempt(client, experiment_id, changed, MODEL)
    message = str(caught.value)
    assert original.content_hash()[:12] in message and changed.content_hash()[:12] in message and "new request_id" in message
    with pytest.raises(ledger.RequestConflict):
        ledger.file_request(client, experiment_id, changed, MODEL)
    assert len(ledger.find(client, settings.experiment, "req-2").attempts) == 1  # nothing recorded for the refused one

    resubmitted = request("req-2", datetime.now(timezone.utc) - timedelta(days=1))
    assert resubmitted.content_hash() == original.content_hash()
    ledger.check_resubmission(ledger.find(client, settings.experiment, "req-2"), resubmitted)
    state = ledger.file_request(client, experiment_id, resubmitted, MODEL)
    assert len(state.attempts) == 1 and state.status == "received"  # filing again changes nothing


def test_expired_lease_reads_failed_and_a_renewed_one_stays_running(ledger_store):
    client, experiment_id, settings = ledger_store
    stale = ledger.start_attempt(client, experiment_id, request("req-stale"), MODEL)
    ledger.set_status(client, stale, "running", lease_seconds=1)  # nobody renews it
    assert ledger.find(client, settings.experiment, "req-stale").status == "running"
    time.sleep(1.3)
    state = ledger.find(client, settings.experiment, "req-stale")
    assert state.status == "failed" and state.status in ledger.RERUNNABLE
    assert "lease expired" in state.reason and "may run again" in state.reason
    assert state.attempts[0].recorded_status == "running"

    live = ledger.start_attempt(client, experiment_id, request("req-live"), MODEL)
    with ledger.lease(client, live, seconds=1.5):
        ledger.set_status(client, live, "running")
        time.sleep(3.5)  # more than twice the lease: only the renewals keep it alive
        assert ledger.find(client, settings.experiment, "req-live").status == "running"
    # leaving the block unfinished ends the lease at once
    assert ledger.find(client, settings.experiment, "req-live").status == "failed"

    done = ledger.start_attempt(client, experiment_id, request("req-done"), MODEL)
    with ledger.lease(client, done, seconds=30):
        ledger.set_status(client, done, "running")
        ledger.set_status(client, done, "promoted")
    assert ledger.LEASE_UNTIL not in client.get_run(done).data.tags
    assert ledger.find(client, settings.experiment, "req-done").status == "promoted"


_HOLDER = """
import sys, time
from mlflow import MlflowClient
from tasks import ledger
from tasks.locks import exclusive
from tasks.request import load_request
from tasks.settings import get_settings

settings = get_settings()
client = MlflowClient(settings.tracking_uri)
with exclusive("request:x", settings, timeout_s=0):
    run_id = ledger.start_attempt(client, sys.argv[1], load_request(sys.argv[2]), "shapes-clip")
    with ledger.lease(client, run_id, seconds=2):
        ledger.set_status(client, run_id, "running")
        print(run_id, flush=True)
        time.sleep(600)
"""


def test_kill_9_frees_the_lock_at_once_and_the_attempt_reads_failed_after_its_lease(ledger_store):
    client, experiment_id, settings = ledger_store
    body = request("x").model_dump_json()
    env = {**os.environ, "ERASURE_LOCKS": "file", "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, experiment_id, body], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(holder, timeout=60)
        assert line, f"the holder process did not start: {holder.stderr.read() if holder.poll() is not None else ''}"
        assert ledger.find(client, settings.experiment, "x").status == "running"
        with pytest.raises(LockTimeout, match=f"process {holder.pid}"):
            with exclusive("request:x", settings, timeout_s=0):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    started = time.monotonic()
    with exclusive("request:x", settings, timeout_s=0):  # the kernel released the dead holder's flock
        pass
    assert time.monotonic() - started < 1
    deadline = time.monotonic() + 10
    while ledger.find(client, settings.experiment, "x").status == "running" and time.monotonic() < deadline:
        time.sleep(0.25)
    state = ledger.find(client, settings.experiment, "x")
    assert (state.status, state.run_id) == ("failed", line.strip()) and "lease expired" in state.reason


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else ""


def test_due_date_defaults_to_requested_at_plus_deadline_and_extensions_need_a_reason(ledger_store):
    client, experiment_id, settings = ledger_store
    asked = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc)
    plain = ledger.file_request(client, experiment_id, request("req-due", asked), MODEL)
    assert plain.due_at == (asked + timedelta(days=30)).isoformat() and plain.requested_at == asked.isoformat()

    extended = request("req-ext", asked, extension_days=20, extension_reason="several systems hold the data")
    assert extended.due(30) == asked + timedelta(days=50)
    assert ledger.file_request(client, experiment_id, extended, MODEL).due_at == (asked + timedelta(days=50)).isoformat()
    assert request("req-fixed", asked, due_at="2026-03-10T00:00:00Z").due(30) == datetime(2026, 3, 10, tzinfo=timezone.utc)

    with pytest.raises(RequestError, match=r"^extension_reason: required when extension_days > 0 — add \"extension_reason\""):
        request("req-bad", asked, extension_days=10)
    with pytest.raises(RequestError, match="extension_days: .*less than or equal to 60.*two more months"):
        request("req-bad", asked, extension_days=61, extension_reason="long")
    with pytest.raises(RequestError, match="due_at: before requested_at"):
        request("req-bad", asked, due_at="2026-02-01T00:00:00Z")
    # requests that leave the new fields out keep the hash they had before them
    assert "due_at" not in request("req-due", asked).model_dump(mode="json", exclude_defaults=True)


def test_mark_deadlines_flags_overdue_and_due_soon_and_pending_orders_by_due_date(ledger_store):
    client, experiment_id, settings = ledger_store
    now = datetime.now(timezone.utc)
    for request_id, age_days in (("req-fresh", 0), ("req-overdue", 40), ("req-soon", 25), ("req-done", 45)):
        ledger.file_request(client, experiment_id, request(request_id, now - timedelta(days=age_days)), MODEL)
    ledger.set_status(client, ledger.find(client, settings.experiment, "req-done").run_id, "promoted")

    flagged = ledger.mark_deadlines(client, settings.experiment, warning_days=7)  # no Prefect server needed to emit
    assert {s.request_id: s.deadline_flag for s in flagged} == {"req-overdue": "overdue", "req-soon": "due_soon"}
    tags = {rid: client.get_run(ledger.find(client, settings.experiment, rid).run_id).data.tags for rid in
            ("req-fresh", "req-overdue", "req-soon", "req-done")}
    assert {rid: t.get(ledger.DEADLINE_FLAG) for rid, t in tags.items()} == {
        "req-fresh": None, "req-overdue": "overdue", "req-soon": "due_soon", "req-done": None}
    overdue = ledger.find(client, settings.experiment, "req-overdue")
    assert -10.5 < overdue.days_left < -9.5
    assert [s.request_id for s in ledger.pending(client, settings.experiment)] == ["req-overdue", "req-soon", "req-fresh"]
    assert ledger.pending(client, settings.experiment, model_name="another-model") == []
    same = now - timedelta(days=1)  # equal deadlines: the order they were filed in
    for request_id in ("req-tie-1", "req-tie-2", "req-tie-3"):
        ledger.file_request(client, experiment_id, request(request_id, same), MODEL)
    ties = [s.request_id for s in ledger.pending(client, settings.experiment) if s.request_id.startswith("req-tie")]
    assert ties == ["req-tie-1", "req-tie-2", "req-tie-3"]

    # once handled, a request is no longer flagged, and its old flag goes
    ledger.set_status(client, overdue.run_id, "promoted")
    assert [s.request_id for s in ledger.mark_deadlines(client, settings.experiment, warning_days=7)] == ["req-soon"]
    assert ledger.DEADLINE_FLAG not in client.get_run(overdue.run_id).data.tags


@pytest.mark.usefixtures("prefect_harness")
def test_mark_deadlines_emits_prefect_events(ledger_store):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    client, experiment_id, settings = ledger_store
    request_id = f"req-late-{os.getpid()}-{time.monotonic_ns()}"
    ledger.file_request(client, experiment_id, request(request_id, datetime.now(timezone.utc) - timedelta(days=40)), MODEL)
    ledger.mark_deadlines(client, settings.experiment, warning_days=7)
    EventsWorker.drain_all()
    deadline = time.monotonic() + 30
    found = []
    with get_client(sync_client=True) as prefect:
        while not found and time.monotonic() < deadline:
            page = prefect.read_events(EventFilter(event=EventNameFilter(name=["clip-erasure.request.overdue"])), limit=50)
            found = [e for e in page.events if e.payload.get("request_id") == request_id]
            time.sleep(0.5)
    assert found, "no clip-erasure.request.overdue event reached the Prefect server"
    assert found[0].resource.id == f"clip-erasure.request.{request_id}" and found[0].payload["days_left"] < -9


def test_cli_submit_and_status(ledger_store, tmp_path, capsys, monkeypatch):
    from flows.cli import main

    client, experiment_id, settings = ledger_store
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps to 80 columns when not on a terminal
    monkeypatch.setenv("ERASURE_LOCKS", "file")
    asked = datetime.now(timezone.utc) - timedelta(days=40)
    path = tmp_path / "req.json"
    path.write_text(request("req-cli", asked).model_dump_json())
    assert main(["submit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "filed req-cli as received" in out and f"due {(asked + timedelta(days=30)):%Y-%m-%d}" in out

    assert main(["submit", str(path)]) == 0  # idempotent
    assert "already in the ledger: received after 1 attempt(s)" in capsys.readouterr().out

    path.write_text(request("req-cli", asked, method="finetune").model_dump_json())
    assert main(["submit", str(path)]) == 2
    assert "req-cli" in capsys.readouterr().err and len(ledger.find(client, settings.experiment, "req-cli").attempts) == 1

    ledger.set_status(client, ledger.find(client, settings.experiment, "req-cli").run_id, "failed", reason="boom")
    ledger.start_attempt(client, experiment_id, request("req-cli", asked), MODEL, status="running")
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "req-cli" in line)
    assert "running" in row and " 2 " in row and f"{(asked + timedelta(days=30)):%Y-%m-%d}" in row and "-10.0" in row

    assert main(["status", "req-cli"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "running" and shown["deadline_flag"] == "overdue"
    assert [a["status"] for a in shown["attempts"]] == ["failed", "running"]
    assert [(row["attempt"], row["status"]) for row in shown["history"]] == [(1, "received"), (1, "failed"), (2, "running")]
    assert main(["status", "nobody"]) == 1
