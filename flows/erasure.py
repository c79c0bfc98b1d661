"""The erasure flow: one request, end to end.

    admit (ledger: answered before? same content?) ─► lock the request and the model ─► open the
    attempt ─► update (validate ─► evaluate before ─► unlearn ─► gates ─► register ─► promote or
    reject ─► publish) ─► report

Every erasure starts from the current champion, which already carries earlier erasures, and that
champion is the frozen reference for distillation, consistency and souping. The before/after
checks include every earlier forget target, so nothing erased before can come back unnoticed.
"""

from __future__ import annotations

import json
import time

from mlflow import MlflowClient
from prefect import flow

from flows.update import update_flow
from tasks import ledger, shutdown
from tasks.outcome import ErasureReport
from tasks.registry import configure_mlflow
from tasks.request import ErasureRequest, load_request
from tasks.settings import ErasureSettings, get_settings
from tasks.stages import answer_from_ledger, exclusive_work, open_attempt


def as_request(request: ErasureRequest | dict | str) -> ErasureRequest:
    """A request given as the model, a mapping (an event payload) or JSON text / a file path."""
    if isinstance(request, ErasureRequest):
        return request
    return load_request(request if isinstance(request, str) else json.dumps(request, default=str))


@flow(name="erasure", log_prints=True)
def erasure_flow(request: ErasureRequest | dict | str, settings: ErasureSettings | None = None) -> ErasureReport:
    """Carry out one erasure request exactly once and return its report (also logged to MLflow)."""
    started = time.perf_counter()
    settings = settings or get_settings()
    shutdown.install()  # a stop signal never cuts a promotion in half
    request = as_request(request)
    experiment_id = configure_mlflow(settings)
    client = MlflowClient()
    name = request.model or settings.model_name

    answered = answer_from_ledger(client, settings, request)
    if answered is not None:
        return ErasureReport.answered(answered)
    with exclusive_work(settings, name, [request.request_id]):
        answered = answer_from_ledger(client, settings, request)  # it ended while this run waited for it
        if answered is not None:
            return ErasureReport.answered(answered)
        run_id = open_attempt(client, settings, experiment_id, request, name)
        with ledger.lease(client, run_id, settings.lease_seconds):
            update, outcomes = update_flow([request], {request.request_id: run_id}, settings, name, raise_invalid=True)
    outcome = outcomes[-1]
    update.timings.wall_s = time.perf_counter() - started
    return ErasureReport(**update.model_dump(), request_id=request.request_id, status=outcome.status,
                         target=request.target.to_forget_target().name, dry_run=request.dry_run)
