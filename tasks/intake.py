"""Filing requests: the one way a request enters the ledger, for `erasure submit`, the inbox and
the deletion bridge alike.

A request is filed once, under its own lock (two inbox scans, or an inbox and a bridge, may file
the same id at the same moment); a second filing answers what the ledger holds. After filing, a
``clip-erasure.request.received`` event tells the serving deployments to run a batch now instead
of at the next schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient

from tasks import events, ledger
from tasks.locks import exclusive
from tasks.registry import configure_mlflow
from tasks.request import ErasureRequest
from tasks.settings import ErasureSettings


@dataclass
class Filed:
    """What filing a request did: ``filed`` is False when the ledger already had it."""

    state: ledger.RequestState
    filed: bool
    model_name: str

    @property
    def done(self) -> bool:
        """Whether the request needs no more work (promoted, rejected, dry run)."""
        return self.state.status in ledger.TERMINAL


def submit(request: ErasureRequest, settings: ErasureSettings, client: MlflowClient | None = None) -> Filed:
    """File ``request`` as ``received`` unless the ledger has it already.

    Raises:
        ledger.RequestConflict: the id is in the ledger with other content.
    """
    experiment_id = configure_mlflow(settings)
    client = client or MlflowClient()
    model_name = request.model or settings.model_name
    state = ledger.find(client, settings.experiment, request.request_id, warning_days=settings.deadline_warning_days)
    filed = False
    if state is None:  # only a first filing can race another one: take the request's lock for it
        with exclusive(f"request:{request.request_id}", settings, timeout_s=60):
            state = ledger.find(client, settings.experiment, request.request_id, warning_days=settings.deadline_warning_days)
            filed = state is None
            if filed:
                state = ledger.file_request(client, experiment_id, request, model_name, deadline_days=settings.deadline_days)
    ledger.check_resubmission(state, request)
    return Filed(state, filed, model_name)


def announce(filed: Filed, source: str) -> bool:
    """Post ``clip-erasure.request.received`` for a request that still needs work.

    The event id is derived from the request id and content, so announcing the same request twice
    (a rescan, a redelivered message) posts the same id. Returns True once the server has it,
    False with no Prefect server configured or nothing left to do.

    Raises:
        events.EventNotDelivered: a server is configured and did not confirm the event.
    """
    if filed.done:
        return False
    state = filed.state
    return events.post_event(
        events.REQUEST_RECEIVED, f"clip-erasure.request.{state.request_id}",
        {"request_id": state.request_id, "model": filed.model_name, "source": source},
        key=f"request|{state.request_id}|{state.request_hash}|{len(state.attempts)}",
        related=[{"prefect.resource.id": f"clip-erasure.model.{filed.model_name}", "prefect.resource.role": "model"}],
    )


def announce_pending(settings: ErasureSettings, reason: str = "startup") -> int:
    """Post one request event per model that has pending requests (filed, reopened, or failed and
    retryable), so a batch runs now rather than at the next schedule: after a restart, say.
    Returns how many events were posted."""
    configure_mlflow(settings)
    waiting = ledger.pending(MlflowClient(), settings.experiment)
    models = sorted({state.model_name or settings.model_name for state in waiting})
    posted = 0
    for model_name in models:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        posted += events.post_event(
            events.REQUEST_RECEIVED, f"clip-erasure.request.{reason}", {"request_id": None, "model": model_name, "source": reason},
            key=f"{reason}|{model_name}|{stamp}",
            related=[{"prefect.resource.id": f"clip-erasure.model.{model_name}", "prefect.resource.role": "model"}])
    return posted
