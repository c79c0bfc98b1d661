"""The batch flow: every pending request of a model, in as few model updates as the gates allow.

    deadlines (flag overdue / due soon) ─► pending requests, most urgent first ─► read and check
    each ─► lock them and the model ─► one update for all ─► gates failed? split: the requests whose
    target stayed known go alone, else halves ─► each request: its outcome and certificate

Pending means received (filed by `erasure submit`, an inbox or an event), reopened by a rollback,
or failed for a reason a rerun can fix. A request that cannot be read, or fails validation, fails
alone with its reason; the others go on.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.erasure import as_request
from flows.update import update_flow
from tasks import ledger, locks, registry, shutdown
from tasks.outcome import BatchReport, RequestOutcome
from tasks.registry import configure_mlflow
from tasks.request import ErasureRequest, RequestError
from tasks.settings import ErasureSettings, get_settings
from tasks.stages import RETRYABLE, answer_from_ledger, culprits, open_attempt


@flow(name="erasure-batch", log_prints=True)
def batch_flow(model_name: str | None = None, settings: ErasureSettings | None = None, submit: list | None = None,
               max_requests: int | None = None) -> BatchReport:
    """Erase the pending requests of ``model_name`` (default: the configured model).

    Args:
        submit: requests to file first (models, mappings or JSON), as `erasure submit` would.
        max_requests: at most this many requests (the most urgent); default the setting ``batch_max_requests``.
    """
    started = time.perf_counter()
    settings = settings or get_settings()
    shutdown.install()  # a stop signal never cuts a promotion in half
    experiment_id = configure_mlflow(settings)
    client = MlflowClient()
    name = model_name or settings.model_name
    logger = get_run_logger()
    champion = registry.get_version_by_alias(name, registry.CHAMPION)
    report = BatchReport(model_name=name, champion_before=None if champion is None else str(champion.version))

    for body in submit or []:
        request = as_request(body)
        ledger.file_request(client, experiment_id, request, name)
    ledger.mark_deadlines(client, settings.experiment, settings.deadline_warning_days)
    requests = _pending_requests(client, settings, name, report)[: max_requests or settings.batch_max_requests]
    if not requests:
        logger.info("no pending erasure requests for %s", name)
        return report

    with ExitStack() as held:
        mine = [r for r in requests if _try_lock(held, f"request:{r.request_id}", settings, logger)]
        if not mine:  # every one is another run's: waiting for the model would only queue behind it
            logger.info("every pending request of %s is being worked on by another run", name)
            return report
        held.enter_context(locks.exclusive(f"model:{name}", settings, timeout_s=settings.lock_timeout_s))
        mine = [r for r in mine if not _answered(client, settings, r, report)]
        runs = {r.request_id: open_attempt(client, settings, experiment_id, r, name) for r in mine}
        for run_id in runs.values():
            held.enter_context(ledger.lease(client, run_id, settings.lease_seconds))
        # dry runs are answers about one request: never mixed with others
        queue = [[r] for r in mine if r.dry_run] + ([batch] if (batch := [r for r in mine if not r.dry_run]) else [])
        while queue:
            part = queue.pop(0)
            update, outcomes = update_flow(part, {r.request_id: runs[r.request_id] for r in part}, settings, name)
            report.requests.extend(outcomes)
            if update is None:
                continue
            report.updates.append(update)
            if update.decision == "split":
                queue = _split(part, update, logger) + queue
    champion = registry.get_version_by_alias(name, registry.CHAMPION)
    report.champion_after = None if champion is None else str(champion.version)
    report.wall_s = time.perf_counter() - started
    return report


def _pending_requests(client: MlflowClient, settings: ErasureSettings, name: str, report: BatchReport) -> list[ErasureRequest]:
    """The pending requests, most urgent first; one that cannot be read any more fails alone."""
    requests = []
    for state in ledger.pending(client, settings.experiment, name):
        if state.status == "failed" and client.get_run(state.run_id).data.tags.get(RETRYABLE) == "false":
            continue  # failed validation: only a changed request (a resubmission) can succeed
        try:
            requests.append(as_request(ledger.request_body(client, state)))
        except (RequestError, ValueError, OSError) as exc:
            ledger.set_status(client, state.run_id, "failed", reason=f"unreadable request: {exc}"[:500], **{RETRYABLE: "false"})
            report.requests.append(RequestOutcome(request_id=state.request_id, status="failed", reason=str(exc)[:500], mlflow_run_id=state.run_id))
    return requests


def _try_lock(held: ExitStack, name: str, settings: ErasureSettings, logger) -> bool:
    try:
        held.enter_context(locks.exclusive(name, settings, timeout_s=0))
        return True
    except locks.LockTimeout:
        logger.info("%s is being worked on by another run: left to it", name)
        return False


def _answered(client: MlflowClient, settings: ErasureSettings, request: ErasureRequest, report: BatchReport) -> bool:
    answered = answer_from_ledger(client, settings, request)
    if answered is not None:
        report.requests.append(answered)
    return answered is not None


def _split(part: list[ErasureRequest], update, logger) -> list[list[ErasureRequest]]:
    """The next updates after a failed batch: requests whose own target stayed known go alone
    (the rest together first), else the batch in halves."""
    part = [r for r in part if r.request_id in update.request_ids]  # the ones that failed validation have their outcome
    bad = set(culprits(update))
    if bad and len(bad) < len(part):
        rest = [r for r in part if r.request_id not in bad]
        logger.warning("batch failed its gates (%s); %s kept their target: they go alone", update.reason, ", ".join(sorted(bad)))
        return [rest, *([r] for r in part if r.request_id in bad)]
    half = len(part) // 2
    logger.warning("batch of %d failed its gates (%s): splitting it in two", len(part), update.reason)
    return [part[:half], part[half:]]
