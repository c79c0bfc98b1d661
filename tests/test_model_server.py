"""`erasure serve-model`: the webhook receiver restarts what serves the model on a promotion, checks
signatures, and the erasure's certificate records when the new champion went into service."""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx
import pytest
from mlflow import MlflowClient

from infra.model_server import ServedModel, receiver
from tasks import events, ledger
from tasks.events import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from tests.services import _free_ports

SECRET = "test-secret-not-a-real-one"
# Stands in for `mlflow models serve`: any command that answers its health path once it serves.
FAKE_SERVER = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1"


@pytest.fixture
def hook(tmp_path):
    """A served (fake) model for "shapes-clip" and its receiver on a free port; yields (served, url)."""
    served = ServedModel("shapes-clip", FAKE_SERVER, _free_ports(1)[0], health_path="/", startup_timeout_s=30, log_path=tmp_path / "served.log")
    served.start()
    server = receiver(served, SECRET)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    served.stop()


def _post(url: str, payload: dict, secret: str | None = SECRET, stamp: int | None = None) -> httpx.Response:
    body = json.dumps(payload).encode()
    stamp = str(stamp if stamp is not None else int(time.time()))
    headers = {TIMESTAMP_HEADER: stamp, **({SIGNATURE_HEADER: signature(secret, stamp, body)} if secret else {})}
    return httpx.post(url, content=body, headers=headers, timeout=60)


def test_a_signed_promotion_reloads_the_served_model_and_says_when_it_went_into_service(hook):
    served, url = hook
    first = served.process.pid
    promoted = {"event": events.CHAMPION_PROMOTED, "model": "shapes-clip", "version": "3", "request_ids": ["r1"]}

    for bad in (_post(url, promoted, secret=None), _post(url, promoted, secret="wrong"), _post(url, promoted, stamp=int(time.time()) - 3600)):
        assert bad.status_code == 401
    assert _post(url, {**promoted, "model": "another-model"}).json()["ignored"]
    assert httpx.post(url, content=b"not json", headers={TIMESTAMP_HEADER: "1"}, timeout=10).status_code == 401  # unsigned first
    assert served.process.pid == first and served.version is None  # nothing above restarted it

    answer = _post(url, promoted)
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == "3" and answer.json()["in_service_at"]
    assert served.process.pid != first and served.version == "3"
    assert httpx.get(served.health_url, timeout=5).status_code == 200  # the new process serves


def test_the_certificate_records_when_the_promoted_champion_went_into_service(hook, store, monkeypatch, prefect_harness):
    from flows.erasure import erasure_flow
    from tests.test_lifecycle import QUICK, request

    served, url = hook
    monkeypatch.setenv(events.WEBHOOK_URL_ENV, url)
    monkeypatch.setenv(events.WEBHOOK_SECRET_ENV, SECRET)
    first = served.process.pid

    report = erasure_flow(request("req-in-service", "square", **QUICK))

    assert report.status == "promoted"
    assert served.version == str(report.model_version) and served.process.pid != first
    state = ledger.find(MlflowClient(), store.experiment, "req-in-service")
    certificate = json.load(open(MlflowClient().download_artifacts(state.run_id, "certificate/certificate.json")))
    serving = certificate["serving"]
    assert serving["in_service_at"] and serving["notified_at"] >= serving["in_service_at"]
    markdown = open(MlflowClient().download_artifacts(state.run_id, "certificate/certificate.md")).read()
    assert f"In service: {serving['in_service_at']}" in markdown
