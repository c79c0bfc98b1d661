"""`erasure serve`: the whole service on one host.

    Prefect server (PREFECT_API_URL, else a local one on 127.0.0.1, SQLite under ERASURE_HOME/prefect)
      ├─ deployments (infra/deployments.py): batch on a schedule and on request events, guard, purge
      ├─ inbox watcher: request files → ledger `received` → event (tasks/inbox.py)
      └─ deletion bridge, when ERASURE_BRIDGE_QUEUE_URL is set: S3 deletions via SQS → requests (tasks/bridge.py)

Ctrl-C or SIGTERM stops it: the runner stops its flow runs with SIGTERM, and a run holds that signal
while it moves aliases (tasks/shutdown.py), so a promotion is complete or never started; a run
stopped before it is recorded failed and retryable and the next batch takes it again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from tasks.settings import ErasureSettings

logger = logging.getLogger("clip-erasure.serve")


@dataclass
class ServeOptions:
    """What `erasure serve` runs; None fields fall back to settings and ``ERASURE_*`` variables."""

    inbox: str | None = None  # folder or s3://bucket/prefix/; default ERASURE_HOME/inbox
    inbox_interval_s: float = 2.0
    batch_cron: str | None = None
    guard_cron: str | None = None
    prefect_port: int = 4200
    poll_seconds: float = 2.0  # how often the runner asks for scheduled/triggered runs (Prefect's default: 10)
    bridge: bool = True  # run the deletion bridge when ERASURE_BRIDGE_QUEUE_URL is set


def say(message: str) -> None:
    print(f"erasure serve: {message}", flush=True)


@contextmanager
def prefect_server(settings: ErasureSettings, port: int, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """The Prefect API to use: ``PREFECT_API_URL`` when set, else a local server started here
    (stopped on exit). Yields the API address."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        say(f"using the Prefect server at {configured}")
        yield configured.rstrip("/")
        return
    home = settings.home / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PREFECT_UI_API_URL": url,
           # Concurrency leases on disk (PREFECT_HOME), not in the server's memory: after a crash and a
           # restart, a killed holder's model lock is freed when its lease runs out, not held for ever.
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": os.environ.get("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE")
           or "prefect.server.concurrency.lease_storage.filesystem"}
    log = open(home / "server.log", "ab")
    process = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_detached_but_tied)
    try:
        _wait_healthy(url, process, startup_timeout_s, home / "server.log")
        say(f"no PREFECT_API_URL set: started a local Prefect server at {url} (SQLite under {home}; log {home / 'server.log'})")
        os.environ["PREFECT_API_URL"] = url  # flow runs and our event posts find it
        yield url
    finally:
        _drain_prefect_workers()
        os.environ.pop("PREFECT_API_URL", None)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def _drain_prefect_workers() -> None:
    """Send the logs and events queued for the local server while it still runs: left to the exit
    handlers, they retried the stopped server and held the exit past 90 s (seen in the serve test)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception as exc:  # a stop must not fail on its logs
            say(f"could not send the last {worker.__name__} items: {exc}")


def _detached_but_tied() -> None:
    """In the server's process: its own session (a terminal's Ctrl-C reaches the service, which
    stops its flow runs before the server), yet it dies with the service, however that ends."""
    os.setsid()
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: a service killed with SIGKILL leaves its server running
        pass


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({process.returncode}); last log lines:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer {url}/health within {timeout_s:.0f} s; last log lines:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _background(name: str, target, stop: threading.Event, *args) -> threading.Thread:
    def run() -> None:
        try:
            target(*args, stop=stop)
        except Exception:  # a dead watcher must be visible, not silent
            logger.exception("%s stopped with an error", name)
    # Prefect's settings live in a context variable: a new thread would otherwise see the settings
    # of import time (no API URL) and start a throwaway ephemeral server.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(run,), name=name, daemon=True)
    thread.start()
    return thread


def serve(settings: ErasureSettings, options: ServeOptions | None = None) -> int:
    """Run the service until Ctrl-C or SIGTERM. Returns the exit code."""
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL, PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    from infra.deployments import definitions, deployments
    from tasks import inbox, intake
    from tasks.registry import configure_mlflow

    options = options or ServeOptions()
    configure_mlflow(settings)
    stop = threading.Event()
    # SIGTERM is Ctrl-C here: Prefect's runner then stops its flow runs and the server cleanly.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with ExitStack() as stack:
        api = stack.enter_context(prefect_server(settings, options.prefect_port))
        stack.enter_context(temporary_settings({PREFECT_API_URL: api, PREFECT_RUNNER_POLL_FREQUENCY: options.poll_seconds}))
        specs = definitions(batch_cron=options.batch_cron, guard_cron=options.guard_cron)
        for spec in specs:
            when = f"cron {spec.cron} (UTC)" if spec.cron else f"on {spec.on_event}"
            say(f"deployment {spec.full_name}: {when}")
        # Register the deployments (and their event triggers) before anything can post an event.
        runner = Runner(pause_on_shutdown=False)
        for deployment in deployments(specs):
            runner.add_deployment(deployment)
        leases = intake.LeaseWatch(settings)
        leases.scan(post=False)  # what has expired by now, the startup announcement covers
        if posted := intake.announce_pending(settings):  # after a restart: what a stopped run left pending goes on now
            say(f"pending requests found: a batch starts now for {posted} model(s)")
        location = options.inbox or str(settings.home / "inbox")
        if not location.startswith("s3://"):
            Path(location).mkdir(parents=True, exist_ok=True)
        threads = [_background("inbox", inbox.watch, stop, settings, location, options.inbox_interval_s),
                   # a quarter of a lease: a killed run's request goes on soon after its lease runs out
                   _background("leases", leases.watch, stop, min(30.0, max(2.0, settings.lease_seconds / 4)))]
        say(f"inbox: drop request .json files into {location}")
        if options.bridge and os.environ.get("ERASURE_BRIDGE_QUEUE_URL"):
            from tasks import bridge

            config = bridge.load_bridge_settings()
            threads.append(_background("bridge", bridge.run, stop, settings, config))
            say(f"deletion bridge: polling {config.queue_url} for deletions in s3://{config.bucket}/{config.prefix}")
        say(f"Prefect UI: {api.removesuffix('/api')}   MLflow UI: {settings.mlflow_ui_url}")
        say("Ctrl-C or SIGTERM stops it")
        try:
            asyncio.run(runner.start())
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=15)
            signal.signal(signal.SIGTERM, previous)
            say("stopped")
    return 0
