"""The purge flow: delete the weights of versions that miss a promoted erasure, once the rollback window has passed.

Run daily by the `purge/daily` deployment, or by hand: `erasure purge [--dry-run] [--window-days D]`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event

from tasks import locks
from tasks.purge import PurgeReport, certify_purges, plan_purge, purge_version
from tasks.registry import configure_mlflow
from tasks.settings import ErasureSettings, get_settings

PURGED_EVENT = "clip-erasure.version.purged"


@flow(name="purge", log_prints=True)
def purge_flow(model_name: str | None = None, dry_run: bool = False, window_days: float | None = None,
               settings: ErasureSettings | None = None) -> PurgeReport:
    """Purge (or, with ``dry_run``, list) the versions past the rollback window that miss a promoted erasure.

    Args:
        model_name: registered model (default: the configured one).
        dry_run: only report what would be purged; change nothing.
        window_days: the rollback window in days (default: ``rollback_window_days``); 0 purges at once.
        settings: defaults to :func:`get_settings`.

    Returns:
        The report: purged (or would-purge) versions with their reasons and files, and the kept ones.
    """
    settings = settings or get_settings()
    configure_mlflow(settings)
    logger = get_run_logger()
    name = model_name or settings.model_name
    window = settings.rollback_window_days if window_days is None else window_days
    if not window >= 0:  # before any task: a bad window is not worth a retry
        raise ValueError(f"window_days must be >= 0 (got {window}): the days superseded versions keep their weights, 0 purges at once")
    plan = plan_purge(name, window)
    if dry_run:
        for entry in plan.would_purge:
            logger.info("would purge %s v%s (%d files, %d bytes): %s", name, entry.version, len(entry.files), entry.bytes, entry.reason)
        return plan
    purged = []
    for entry in plan.would_purge:
        with locks.exclusive(f"promote:{name}", settings, timeout_s=settings.lock_timeout_s):  # no alias moves meanwhile
            done = purge_version(name, entry, window)
        purged.append(done)
        emit_event(PURGED_EVENT, resource={"prefect.resource.id": f"clip-erasure.model.{name}"},
                   payload={"version": done.version, "missed_requests": done.missed_requests, "purged_at": done.purged_at,
                            "files": len(done.files), "bytes": done.bytes})
        logger.warning("purged %s v%s: %d weight file(s), %d bytes (%s)", name, done.version, len(done.files), done.bytes, done.reason)
    uncertified = certify_purges(settings, name, purged) if purged else []
    if uncertified:
        logger.warning("no ledger run for %s: their certificates do not list the purge", ", ".join(uncertified))
    return plan.model_copy(update={"dry_run": False, "purged": purged, "would_purge": [], "uncertified_requests": uncertified})
