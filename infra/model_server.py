"""`erasure serve-model`: serve the champion over REST and put every new champion into service.

    erasure pipeline ── signed webhook (promoted / rolled back) ──▶ receiver (POST /, HMAC-checked)
                                                                      └─ restarts ▶ `mlflow models serve -m models:/NAME@champion`

An erasure is only done once the model in service no longer holds the data, and
`mlflow models serve` keeps the version it loaded. This receiver restarts it when the pipeline says
the champion moved, waits until the new server answers, and only then confirms the webhook with
``{"in_service_at": ..., "version": ...}``: the erasure run records that time on each request's
certificate. Point ``ERASURE_WEBHOOK_URL`` at it and share ``ERASURE_WEBHOOK_SECRET`` with it.

The served process is any command (``--command``, with ``{model}`` and ``{port}`` filled in) that
answers ``GET <health path>`` once it serves; the default is MLflow's scoring server.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tasks.events import CHAMPION_PROMOTED, CHAMPION_ROLLED_BACK, SIGNATURE_HEADER, TIMESTAMP_HEADER, WEBHOOK_SECRET_ENV, signature

logger = logging.getLogger("clip-erasure.serve-model")

DEFAULT_COMMAND = f"{sys.executable} -m mlflow models serve -m models:/{{model}}@champion --env-manager local --host 127.0.0.1 --port {{port}}"
MAX_CLOCK_SKEW_S = 300  # a signed webhook older than this is refused: a replayed one cannot restart the server
MAX_BODY_BYTES = 64 * 1024


def say(message: str) -> None:
    print(f"erasure serve-model: {message}", flush=True)


class ServedModel:
    """The process that serves the champion; :meth:`reload` replaces it with one that loads the
    current champion and returns once that one answers."""

    def __init__(self, model_name: str, command: str, port: int, health_path: str = "/ping", startup_timeout_s: float = 300.0,
                 env: dict | None = None, log_path: Path | None = None):
        if not model_name:
            raise ValueError("model_name is empty: name the registered model to serve (--model or ERASURE_MODEL_NAME)")
        if "{port}" not in command:
            raise ValueError(f"the serve command must contain {{port}} (where to listen), got {command!r}")
        self.model_name, self.port, self.health_url = model_name, port, f"http://127.0.0.1:{port}{health_path}"
        self.argv = shlex.split(command.format(model=model_name, port=port))
        self.startup_timeout_s, self.env, self.log_path = startup_timeout_s, env, log_path
        self.process: subprocess.Popen | None = None
        self.version: str | None = None  # what the last webhook said went into service; None: whatever was champion at start
        self._lock = threading.Lock()

    def start(self) -> str:
        """Start serving; returns when it answers (ISO time)."""
        with self._lock:
            return self._start()

    def reload(self, version: str | None) -> str:
        """Stop the serving process, start it again on the current champion, wait until it answers.
        Returns the time it went into service (ISO)."""
        with self._lock:
            self._stop()
            in_service_at = self._start()
            self.version = version
            return in_service_at

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> str:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:  # the child holds its own descriptor; one left open here per reload would leak
            if log is not subprocess.DEVNULL:
                log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the serving process exited ({self.process.returncode}) before it answered {self.health_url}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(self.health_url, timeout=2).status_code == 200:
                    return datetime.now(timezone.utc).isoformat(timespec="seconds")
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self._stop()
        raise RuntimeError(f"the serving process did not answer {self.health_url} within {self.startup_timeout_s:.0f} s")

    def _stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the scoring server's workers go too
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass


def receiver(served: ServedModel, secret: str | None, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The webhook receiver (not started: call ``serve_forever``). A promotion or rollback of the
    served model reloads it and is confirmed with when the new champion went into service; a bad
    signature gets 401 and changes nothing; another model's event is acknowledged and ignored."""

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._answer(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            body = self.rfile.read(length)
            if secret is not None:
                stamp = self.headers.get(TIMESTAMP_HEADER, "")
                given = self.headers.get(SIGNATURE_HEADER, "")
                if not stamp.isdigit() or abs(time.time() - int(stamp)) > MAX_CLOCK_SKEW_S:
                    return self._answer(401, {"error": f"{TIMESTAMP_HEADER} missing or more than {MAX_CLOCK_SKEW_S} s off"})
                if not hmac.compare_digest(given, signature(secret, stamp, body)):
                    return self._answer(401, {"error": f"{SIGNATURE_HEADER} does not match the shared secret"})
            try:
                payload = json.loads(body)
                event, model, version = payload["event"], payload["model"], payload.get("version")
            except (ValueError, KeyError, TypeError):
                return self._answer(400, {"error": 'expected JSON with "event", "model" and "version"'})
            if model != served.model_name or event not in (CHAMPION_PROMOTED, CHAMPION_ROLLED_BACK):
                return self._answer(200, {"ignored": f"{event} of {model!r}: this server serves {served.model_name!r}"})
            say(f"{event}: v{version} of {model}: reloading")
            try:
                in_service_at = served.reload(None if version is None else str(version))
            except RuntimeError as exc:
                logger.error("reload failed: %s", exc)
                return self._answer(503, {"error": f"the new champion did not go into service: {exc}"})
            say(f"v{version} in service at {in_service_at}")
            self._answer(200, {"in_service_at": in_service_at, "version": version, "model": model})

        def _answer(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # requests are logged by say(), without their bodies
            pass

    return ThreadingHTTPServer((host, port), Hook)


def serve_model(model_name: str, port: int, hook_port: int, command: str = DEFAULT_COMMAND, health_path: str = "/ping",
                env: dict | None = None, log_path: Path | None = None) -> int:
    """Serve the champion and reload it on the pipeline's webhook until Ctrl-C / SIGTERM."""
    secret = os.environ.get(WEBHOOK_SECRET_ENV)
    if not secret:
        say(f"{WEBHOOK_SECRET_ENV} is not set: webhooks are accepted unsigned (set it here and for the pipeline)")
    served = ServedModel(model_name, command, port, health_path, env=env, log_path=log_path)
    hook = receiver(served, secret, port=hook_port)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        say(f"starting {served.argv[0]} … for models:/{model_name}@champion")
        say(f"champion in service at {served.start()} on http://127.0.0.1:{port}")
        say(f"webhook receiver: set ERASURE_WEBHOOK_URL=http://{hook.server_address[0]}:{hook.server_address[1]}/ for the pipeline")
        hook.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hook.server_close()
        served.stop()
        signal.signal(signal.SIGTERM, previous)
        say("stopped")
    return 0
