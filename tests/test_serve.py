"""`erasure serve` end to end: real `erasure serve` subprocesses, each starting its own Prefect server,
with an S3 inbox (SeaweedFS), event-triggered and scheduled batches, a SIGKILL mid-unlearning and a
restart, against a real MLflow store and the small trained CLIP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from infra.deployments import YAML_PATH, definitions, prefect_yaml
from tasks import intake, ledger, registry
from tasks.champion import carried
from tasks.request import load_request
from tests.test_lifecycle import QUICK, champion_targets, request, versions_of

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("services")  # one after the other with the other multi-process tests (pyproject.toml)
SLOW_STEPS = 8  # fine-tuning steps (each with an evaluation) of the request that is killed: seconds of unlearning


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


def _processes() -> dict[int, tuple[int, str]]:
    """Every process on this machine: pid -> (process group, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            group = int(stat.rsplit(")", 1)[1].split()[2])
            found[int(entry.name)] = (group, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def _minutely_from(start: float, count: int = 6) -> str:
    """A cron (UTC) firing at the first ``count`` minute boundaries from ``start`` (epoch seconds)."""
    first = int(start // 60 + 1) * 60
    minutes = [datetime.fromtimestamp(first + 60 * i, timezone.utc).minute for i in range(count)]
    return f"{','.join(map(str, minutes))} * * * *"


class _Service:
    """One `erasure serve` subprocess in its own process group, with its own local Prefect server."""

    def __init__(self, env: dict, log: Path, *args: str):
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(self.port), "--no-bridge", *args],
                                        cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: "Prefect UI" in log.read_text() or self.process.poll() is not None, 150, "the service to start", log)
        assert self.process.poll() is None, f"erasure serve exited ({self.process.returncode}):\n{log.read_text()[-3000:]}"

    def group(self) -> dict[int, str]:
        return {pid: cmd for pid, (group, cmd) in _processes().items() if group == self.process.pid}

    def server(self) -> dict[int, str]:
        """The local Prefect server's processes (a session of their own, tied to the service by PDEATHSIG)."""
        leaders = {pid for pid, (_, cmd) in _processes().items() if "server start" in cmd and f"--port {self.port}" in cmd}
        return {pid: cmd for pid, (group, cmd) in _processes().items() if pid in leaders or group in leaders}

    def deployment_of(self, flow_run_id: str) -> str:
        run = httpx.get(f"{self.api}/flow_runs/{flow_run_id}", timeout=10).json()
        return httpx.get(f"{self.api}/deployments/{run['deployment_id']}", timeout=10).json()["name"]

    def kill(self) -> None:
        """SIGKILL the whole service as a crash would: its group (service, flow runs), then wait for its server to die with it."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        _wait_for(lambda: not self.group() and not self.server(), 30, "the service's processes to be gone after SIGKILL")

    def cleanup(self) -> None:
        """Whatever is left of this service, SIGKILLed (the test may have failed half-way)."""
        for pid in (*self.group(), *self.server()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(timeout=30)


def test_serve_from_an_s3_inbox_through_a_crash_restart_and_a_scheduled_batch(store, s3_env, tmp_path, monkeypatch):
    """One story, two service starts: a request dropped into an S3 inbox runs through the
    event-triggered deployment; the service is killed (SIGKILL) mid-unlearning, which changes
    nothing; a restart completes it once; a duplicate drop is answered from the ledger; two
    requests filed without an event go through the scheduled deployment in one update."""
    settings = store
    # One host: file locks (a killed holder frees them at once; a Prefect lock's lease would hold
    # the model for at least 60 s). A ledger lease longer than a restart, shorter than the default.
    monkeypatch.setenv("ERASURE_LOCKS", "file")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"ERASURE_DEBUG": "1", "PYTHONUNBUFFERED": "1", "ERASURE_LEASE_SECONDS": "30",
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"})  # the schedule's runs are created within seconds
    bucket = s3_env.create_bucket()
    inbox = f"s3://{bucket}/inbox/"
    s3 = s3_env.client
    client = MlflowClient()

    def state(request_id: str):
        return ledger.find(client, settings.experiment, request_id)

    def exists(key: str) -> bool:
        return s3.list_objects_v2(Bucket=bucket, Prefix=f"inbox/{key}").get("KeyCount", 0) > 0

    champion_before = registry.get_version_by_alias(settings.model_name, "champion").version
    services: list[_Service] = []
    try:
        # 1. Start; a yearly batch schedule, so only the request event can start this batch.
        first = _Service(env, tmp_path / "serve-1.log", "--inbox", inbox, "--batch-cron", "0 0 1 1 *")
        services.append(first)
        text = first.log.read_text()
        assert "started a local Prefect server" in text and inbox in text
        # Enough fine-tuning steps to catch the run at work (QUICK's 4 pass in a blink).
        body = request("serve-circle", **{**QUICK, "method_config": {"max_steps": SLOW_STEPS}})
        dropped = time.time()
        s3.put_object(Bucket=bucket, Key="inbox/serve-circle.json", Body=json.dumps(body).encode())
        _wait_for(lambda: state("serve-circle") is not None, 30, "the S3 inbox to file the request", first.log)
        running = _wait_for(lambda: (s := state("serve-circle")).status in ("running", *ledger.TERMINAL) and s, 150,
                            "the request to start unlearning", first.log, api=first.api)
        assert running.status == "running", f"finished before it could be killed: {running.status}; raise SLOW_STEPS"
        work_started = _first(running.history, lambda status: status != "received")
        flow_run = client.get_run(running.run_id).data.tags["prefect.flow_run_id"]
        assert first.deployment_of(flow_run) == "on-event"
        flow_processes = [cmd for cmd in first.group().values() if "prefect.engine" in cmd]
        assert flow_processes, f"no flow-run process in the service's process group: {first.group()}"

        # 2. SIGKILL mid-unlearning: service, Prefect server, flow run. Nothing changes; the lease still runs.
        killed_at = time.time()
        first.kill()
        assert registry.get_version_by_alias(settings.model_name, "champion").version == champion_before
        assert len(registry.list_versions(settings.model_name)) == 1
        assert state("serve-circle").status == "running"  # until its lease runs out
        assert exists("serve-circle.json") and not exists("done/"), "a request that is not done left the inbox"

        # Restart at once, as a supervisor would. The batch schedule fires every minute from about
        # when the restart takes the request up again (each scheduled run is a process start: seconds
        # of CPU on 2 cores).
        restarted_at = datetime.now(timezone.utc)
        second = _Service(env, tmp_path / "serve-2.log", "--inbox", inbox, "--batch-cron", _minutely_from(time.time() + 30))
        services.append(second)
        lease_live_at_restart = state("serve-circle").status == "running"
        announced_at_start = "pending requests found" in second.log.read_text()
        assert not (lease_live_at_restart and announced_at_start), "a request still at work was announced as pending"
        # The usual case: the restart was quicker than the lease, and the lease watch announces it once the lease runs out.
        route = "the restart's pending-requests event" if announced_at_start else "the lease watch, once the lease ran out"
        killed = _wait_for(lambda: (s := state("serve-circle")).status != "running" and s, 60, "the killed attempt's lease to run out")
        assert killed.attempts[0].status == "failed" and "without finishing" in killed.attempts[0].reason, killed.attempts[0]

        # 3. Two requests filed without an event, once the restart has taken the first one up again:
        # only the scheduled deployment can take them, and it waits for the model while the first runs.
        _wait_for(lambda: len(state("serve-circle").attempts) >= 2, 120, "the restart to take the request up again",
                  second.log, api=second.api)
        # The schedule and the lease watch's event may both have started a batch for it: the pair is
        # filed once the one that got it is the only one at work, so no run started before can take it.
        def others_at_work() -> list[str]:
            circle_run = client.get_run(state("serve-circle").run_id).data.tags.get("prefect.flow_run_id")
            runs = httpx.post(f"{second.api}/flow_runs/filter", timeout=10,
                              json={"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}}).json()
            return [r["name"] for r in runs if r["parent_task_run_id"] is None and r["id"] != circle_run
                    and datetime.fromisoformat(r["created"]) >= restarted_at]  # the killed service's runs stay RUNNING

        _wait_for(lambda: not others_at_work(), 150, "the restart's other batch runs to finish", second.log, api=second.api)
        pair = [request("serve-square", "square", **QUICK), request("serve-star", "star", **QUICK)]
        for body_ in pair:
            assert intake.submit(load_request(json.dumps(body_)), settings, client).filed
        filed = time.time()
        final = _wait_for(lambda: (s := state("serve-circle")).status in ledger.TERMINAL and s, 240, "the restart to complete it",
                          second.log, api=second.api)
        assert final.status == "promoted", final.reason
        assert [a.status for a in final.attempts] == ["failed", "promoted"]
        assert versions_of(settings, "serve-circle") == [final.model_version]
        # its own version's targets: the pair may already be at work on the next one
        assert {t.name for t in carried(client.get_model_version(settings.model_name, final.model_version).tags)[0]} == {"circle"}
        completed_by = second.deployment_of(client.get_run(final.run_id).data.tags["prefect.flow_run_id"])
        # on-event as a rule; the schedule's first run may win the request on a very loaded machine
        assert completed_by in ("on-event", "scheduled"), completed_by
        restarted = _first(final.attempts[-1].history, lambda status: status is not None)
        finished = _first(final.history, lambda status: status == "promoted")
        _wait_for(lambda: exists("done/serve-circle.json"), 30, "the file to move to done/", second.log)
        report = json.loads(s3.get_object(Bucket=bucket, Key="inbox/done/serve-circle.json.report.json")["Body"].read())
        assert report["status"] == "promoted" and report["request_id"] == "serve-circle"

        # The same request dropped again is answered from the ledger: no second erasure.
        s3.put_object(Bucket=bucket, Key="inbox/again.json", Body=json.dumps(body).encode())
        _wait_for(lambda: exists("done/again.json"), 30, "the duplicate to be answered", second.log)
        assert versions_of(settings, "serve-circle") == [final.model_version]

        done = _wait_for(lambda: all((s := state(b["request_id"])).status in ledger.TERMINAL for b in pair) and
                         [state(b["request_id"]) for b in pair], 150, "the scheduled batch", second.log, api=second.api)
        assert [s.status for s in done] == ["promoted", "promoted"], [s.reason for s in done]
        assert done[0].model_version == done[1].model_version, "the pair went in two updates"
        assert {second.deployment_of(client.get_run(s.run_id).data.tags["prefect.flow_run_id"]) for s in done} == {"scheduled"}
        assert champion_targets(settings) == {"circle", "square", "star"}
        assert len(registry.list_versions(settings.model_name)) == 3  # v1, the killed-then-completed one, the pair's
        scheduled_start = _first(done[0].history, lambda status: status != "received")
        paired = _first(done[0].history, lambda status: status == "promoted")

        print(f"S3 drop -> work started {work_started - dropped:.1f} s (waiting); killed {killed_at - work_started:.1f} s into the work")
        print(f"restart: announced by {route}, completed by the {completed_by} deployment: work {finished - restarted:.1f} s; "
              f"kill -> promoted {finished - killed_at:.1f} s")
        print(f"scheduled pair: filed -> work started {scheduled_start - filed:.1f} s (the minute, then the model); work {paired - scheduled_start:.1f} s")
        assert work_started - dropped <= 60  # the target is 30 s; a loaded 2-core CI box gets slack

        # Stop once the scheduled run has finished: this checks a clean exit, not a stop mid-run.
        pair_run = client.get_run(done[0].run_id).data.tags["prefect.flow_run_id"]
        _wait_for(lambda: httpx.get(f"{second.api}/flow_runs/{pair_run}", timeout=10).json()["state_type"] == "COMPLETED", 60,
                  "the scheduled batch's flow run to finish", second.log, api=second.api)
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=90) == 0
        assert "stopped" in second.log.read_text()
        _wait_for(lambda: not second.group() and not second.server(), 30, "the stopped service's processes to be gone")
    finally:
        for service in services:
            service.cleanup()
