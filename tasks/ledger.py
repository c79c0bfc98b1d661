"""The erasure ledger: the state of every request, kept in MLflow so no new service is needed.

Every *attempt* at a request is one MLflow run (run name = request id) tagged
``erasure.kind=request``, ``erasure.request_id``, ``erasure.request_hash``, ``erasure.attempt``
(1, 2, 3, ...), ``erasure.status``, ``erasure.reason``, ``erasure.model_name``,
``erasure.requested_at`` and ``erasure.due_at``; every status change also appends to a timestamped
``erasure.history`` tag, and the request itself is the run's ``request.json`` artifact. A request's
state is its latest attempt's, so a failure followed by a success reads as the success.

Statuses: received → validated → running → promoted | rejected | failed | dry_run; a promoted
request returns to ``pending`` when the model version carrying it is rolled back over.

A run at work holds a *lease* (``erasure.lease_until``), renewed by :func:`lease` while it lives. A
``validated``/``running`` attempt whose lease ran out was killed (``kill -9``, a lost machine): it
reads as ``failed`` and may run again. Leases only tell the state; what keeps two runs of one
request apart is :func:`tasks.locks.exclusive`, held around "read the state, start an attempt, run".
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from mlflow import MlflowClient
from mlflow.entities import Run, RunTag

if TYPE_CHECKING:
    from tasks.request import ErasureRequest

STATUSES = ("received", "validated", "running", "promoted", "rejected", "failed", "dry_run", "pending")
TERMINAL = ("promoted", "rejected", "dry_run")  # a resubmission is answered from the ledger
RERUNNABLE = ("received", "failed", "pending")  # may (re)run; "received" = filed, not yet started
IN_PROGRESS = ("received", "validated", "running")  # an attempt that may hold a lease
LEASED = ("validated", "running")  # set_status starts a lease for these when none is live

RETRYABLE = "erasure.retryable"  # on a failed attempt: "false" when only a changed request can succeed
ORIGIN_OBJECTS = "erasure.origin_objects"  # identities of the data-lake objects a deletion request erases
KIND, REQUEST_ID, REQUEST_HASH, ATTEMPT = "erasure.kind", "erasure.request_id", "erasure.request_hash", "erasure.attempt"
STATUS, REASON, HISTORY = "erasure.status", "erasure.reason", "erasure.history"
MODEL_VERSION, MODEL_NAME, UPDATED = "erasure.model_version", "erasure.model_name", "erasure.updated"
LEASE_UNTIL, REQUESTED_AT, DUE_AT, DEADLINE_FLAG = "erasure.lease_until", "erasure.requested_at", "erasure.due_at", "erasure.deadline_flag"
HISTORY_MAX_CHARS = 5000  # MLflow caps tag values (8k chars in 3.x); the history keeps its most recent rows

logger = logging.getLogger(__name__)


class RequestConflict(ValueError):
    """A request id already in the ledger with other content."""


@dataclass
class Attempt:
    """One MLflow run at a request. ``status`` is the effective one: an expired lease reads as failed."""

    number: int
    run_id: str
    status: str
    reason: str
    started: str
    updated: str
    model_version: str | None
    lease_until: str | None
    history: list[dict]
    recorded_status: str = ""  # the status tag as written, when it differs from ``status``

    @classmethod
    def from_run(cls, run: Run, number: int, now: datetime) -> "Attempt":
        tags = run.data.tags
        status, reason = tags.get(STATUS, "received"), tags.get(REASON, "")
        lease_until = tags.get(LEASE_UNTIL) or None
        recorded = ""
        if status in IN_PROGRESS and lease_until and _parse_time(lease_until) <= now:
            recorded = status
            status, reason = "failed", f"the run stopped without finishing (lease expired at {lease_until}): it may run again"
        started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
        return cls(_attempt_number(run) or number, run.info.run_id, status, reason, started, tags.get(UPDATED, ""),
                   tags.get(MODEL_VERSION), lease_until, _history(tags), recorded)


@dataclass
class RequestState:
    """One request id with all its attempts (oldest first); the top-level fields are the latest attempt's."""

    request_id: str
    status: str
    reason: str
    run_id: str
    model_version: str | None
    request_hash: str
    model_name: str | None
    requested_at: str | None
    due_at: str | None
    attempts: list[Attempt]
    warning_days: float = 7.0  # "due soon" window of deadline_flag
    recorded_flag: str = ""  # the deadline flag tag on the latest attempt, as last marked

    @classmethod
    def from_runs(cls, runs: list[Run], warning_days: float | None = None, now: datetime | None = None) -> "RequestState":
        """The state of one request from its runs (any order)."""
        now = now or _now()
        runs = sorted(runs, key=lambda r: (_attempt_number(r), r.info.start_time))
        attempts = [Attempt.from_run(run, i, now) for i, run in enumerate(runs, start=1)]
        latest, tags = attempts[-1], runs[-1].data.tags
        request_hash = tags.get(REQUEST_HASH) or next((r.data.tags[REQUEST_HASH] for r in runs if r.data.tags.get(REQUEST_HASH)), "")
        return cls(tags[REQUEST_ID], latest.status, latest.reason, latest.run_id, latest.model_version, request_hash,
                   tags.get(MODEL_NAME), tags.get(REQUESTED_AT), tags.get(DUE_AT), attempts,
                   _warning_days() if warning_days is None else warning_days, tags.get(DEADLINE_FLAG, ""))

    @property
    def updated(self) -> str:
        return self.attempts[-1].updated

    @property
    def days_left(self) -> float | None:
        """Days until ``due_at`` (negative when overdue), or None without a due date."""
        if not self.due_at:
            return None
        return (_parse_time(self.due_at) - _now()).total_seconds() / 86400

    @property
    def deadline_flag(self) -> str:
        """``overdue``, ``due_soon`` (within ``warning_days``) or "" (on time, no due date, or handled)."""
        left = self.days_left
        if left is None or self.status in TERMINAL:
            return ""
        return "overdue" if left < 0 else "due_soon" if left <= self.warning_days else ""

    @property
    def history(self) -> list[dict]:
        """Every attempt's history rows in time order, each with its ``attempt`` number."""
        rows = [{**row, "attempt": a.number} for a in self.attempts for row in a.history]
        return sorted(rows, key=lambda row: row.get("at", ""))  # stable: rows of one second keep their order

    def as_dict(self) -> dict:
        """Everything, properties included, as JSON-ready values."""
        return {**asdict(self), "updated": self.updated, "days_left": self.days_left, "deadline_flag": self.deadline_flag,
                "history": self.history}


LedgerEntry = RequestState  # the name before attempts existed


def find(client: MlflowClient, experiment: str, request_id: str, warning_days: float | None = None) -> RequestState | None:
    """The state of ``request_id`` over all its attempts, or None when it is not in the ledger."""
    experiment_id = _experiment_id(client, experiment)
    if experiment_id is None or "'" in request_id:  # request ids cannot hold quotes (REQUEST_ID_PATTERN)
        return None
    runs = _request_runs(client, experiment_id, request_id)
    return RequestState.from_runs(runs, warning_days) if runs else None


def entries(client: MlflowClient, experiment: str, status: str | None = None, warning_days: float | None = None) -> list[RequestState]:
    """One state per request id, the most recently attempted first; ``status`` filters the effective status."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}; one of {STATUSES}")
    experiment_id = _experiment_id(client, experiment)
    if experiment_id is None:
        return []
    grouped: dict[str, list[Run]] = {}
    for run in _search(client, experiment_id, f"tags.`{KIND}` = 'request'"):
        if run.data.tags.get(REQUEST_ID):
            grouped.setdefault(run.data.tags[REQUEST_ID], []).append(run)
    now = _now()
    newest_first = sorted(grouped.values(), key=lambda runs: max(r.info.start_time for r in runs), reverse=True)
    states = [RequestState.from_runs(runs, warning_days, now) for runs in newest_first]
    return [s for s in states if status is None or s.status == status]


def pending(client: MlflowClient, experiment: str, model_name: str | None = None) -> list[RequestState]:
    """Requests that may (re)run (effective status in :data:`RERUNNABLE`), the earliest due first.

    Args:
        model_name: only requests recorded against this registered model; None: all.
    """
    states = [s for s in entries(client, experiment) if s.status in RERUNNABLE and (model_name is None or s.model_name == model_name)]
    far = datetime.max.replace(tzinfo=timezone.utc)
    # entries() is newest first; reversed, equal deadlines keep the order the requests were filed in
    return sorted(reversed(states), key=lambda s: (_parse_time(s.due_at) if s.due_at else far, s.requested_at or ""))


def request_body(client: MlflowClient, state_or_run_id: RequestState | str) -> dict:
    """The ``request.json`` of a request's latest attempt (or of one run), to run it again."""
    run_id = state_or_run_id.run_id if isinstance(state_or_run_id, RequestState) else state_or_run_id
    with tempfile.TemporaryDirectory(prefix="request-") as folder:
        return json.loads(Path(client.download_artifacts(run_id, "request.json", folder)).read_text())


def check_resubmission(state: RequestState | None, request: "ErasureRequest") -> None:
    """Refuse a request whose id is in the ledger with other content (a new requested_at is the same content).

    Raises:
        RequestConflict: naming the id, both hashes and the fix.
    """
    if state is None or not state.request_hash:  # runs recorded before hashes were kept cannot be compared
        return
    new = request.content_hash()
    if new != state.request_hash:
        raise RequestConflict(
            f"request_id {request.request_id!r} is already in the ledger with other content (recorded hash "
            f"{state.request_hash[:12]}, this one {new[:12]}; status {state.status}): give the changed request a new "
            f"request_id, e.g. \"{request.request_id}-2\", or resubmit the recorded one unchanged")


def start_attempt(client: MlflowClient, experiment_id: str, request: "ErasureRequest", model_name: str, status: str = "received",
                  run_id: str | None = None, deadline_days: float | None = None) -> str:
    """Record the next attempt at ``request`` (number = attempts so far + 1) and return its run id.

    Take ``tasks.locks.exclusive(f"request:{id}")`` around reading the state and calling this, or
    two concurrent callers both make attempt n.

    Args:
        run_id: an already started run (the flow's ``mlflow.start_run``) to tag as the attempt;
            None creates one. A run that already is an attempt of this request keeps its number.
        deadline_days: days from ``requested_at`` to the due date when the request sets none;
            default ``ERASURE_DEADLINE_DAYS``.

    Raises:
        RequestConflict: an earlier attempt has another request hash.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}; one of {STATUSES}")
    runs = _request_runs(client, experiment_id, request.request_id)
    earlier = [r for r in runs if r.info.run_id != run_id]
    check_resubmission(RequestState.from_runs(earlier) if earlier else None, request)
    own = next((r for r in runs if r.info.run_id == run_id), None)
    number = (own.data.tags.get(ATTEMPT) if own else None) or str(len(earlier) + 1)
    if deadline_days is None:
        from tasks.settings import get_settings

        deadline_days = get_settings().deadline_days
    tags = {KIND: "request", REQUEST_ID: request.request_id, REQUEST_HASH: request.content_hash(), ATTEMPT: number,
            MODEL_NAME: model_name, "erasure.requester": request.requester, REQUESTED_AT: _iso(request.requested_at),
            DUE_AT: _iso(request.due(deadline_days))}
    if request.origin is not None:  # lets the deletion bridge see which lake objects are already filed
        tags[ORIGIN_OBJECTS] = ",".join(o.identity for o in request.origin.objects)[:4900]
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=request.request_id, tags=tags).info.run_id
    else:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_dict(run_id, json.loads(request.model_dump_json()), "request.json")
    set_status(client, run_id, status)
    return run_id


def file_request(client: MlflowClient, experiment_id: str, request: "ErasureRequest", model_name: str,
                 deadline_days: float | None = None) -> RequestState:
    """Record ``request`` as ``received`` without running it (``erasure submit``).

    Idempotent: a request already in the ledger is returned as it is, whatever its state (a failed
    or pending one is not given a new attempt here).

    Raises:
        RequestConflict: the id is in the ledger with other content.
    """
    runs = _request_runs(client, experiment_id, request.request_id)
    if not runs:
        start_attempt(client, experiment_id, request, model_name, "received", deadline_days=deadline_days)
        runs = _request_runs(client, experiment_id, request.request_id)
    state = RequestState.from_runs(runs)
    check_resubmission(state, request)
    return state


def set_status(client: MlflowClient, run_id: str, status: str, reason: str = "", lease_seconds: float | None = None, **tags: str) -> None:
    """Move an attempt to ``status``, append the change to its history, and keep its lease in step.

    ``validated``/``running`` start a lease of ``lease_seconds`` (default ``ERASURE_LEASE_SECONDS``)
    unless one is live already (:func:`lease` renews it); any status past those clears the lease.

    Args:
        tags: more run tags to set with the change, e.g. ``**{"erasure.model_version": "3"}``.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown ledger status {status!r}; one of {STATUSES}")
    current = client.get_run(run_id).data.tags
    now = _now()
    history = _history(current)
    history.append({"status": status, "at": _iso(now), **({"reason": reason} if reason else {})})
    while len(json.dumps(history)) > HISTORY_MAX_CHARS:
        history.pop(0)
    updates = {STATUS: status, REASON: reason, UPDATED: _iso(now), HISTORY: json.dumps(history), **tags}
    live = current.get(LEASE_UNTIL) and _parse_time(current[LEASE_UNTIL]) > now
    if status in LEASED and not live:
        updates[LEASE_UNTIL] = _iso_ms(now + timedelta(seconds=lease_seconds or _lease_seconds()))
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in updates.items()])
    if status not in IN_PROGRESS and current.get(LEASE_UNTIL):
        client.delete_tag(run_id, LEASE_UNTIL)


@contextmanager
def lease(client: MlflowClient, run_id: str, seconds: float | None = None) -> Iterator[None]:
    """Hold the attempt's lease while the block runs: ``erasure.lease_until`` = now + ``seconds``,
    renewed every ``seconds``/3 by a daemon thread.

    A process killed inside the block stops renewing, so the attempt reads as failed once the lease
    runs out. Leaving the block with the attempt still in progress ends the lease at once (it
    stopped without finishing); leaving it finished removes the tag.

    Args:
        seconds: lease length; default ``ERASURE_LEASE_SECONDS`` (120).
    """
    seconds = seconds or _lease_seconds()
    if seconds <= 0:
        raise ValueError(f"lease seconds must be positive, got {seconds}")
    client.set_tag(run_id, LEASE_UNTIL, _iso_ms(_now() + timedelta(seconds=seconds)))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            try:
                if client.get_run(run_id).data.tags.get(STATUS) not in IN_PROGRESS:
                    return  # finished: set_status cleared the lease
                client.set_tag(run_id, LEASE_UNTIL, _iso_ms(_now() + timedelta(seconds=seconds)))
            except Exception as exc:  # a store hiccup: try again next round; the lease may run out meanwhile
                logger.warning("could not renew the lease of run %s: %s", run_id, exc)

    renewer = threading.Thread(target=renew, name=f"ledger-lease-{run_id[:8]}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=30)
        try:
            tags = client.get_run(run_id).data.tags
            if tags.get(STATUS) in IN_PROGRESS:
                client.set_tag(run_id, LEASE_UNTIL, _iso_ms(_now()))
            elif tags.get(LEASE_UNTIL):  # a renewal raced set_status
                client.delete_tag(run_id, LEASE_UNTIL)
        except Exception as exc:
            logger.warning("could not end the lease of run %s: %s", run_id, exc)


def mark_deadlines(client: MlflowClient, experiment: str, warning_days: float) -> list[RequestState]:
    """Flag every unfinished request that is past due or due within ``warning_days``.

    Sets ``erasure.deadline_flag`` (``overdue``/``due_soon``) on its latest attempt (and removes a
    flag that no longer holds) and emits the Prefect event ``clip-erasure.request.overdue`` or
    ``clip-erasure.request.due-soon``. Returns the flagged requests.
    """
    flagged = []
    for state in entries(client, experiment, warning_days=warning_days):
        flag = state.deadline_flag
        if not flag:
            if state.recorded_flag:
                client.delete_tag(state.run_id, DEADLINE_FLAG)
            continue
        client.set_tag(state.run_id, DEADLINE_FLAG, flag)
        state.recorded_flag = flag
        _emit(f"clip-erasure.request.{flag.replace('_', '-')}", state)
        flagged.append(state)
    return flagged


def _emit(event: str, state: RequestState) -> None:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.events import emit_event
        from prefect.settings import get_current_settings

        if not (get_current_settings().api.url or FlowRunContext.get() or TaskRunContext.get()):
            # No server and no run: Prefect would start a throwaway ephemeral server (~30 s) just to drop the event.
            logger.info("no Prefect server configured: %s for request %s is recorded as a tag only", event, state.request_id)
            return
        emit_event(event, resource={"prefect.resource.id": f"clip-erasure.request.{state.request_id}"},
                   payload={"request_id": state.request_id, "due_at": state.due_at, "days_left": state.days_left})
    except Exception as exc:  # no Prefect server to tell: the tag still records the flag
        logger.warning("could not emit %s for request %s: %s", event, state.request_id, exc)


def _experiment_id(client: MlflowClient, experiment: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    return None if found is None else found.experiment_id


def _request_runs(client: MlflowClient, experiment_id: str, request_id: str) -> list[Run]:
    return _search(client, experiment_id, f"tags.`{KIND}` = 'request' and tags.`{REQUEST_ID}` = '{request_id}'")


def _search(client: MlflowClient, experiment_id: str, query: str) -> list[Run]:
    """Every run matching ``query``, oldest first (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _attempt_number(run: Run) -> int:
    value = run.data.tags.get(ATTEMPT)
    return int(value) if value and value.isdigit() else 0  # runs from before attempts were numbered sort by start time


def _history(tags: dict) -> list[dict]:
    try:
        rows = json.loads(tags.get(HISTORY, "[]"))
    except json.JSONDecodeError:
        return []
    return rows if isinstance(rows, list) else []


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def _iso_ms(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _lease_seconds() -> float:
    from tasks.settings import get_settings

    return get_settings().lease_seconds


def _warning_days() -> float:
    from tasks.settings import get_settings

    return get_settings().deadline_warning_days
