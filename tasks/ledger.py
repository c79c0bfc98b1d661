"""The erasure ledger: the state of every request, kept in MLflow so no new service is needed.

One MLflow run per request (experiment ``<experiment>``, run name = request id) carries the tags
``erasure.request_id``, ``erasure.status`` and ``erasure.reason``; every change also appends to a
timestamped ``erasure.history`` tag, so the MLflow UI shows the whole story of a request.

Statuses: received → validated → running → promoted | rejected | failed | dry_run; a promoted
request returns to ``pending`` when the model version carrying it is rolled back over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities import Run

STATUSES = ("received", "validated", "running", "promoted", "rejected", "failed", "dry_run", "pending")
TERMINAL = ("promoted", "rejected", "dry_run")
REQUEST_ID, STATUS, REASON, HISTORY = "erasure.request_id", "erasure.status", "erasure.reason", "erasure.history"


@dataclass
class LedgerEntry:
    request_id: str
    status: str
    reason: str
    run_id: str
    model_version: str | None
    updated: str
    history: list[dict]

    @classmethod
    def from_run(cls, run: Run) -> "LedgerEntry":
        tags = run.data.tags
        return cls(tags[REQUEST_ID], tags.get(STATUS, "received"), tags.get(REASON, ""), run.info.run_id,
                   tags.get("erasure.model_version"), tags.get("erasure.updated", ""), json.loads(tags.get(HISTORY, "[]")))


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"MLflow experiment {experiment!r} does not exist yet: run `erasure demo` or `erasure run` first")
    return found.experiment_id


def find(client: MlflowClient, experiment: str, request_id: str) -> LedgerEntry | None:
    """The ledger entry of ``request_id`` (its top-level run), or None."""
    try:
        experiment_id = _experiment_id(client, experiment)
    except LookupError:
        return None
    runs = client.search_runs([experiment_id], f"tags.`{REQUEST_ID}` = '{request_id}' and tags.`erasure.kind` = 'request'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return LedgerEntry.from_run(runs[0]) if runs else None


def entries(client: MlflowClient, experiment: str, status: str | None = None) -> list[LedgerEntry]:
    """Every request, newest first (optionally only those with ``status``)."""
    try:
        experiment_id = _experiment_id(client, experiment)
    except LookupError:
        return []
    query = "tags.`erasure.kind` = 'request'" + (f" and tags.`{STATUS}` = '{status}'" if status else "")
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=10_000)
    return [LedgerEntry.from_run(r) for r in runs]


def set_status(client: MlflowClient, run_id: str, status: str, reason: str = "", **tags: str) -> None:
    """Move a request to ``status`` and append the change to its history tag."""
    if status not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}; one of {STATUSES}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    history = json.loads(client.get_run(run_id).data.tags.get(HISTORY, "[]"))
    history.append({"status": status, "at": now, **({"reason": reason} if reason else {})})
    # MLflow tag values are capped (8k chars in 3.x); keep the most recent changes.
    while len(json.dumps(history)) > 5000:
        history.pop(0)
    for key, value in {STATUS: status, REASON: reason, "erasure.updated": now, HISTORY: json.dumps(history), **tags}.items():
        client.set_tag(run_id, key, value)
