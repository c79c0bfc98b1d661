"""`erasure serve` end to end: a real Prefect server started by the service itself, its deployments,
the inbox watcher and an event-triggered batch, against a real MLflow store and the small trained CLIP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from infra.deployments import YAML_PATH, definitions, prefect_yaml
from tasks import ledger
from tests.test_lifecycle import QUICK, champion_targets, request, versions_of

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_is_rendered_from_the_one_definition():
    assert YAML_PATH.read_text() == prefect_yaml(), "infra/prefect.yaml is stale: run `python -m infra.deployments --write-yaml`"
    names = [spec.full_name for spec in definitions()]
    assert names == ["erasure-batch/scheduled", "erasure-batch/on-event", "guard/scheduled", "purge/daily"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_story(api: str) -> str:
    """The server's flow runs and their last log lines: what a timeout needs to be understood."""
    import httpx

    try:
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=5).json()
        logs = httpx.post(f"{api}/logs/filter", json={"sort": "TIMESTAMP_DESC", "limit": 30}, timeout=5).json()
    except Exception as exc:
        return f"(Prefect server not readable: {exc})"
    lines = [f"flow run {r['name']}: {r['state_type']} {r.get('parameters')}" for r in runs if r["state_type"] != "SCHEDULED"]
    return "\n".join(lines + [entry["message"][:300] for entry in reversed(logs)])


def _wait_for(predicate, timeout_s: float, what: str, log: Path | None = None, poll_s: float = 0.5, api: str | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log and log.exists() else ""
    if api:
        tail += "\n" + _prefect_story(api)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}", pytrace=False)


def _first(history: list[dict], accept) -> float | None:
    row = next((r for r in history if accept(r.get("status"))), None)
    return datetime.fromisoformat(row["at"]).timestamp() if row else None


def test_inbox_drop_runs_through_the_event_triggered_deployment(store, tmp_path, monkeypatch):
    settings = store
    monkeypatch.setenv("ERASURE_LOCKS", "prefect")  # as on a shared server: global concurrency limits
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"ERASURE_DEBUG": "1", "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "serve.log"
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--no-bridge"], cwd=REPO, env=env,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "Prefect UI" in log.read_text(), 150, "the service to start", log)
        assert "started a local Prefect server" in log.read_text()

        inbox = settings.home / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        body = request("serve-square", "square", **QUICK)
        dropped = time.time()
        (inbox / "serve-square.json.part").write_text(json.dumps(body))
        (inbox / "serve-square.json.part").rename(inbox / "serve-square.json")
        client = MlflowClient()

        def state():
            return ledger.find(client, settings.experiment, "serve-square")

        _wait_for(lambda: state() is not None, 30, "the inbox to file the request", log)
        final = _wait_for(lambda: (s := state()) is not None and s.status in ledger.TERMINAL and s, 300, "the erasure to finish", log,
                          api=f"http://127.0.0.1:{port}/api")
        assert final.status == "promoted", final.reason
        assert champion_targets(settings) == {"square"}
        history = final.history
        work_started = _first(history, lambda status: status != "received")  # the batch's attempt began
        finished = _first(history, lambda status: status == "promoted")
        print(f"inbox drop -> work started {work_started - dropped:.1f} s (waiting); work {finished - work_started:.1f} s")
        assert work_started - dropped <= 60  # the target is 30 s; a loaded 2-core CI box gets slack
        done = _wait_for(lambda: (inbox / "done" / "serve-square.json").exists(), 30, "the file to move to done/", log)
        assert done
        report = json.loads((inbox / "done" / "serve-square.json.report.json").read_text())
        assert report["status"] == "promoted"

        # The same request dropped again is answered from the ledger: no second erasure.
        (inbox / "again.json").write_text(json.dumps(body))
        _wait_for(lambda: (inbox / "done" / "again.json").exists(), 30, "the duplicate to be answered", log)
        assert versions_of(settings, "serve-square") == [final.model_version]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        assert "stopped" in log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
