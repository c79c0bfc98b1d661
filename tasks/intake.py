"""Filing requests: the one way a request enters the ledger, for `erasure submit`, the inbox and
the deletion bridge alike.

A request is filed once, under its own lock (two inbox scans, or an inbox and a bridge, may file
the same id at the same moment); a second filing answers what the ledger holds. After filing, a
``clip-erasure.request.received`` event tells the serving deployments to run a batch now instead
of at the next schedule.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient

from tasks import events, ledger
from tasks.locks import exclusive
from tasks.registry import configure_mlflow
from tasks.request import ErasureRequest
from tasks.settings import ErasureSettings

logger = logging.getLogger(__name__)


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
        key=announcement_key(state),
        related=[{"prefect.resource.id": f"clip-erasure.model.{filed.model_name}", "prefect.resource.role": "model"}],
    )


def announcement_key(state: ledger.RequestState) -> str:
    """What makes an announcement of ``state`` unique (the event id derives from it)."""
    key = f"request|{state.request_id}|{state.request_hash}|{len(state.attempts)}"
    last = state.attempts[-1] if state.attempts else None
    # An attempt that stopped without finishing is news: the server skips an event id it has seen,
    # so the first announcement's id would start nothing.
    return f"{key}|expired:{last.run_id}" if last and last.recorded_status else key


class LeaseWatch:
    """Announces the requests whose last attempt stopped without finishing (its lease ran out: the
    run was killed, or its machine died), so that a batch takes them up again now rather than at
    the next schedule, however they were filed (submit, inbox, bridge): the one place that does."""

    def __init__(self, settings: ErasureSettings):
        self.settings = settings
        self._seen: set[str] = set()
        configure_mlflow(settings)  # once: the scans run every few seconds

    def scan(self, post: bool = True) -> list[str]:
        """Announce what expired since the last scan; ``post=False`` only notes it (what a startup
        announcement already covers). Returns the request ids announced."""
        announced = []
        for state in ledger.pending(MlflowClient(), self.settings.experiment):
            if not (state.attempts and state.attempts[-1].recorded_status) or (key := announcement_key(state)) in self._seen:
                continue
            if post:
                filed = Filed(state, False, state.model_name or self.settings.model_name)
                if not announce(filed, source="lease-expired"):
                    continue  # no Prefect server: the scheduled batch finds it in the ledger
                announced.append(state.request_id)
            self._seen.add(key)
        return announced

    def watch(self, interval_s: float, stop: threading.Event) -> None:
        """Scan every ``interval_s`` seconds until ``stop`` is set (a thread of ``erasure serve``)."""
        while not stop.wait(interval_s):
            try:
                if announced := self.scan():
                    logger.info("requests whose run stopped without finishing, announced again: %s", ", ".join(announced))
            except Exception as exc:  # the store or the server away for a moment: the next scan tries again
                logger.warning("lease watch: scan failed, next one in %.0f s: %s", interval_s, exc)


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
