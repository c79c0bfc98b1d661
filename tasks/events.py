"""Events the pipeline posts to the Prefect server, confirmed delivered.

``prefect.events.emit_event`` is fire-and-forget: fine for notifications, not for an event that
starts an erasure, where the sender (the inbox, the SQS bridge) must know the server has it before
it lets go of its own copy. :func:`post_event` POSTs to ``<PREFECT_API_URL>/events`` and returns
once the server answered 2xx. Event ids are UUIDs derived from a caller's stable key (a request id
and hash, an SQS message id), so a redelivery posts the same id; Prefect only de-duplicates ids
in memory for a while, so exactly-once still comes from the ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone

import httpx

logger = logging.getLogger(__name__)

REQUEST_RECEIVED = "clip-erasure.request.received"
DELETION_RECEIVED = "clip-erasure.deletion.received"
CHAMPION_PROMOTED = "clip-erasure.champion.promoted"
CHAMPION_ROLLED_BACK = "clip-erasure.champion.rolled-back"
_NAMESPACE = uuid.UUID("6f1d3c2a-8a4e-4f8e-9a51-3c6f0e4b2d17")


class EventNotDelivered(RuntimeError):
    """The Prefect server did not confirm an event (unreachable, or it answered an error)."""


def event_id(key: str) -> str:
    """A UUID that is the same for the same ``key``: the event id of a redelivered message."""
    return str(uuid.uuid5(_NAMESPACE, key))


def api_url() -> str | None:
    """The Prefect server's API address, or None when none is configured (ephemeral mode)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return url.rstrip("/") if url else None


def post_event(event: str, resource_id: str, payload: dict, key: str, related: list[dict] | None = None,
               timeout_s: float = 10.0) -> bool:
    """Post one event and wait for the server to take it.

    Args:
        event: the event name, e.g. :data:`REQUEST_RECEIVED`.
        resource_id: ``prefect.resource.id`` of the event's resource, e.g. ``clip-erasure.request.<id>``.
        payload: JSON-able event payload.
        key: what makes the event unique; the same key gives the same event id.

    Returns:
        True once the server answered 2xx; False when no Prefect server is configured (there is
        nothing to trigger: the scheduled batch will find the request in the ledger).

    Raises:
        EventNotDelivered: a server is configured but did not confirm the event.
    """
    url = api_url()
    if url is None:
        logger.info("no Prefect server configured: %s not posted (the ledger keeps the request)", event)
        return False
    body = [{
        "id": event_id(key),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": event,
        "resource": {"prefect.resource.id": resource_id},
        "related": related or [],
        "payload": payload,
    }]
    try:
        response = httpx.post(f"{url}/events", json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EventNotDelivered(f"{event} not delivered to {url}: {exc}") from exc
    if response.status_code // 100 != 2:
        raise EventNotDelivered(f"{event} not delivered to {url}: HTTP {response.status_code} {response.text[:200]}")
    return True


WEBHOOK_URL_ENV, WEBHOOK_SECRET_ENV, WEBHOOK_TIMEOUT_ENV = "ERASURE_WEBHOOK_URL", "ERASURE_WEBHOOK_SECRET", "ERASURE_WEBHOOK_TIMEOUT_S"
SIGNATURE_HEADER, TIMESTAMP_HEADER = "X-Clip-Erasure-Signature", "X-Clip-Erasure-Timestamp"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 over ``timestamp.body``, as a receiver recomputes it."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def notify_serving(event: str, model_name: str, version: str | None, request_ids: list[str], extra: dict | None = None,
                   attempts: int = 3, timeout_s: float | None = None) -> dict | None:
    """Tell what serves the model that its champion changed: the Prefect event, and a signed webhook.

    The webhook goes to ``ERASURE_WEBHOOK_URL`` when set, signed with ``ERASURE_WEBHOOK_SECRET``
    (an environment variable, never a logged setting). It is tried ``attempts`` times; a receiver
    that stays down is logged, not fatal: the champion has moved either way, and the event says so.

    A receiver that puts the new champion into service before it answers (``erasure serve-model``)
    says when, as ``{"in_service_at": ISO time}``; it may take ``ERASURE_WEBHOOK_TIMEOUT_S``
    (default 120 s) to do so.

    Returns:
        ``{"notified_at": when the receiver confirmed, "in_service_at": its answer's, or None}``
        (ISO times), or None when no receiver confirmed.
    """
    payload = {"event": event, "model": model_name, "version": version, "request_ids": request_ids, **(extra or {})}
    try:
        from prefect.events import emit_event

        if api_url():
            emit_event(event, resource={"prefect.resource.id": f"clip-erasure.model.{model_name}"}, payload=payload)
    except Exception as exc:  # a notification: never the reason an erasure fails
        logger.warning("could not emit %s: %s", event, exc)
    url = os.environ.get(WEBHOOK_URL_ENV)
    if not url:
        return None
    body = json.dumps(payload, sort_keys=True).encode()
    stamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp}
    secret = os.environ.get(WEBHOOK_SECRET_ENV)
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, stamp, body)
    else:
        logger.warning("%s is not set: the webhook to %s goes unsigned", WEBHOOK_SECRET_ENV, url)
    timeout_s = timeout_s or float(os.environ.get(WEBHOOK_TIMEOUT_ENV, "120"))
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
            if response.status_code // 100 == 2:
                return {"notified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "in_service_at": _in_service_at(response)}
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = type(exc).__name__
        if attempt < attempts:
            time.sleep(0.5 * 2 ** (attempt - 1))
    logger.warning("webhook for %s of %s v%s not confirmed after %d attempts (%s)", event, model_name, version, attempts, problem)
    return None


def _in_service_at(response: httpx.Response) -> str | None:
    """The receiver's ``in_service_at`` when it is an ISO time, else None (a receiver that only acknowledges)."""
    try:
        value = response.json().get("in_service_at")
        return datetime.fromisoformat(value).isoformat() if isinstance(value, str) else None
    except (ValueError, AttributeError):
        return None
