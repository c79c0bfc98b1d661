"""One model update: the requests given erased from the champion in one candidate, one gate decision.

    load champion ─► validate each request ─► plan the update ─► evaluate before ─► unlearn ─►
    depth of forgetting ─► gates ─► register ─► promote (inside a transaction) or reject ─► publish
    ─► (promoted) the request's own forget images leave the image cache, its sources are deleted

The request data and the plan go to tasks ``quote``d: they hold every reference record, and
Prefect would otherwise walk each of them looking for futures (~2 min per update on 16k rows).

Called by the erasure flow (one request) and the batch flow (several) with the locks held and
each request's attempt run open. A request that fails validation fails alone; a batch whose gates
fail comes back ``split`` and the batch flow divides it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import flow
from prefect.transactions import transaction
from prefect.utilities.annotations import quote

from tasks import ledger, shutdown
from tasks.champion import load_champion
from tasks.data import shared_eval_sets
from tasks.depth import measure_depth
from tasks.outcome import RequestOutcome, Timings, UpdateReport
from tasks.register import record_reference_choice, reference_for_champion
from tasks.request import ErasureRequest
from tasks.settings import ErasureSettings
from tasks.stages import (decide_gates, delete_sources, evaluate_before, fail_request, forget_cached_images, mark_rejected, plan_update,
                          promote_update, publish, register_update, unlearn_update, validate_request)


@flow(name="erasure-update", log_prints=True)
def update_flow(requests: list[ErasureRequest], runs: dict[str, str], settings: ErasureSettings, name: str,
                raise_invalid: bool = False) -> tuple[UpdateReport | None, list[RequestOutcome]]:
    """Erase ``requests`` (their attempt runs in ``runs``) from ``name``'s champion in one update.

    ``raise_invalid``: a request that fails validation raises (the one-request flow) instead of
    failing alone (batches)."""
    # What this update fetches from S3 (forget images among it) is gone when it ends, whatever the end.
    if settings.fetch_dir is not None:
        settings.fetch_dir.mkdir(parents=True, exist_ok=True)
    # Its requests mostly evaluate on the same test split: built once per update (shared_eval_sets).
    with tempfile.TemporaryDirectory(prefix="erasure-fetched-", dir=settings.fetch_dir) as fetched, shared_eval_sets():
        return _update(requests, runs, settings.model_copy(update={"fetch_dir": Path(fetched)}), name, raise_invalid)


def _update(requests: list[ErasureRequest], runs: dict[str, str], settings: ErasureSettings, name: str,
            raise_invalid: bool) -> tuple[UpdateReport | None, list[RequestOutcome]]:
    started = time.perf_counter()
    client = MlflowClient()
    reference = reference_for_champion(settings, name)  # the data the champion was registered and scored with
    settings = reference.settings
    champion = load_champion(settings, name)
    loaded = time.perf_counter()

    data, outcomes = {}, []
    for request in requests:
        run_id = runs[request.request_id]
        record_reference_choice(run_id, reference)
        try:
            with mlflow.start_run(run_id=run_id):  # its validation report goes on its own run
                data[request.request_id] = validate_request(request, settings, champion)
            ledger.set_status(client, run_id, "validated")
        except Exception as exc:
            outcomes.append(fail_request(client, run_id, request.request_id, exc))
            if raise_invalid:
                raise
    valid = [r for r in requests if r.request_id in data]
    if not valid:
        return None, outcomes
    prepared = time.perf_counter()
    timings = Timings(load_champion_s=loaded - started, data_and_validation_s=prepared - loaded)

    single = len(valid) == 1
    work = (mlflow.start_run(run_id=runs[valid[0].request_id]) if single else
            mlflow.start_run(run_name=f"update-{'-'.join(r.request_id for r in valid)}"[:200],
                             tags={"erasure.kind": "batch", "erasure.request_ids": json.dumps([r.request_id for r in valid])}))
    try:
        with work:
            plan = plan_update(valid, quote(data), champion, settings)
            mlflow.log_params({"champion.version": champion.version, "requests": len(valid), "seeds": valid[0].seeds,
                               **{f"gate.{k}": v for k, v in plan.thresholds.items()},
                               "heldout.suite": plan.eval_set.heldout.name, "heldout.kind": plan.eval_set.heldout.kind,
                               "heldout.source": plan.eval_set.heldout.source,
                               **({"request.method": valid[0].method, "request.target": plan.all_targets[-1].name,
                                   **{f"manifest.{k}": v for k, v in data[valid[0].request_id].manifest_hashes.items()}} if single else
                                  {"request.ids": ",".join(r.request_id for r in valid)[:500],
                                   "groups": "; ".join(f"{'+'.join(t.name for t in g.targets)} by {g.plan[0]}" for g in plan.groups)[:500]})})
            before = evaluate_before(champion, quote(plan))
            timings = timings.model_copy(update={"evaluate_s": time.perf_counter() - prepared})
            for request in valid:
                ledger.set_status(client, runs[request.request_id], "running")
            unlearned = unlearn_update(quote(plan), champion, before, settings, max(r.time_budget_s for r in valid))
            # A batch failing the gates it already has is split, not certified: no depth to measure.
            needed = single or all(g.passed for g in unlearned.best.gates)
            depth = measure_depth(quote(plan), champion, unlearned, settings) if needed else None
            report = decide_gates(quote(plan), unlearned, before, champion, timings, depth)

            if single and valid[0].dry_run:
                reason = "gates passed" if report.gates_passed else "gates failed"
                ledger.set_status(client, report.mlflow_run_id, "dry_run", reason=reason)
                outcome = RequestOutcome(request_id=valid[0].request_id, status="dry_run", reason=reason, mlflow_run_id=report.mlflow_run_id)
                return report.model_copy(update={"decision": "dry_run", "reason": reason}), [*outcomes, outcome]
            if report.gates_passed:
                report.model_version = register_update(settings, name, quote(plan), unlearned, champion, report)
                with shutdown.critical("the promotion"), transaction():
                    promote_update(settings, name, report)
                    # Anything failing from here on (certificates, ledger) puts the aliases back.
                    outcomes += publish(settings, name, report, valid, runs, "promoted")
                forget_cached_images(settings, quote(plan), runs)
                delete_sources(settings, valid, runs)
                return report.model_copy(update={"decision": "promoted"}), outcomes
            if single:
                report.model_version = register_update(settings, name, quote(plan), unlearned, champion, report)
                mark_rejected(name, report)
                outcomes += publish(settings, name, report, valid, runs, "rejected")
                return report.model_copy(update={"decision": "rejected", "reason": f"failed gates: {', '.join(report.failed_gates)}"}), outcomes
            # A batch that fails is not registered: the batch flow splits it to find the culprit.
            mlflow.set_tag("erasure.decision", "split")
            return report.model_copy(update={"decision": "split", "reason": f"failed gates: {', '.join(report.failed_gates)}"}), outcomes
    except BaseException as exc:  # a stop signal too (SystemExit): the attempt is recorded failed, retryable
        for request in valid:
            fail_request(client, runs[request.request_id], request.request_id, exc)
        raise
