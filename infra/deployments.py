"""Serve the flows as Prefect deployments on one host: `python -m infra.deployments`.

- `erasure/on-request`: runs when a `clip-erasure.request.received` event arrives (emitted by the
  inbox watcher or any system that files a request); the event payload is the request.
- `erasure-batch/every-6h`: erases every pending request of the model in as few updates as the
  gates allow, the most urgent first, and flags requests past or near their deadline.
- `guard/hourly`: re-checks the champion every hour and rolls back automatically.
- `purge/daily`: deletes the weights of versions that miss a promoted erasure once the rollback
  window (`ERASURE_ROLLBACK_WINDOW_DAYS`) has passed.

Needs a running Prefect server (`prefect server start`, then PREFECT_API_URL): schedules and event
triggers are not evaluated in Prefect's ephemeral mode. For a GPU host, deploy the same flows to a
process work pool there instead (see infra/prefect.yaml).
"""

from __future__ import annotations

from prefect import serve
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.batch import batch_flow
from flows.erasure import erasure_flow
from flows.guard import guard_flow
from flows.purge import purge_flow

REQUEST_EVENT = "clip-erasure.request.received"


def deployments():
    on_request = erasure_flow.to_deployment(
        name="on-request",
        triggers=[DeploymentEventTrigger(
            expect={REQUEST_EVENT},
            match={"prefect.resource.id": "clip-erasure.request.*"},
            # A dict parameter must be rendered as JSON, not as a Jinja string.
            parameters={"request": {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ event.payload | tojson }}"}}},
        )],
        tags=["clip-erasure"],
    )
    hourly_guard = guard_flow.to_deployment(name="hourly", schedules=[Cron("0 * * * *", timezone="UTC")], tags=["clip-erasure"])
    # Pending requests (filed, reopened by a rollback, or failed retryably) in batches, every 6 hours:
    # well inside any legal deadline, and few enough model updates to review.
    batches = batch_flow.to_deployment(name="every-6h", schedules=[Cron("15 */6 * * *", timezone="UTC")], tags=["clip-erasure"])
    daily_purge = purge_flow.to_deployment(name="daily", schedules=[Cron("30 3 * * *", timezone="UTC")], tags=["clip-erasure"])
    return [on_request, batches, hourly_guard, daily_purge]


if __name__ == "__main__":
    serve(*deployments())
