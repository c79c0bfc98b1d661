"""Scale-out on a Prefect process work pool: a real Prefect server on a real Postgres, the one
deployment definition registered on one pool, two `prefect worker` processes, two registered
models in one MLflow store, batch runs started with ``run_deployment``. Erasures are the cheap
orchestration ones (QUICK)."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from infra.deployments import REPO_ROOT, definitions, deploy_to_work_pools
from tasks import intake, ledger, registry
from tasks.request import ErasureRequest
from tasks.settings import get_settings
from tests.services import BIN, QUIET, _start, _stop, _tail, prefect_server_on
from tests.test_lifecycle import QUICK, champion_targets, request, versions_of
from tests.test_serve import _prefect_story

POOL = "erasure-test-pool"
pytestmark = pytest.mark.xdist_group("services")  # one after the other with the other multi-process tests (pyproject.toml)
MODEL_B = "shapes-clip-b"
NEVER_SOON = "0 0 1 1 *"  # 1 January, midnight: no schedule fires during the test
TERMINAL_RUN_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _worker(name: str, api: str, root: Path):
    """``prefect worker start`` on the pool, two flow runs at a time, polling every second."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({**QUIET, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / f"{name}-home"), "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "1", "ERASURE_DEBUG": "1", "PYTHONUNBUFFERED": "1"})
    return _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", name, "--limit", "2"],
                  env, root / f"{name}.log")


def _wait(predicate, timeout_s: float, what: str, logs: list[Path], api: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll_s)
    tails = "\n".join(f"--- {log.name}\n{_tail(log, 25)}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}\n--- Prefect\n{_prefect_story(api)}", pytrace=False)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``: a worker's flow runs, which run in process groups of their own."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _stop_workers(workers: dict) -> None:
    """Stop the workers, then whatever flow-run process of theirs is left (a failed test's runs)."""
    runs = [child for process, _ in workers.values() for child in _children(process.pid)]
    for process, _ in workers.values():
        _stop(process, grace=15)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in runs:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in runs):
            time.sleep(0.2)


def _file(settings, body: dict) -> None:
    filed = intake.submit(ErasureRequest.model_validate(body), settings)
    assert filed.filed and filed.state.status == "received"


def _locked_work(client, flow_run_id) -> tuple[datetime, datetime]:
    """When a batch run did its model updates: its erasure-update subflows, which run under the model's lock."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    updates = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    updates = [u for u in updates if u.name and u.start_time and u.end_time]
    assert updates, f"batch run {flow_run_id} made no model update"
    return min(u.start_time for u in updates), max(u.end_time for u in updates)


def test_two_workers_run_two_models_in_parallel_and_one_model_in_sequence(store, trained_model_dir, postgres_server, tmp_path,
                                                                           monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("ERASURE_LOCKS", "prefect")  # the per-model lock is a Prefect global concurrency limit
    get_settings.cache_clear()
    settings_a = get_settings()
    settings_b = settings_a.model_copy(update={"model_name": MODEL_B})
    second = registry.register_model_folder(trained_model_dir, settings_b, tags={"erasure.targets": "[]", "erasure.request_ids": "[]"})
    registry.set_alias(MODEL_B, "champion", second.version)
    model_a = settings_a.model_name
    started = time.monotonic()

    with prefect_server_on(postgres_server.url(), tmp_path) as api, temporary_settings({PREFECT_API_URL: api}):
        server_up = time.monotonic()
        # The server keeps its state in Postgres, not in a SQLite file.
        tables = {row["tablename"] for row in postgres_server.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"flow_run", "deployment", "work_pool", "alembic_version"} <= tables, sorted(tables)

        registered = deploy_to_work_pools(definitions(batch_cron=NEVER_SOON, guard_cron=NEVER_SOON, purge_cron=NEVER_SOON), pool=POOL)
        assert list(registered) == ["erasure-batch/scheduled", "erasure-batch/on-event", "guard/scheduled", "purge/daily"]
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(POOL).type == "process"
            batch = client.read_deployment_by_name("erasure-batch/scheduled")
            assert (batch.work_pool_name, batch.entrypoint) == (POOL, "flows/batch.py:batch_flow")
            assert batch.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
            assert [s.schedule.cron for s in batch.schedules] == [NEVER_SOON]
            assert len(postgres_server.fetch("SELECT id FROM deployment")) == 4  # and they are rows in Postgres

        workers = {name: _worker(name, api, tmp_path) for name in ("worker-1", "worker-2")}
        logs = [log for _, log in workers.values()] + [tmp_path / "prefect-server.log"]
        try:
            with get_client(sync_client=True) as client:
                _wait(lambda: {w.name for w in client.read_workers_for_work_pool(POOL)} >= set(workers), 90, "both workers online",
                      logs, api)
            workers_up = time.monotonic()
            # Model A's first run holds its lock long enough (more fine-tuning steps, each with an
            # evaluation) for the second run's process to start meanwhile, even on a loaded machine.
            bodies = {"a-square": request("pool-a-square", "square", **{**QUICK, "method_config": {"max_steps": 24}}),
                      "b-circle": request("pool-b-circle", "circle", model=MODEL_B, **QUICK),
                      "a-triangle": request("pool-a-triangle", "triangle", **QUICK)}
            _file(settings_a, bodies["a-square"])
            _file(settings_a, bodies["b-circle"])
            runs = {key: run_deployment("erasure-batch/scheduled", parameters={"model_name": model}, timeout=0).id
                    for key, model in (("a-1", model_a), ("b-1", MODEL_B))}
            mlflow = MlflowClient()

            def a1_taken():  # the batch run has model A's lock and has opened the request's attempt
                state = ledger.find(mlflow, settings_a.experiment, "pool-a-square")
                return state and mlflow.get_run(state.run_id).data.tags.get("prefect.flow_run_id") == str(runs["a-1"])

            _wait(a1_taken, 120, "the first run of model A to take its request", logs, api)
            # Filed while the first run of model A is at work: the second run can only erase it once that run lets go of the model.
            _file(settings_a, bodies["a-triangle"])
            runs["a-2"] = run_deployment("erasure-batch/scheduled", parameters={"model_name": model_a}, timeout=0).id

            with get_client(sync_client=True) as client:
                def finished():
                    found = {key: client.read_flow_run(run_id) for key, run_id in runs.items()}
                    return found if all(r.state_type.value in TERMINAL_RUN_STATES for r in found.values()) else None

                flow_runs = _wait(finished, 300, "the three batch runs to finish", logs, api, poll_s=1)
                states = {key: r.state_type.value for key, r in flow_runs.items()}
                assert states == dict.fromkeys(runs, "COMPLETED"), _prefect_story(api)
                work = {key: _locked_work(client, run_id) for key, run_id in runs.items()}
        finally:
            _stop_workers(workers)
        done = time.monotonic()

    # Who ran what: both workers poll the pool (and may both try to submit a run): each run ran on exactly one of them.
    texts = {name: log.read_text(errors="replace") for name, (_, log) in workers.items()}
    ran_on = {key: [name for name, text in texts.items() if f"Beginning flow run '{flow_runs[key].name}'" in text] for key in runs}
    assert all(len(names) == 1 for names in ran_on.values()), ran_on
    # Two models in parallel: the updates of model A's first run and model B's run overlap in time.
    (a1_start, a1_end), (b_start, b_end), (a2_start, a2_end) = work["a-1"], work["b-1"], work["a-2"]
    assert a1_start < b_end and b_start < a1_end, f"model A {work['a-1']} and model B {work['b-1']} ran one after the other"
    # One model in sequence: model A's second run did its update after the first one's, although it started while that ran.
    assert a2_start >= a1_end, f"model A's runs overlapped under its lock: {work['a-1']} and {work['a-2']}"
    assert flow_runs["a-2"].start_time < a1_end, "model A's second run started after the first had finished: the lock was not tested"

    # Zero lost, zero duplicated: every request promoted once, each champion carrying exactly its model's targets.
    for request_id, settings in (("pool-a-square", settings_a), ("pool-a-triangle", settings_a), ("pool-b-circle", settings_b)):
        state = ledger.find(MlflowClient(), settings.experiment, request_id)
        assert state.status == "promoted" and [a.status for a in state.attempts] == ["promoted"], (request_id, state.history)
        assert versions_of(settings, request_id) == [state.model_version], request_id
    assert champion_targets(settings_a) == {"square", "triangle"}
    assert champion_targets(settings_b) == {"circle"}
    assert len(registry.list_versions(model_a)) == 3 and len(registry.list_versions(MODEL_B)) == 2

    print(f"server on Postgres up {server_up - started:.1f} s; workers online {workers_up - server_up:.1f} s; "
          f"three runs {done - workers_up:.1f} s (A1 locked {(a1_end - a1_start).total_seconds():.1f} s, "
          f"B {(b_end - b_start).total_seconds():.1f} s, A2 {(a2_end - a2_start).total_seconds():.1f} s); ran on {ran_on}")
