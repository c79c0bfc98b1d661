"""Prefect tasks around the registered model: load the champion, register a candidate, promote it
inside a transaction, roll back. Registry calls themselves live in :mod:`tasks.registry`.

Every version carries, as tags, the cumulative list of forget targets and request ids it embodies
(``erasure.targets`` / ``erasure.request_ids``), so any check of a champion can include every
earlier erasure, and a rollback knows which requests it un-does.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.transactions import get_transaction

from tasks import events, registry
from tasks.settings import ErasureSettings
from tasks.retry import only_transient
from unlearning.methods.base import ForgetTarget
from unlearning.models import ClipBundle, load_model
from unlearning.oracle import TrainingRecipe, read_recipe

TARGETS, REQUEST_IDS, PARENT = "erasure.targets", "erasure.request_ids", "erasure.parent_version"
LINEAGE_RETAIN_DROP = "erasure.lineage_retain_drop"  # retain accuracy lost since the first champion, summed over its erasures
HELDOUT_SUITE = "erasure.heldout_suite"  # the held-out suite the version was promoted on (a name or the suite's JSON)


@dataclass
class Champion:
    """The model an erasure starts from, with what it already carries."""

    name: str
    version: str
    recipe: TrainingRecipe | None  # how it was trained, when known: its oracles are trained the same way
    bundle: ClipBundle
    targets: list[ForgetTarget] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    heldout_suite: str | None = None  # None: promoted before suites were recorded (or bootstrapped)
    lineage_retain_drop: float = 0.0  # summed over the erasures since the first champion (0 for it)


def carried(version_tags: dict) -> tuple[list[ForgetTarget], list[str]]:
    """Forget targets and request ids a model version embodies, from its tags."""
    targets = [ForgetTarget.model_validate(t) for t in json.loads(version_tags.get(TARGETS, "[]"))]
    return targets, json.loads(version_tags.get(REQUEST_IDS, "[]"))


def lineage_tags(targets: list[ForgetTarget], request_ids: list[str], parent: str | None) -> dict[str, str]:
    tags = {TARGETS: json.dumps([t.model_dump(exclude_defaults=True) for t in targets]), REQUEST_IDS: json.dumps(request_ids)}
    if parent:
        tags[PARENT] = str(parent)
    return tags


@task(name="load-champion", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient, cache_policy=NO_CACHE)
def load_champion(settings: ErasureSettings, model_name: str | None = None, alias: str = "champion", device: str | None = None) -> Champion:
    """Download the version behind ``alias`` and load it (the frozen reference of this erasure)."""
    name = model_name or settings.model_name
    version = registry.get_version_by_alias(name, alias)
    if version is None:
        raise LookupError(f"registered model {name!r} has no {alias!r} alias: run `erasure demo` (bootstraps the embedded "
                          f"champion) or register your model and set its alias")
    # The download goes once the weights are in memory: a copy of a version left on disk would keep
    # what later erasures removed, out of the purge's reach.
    with tempfile.TemporaryDirectory(prefix=f"{name}-v{version.version}-") as scratch:
        folder = registry.download_version(name, version.version, Path(scratch))
        bundle = load_model(f"local-dir:{folder}", device=device or settings.device)
        recipe = read_recipe(folder)
    targets, request_ids = carried(version.tags)
    get_run_logger().info("champion %s v%s carries %d earlier erasure(s)", name, version.version, len(targets))
    return Champion(name, str(version.version), recipe, bundle, targets, request_ids, version.tags.get(HELDOUT_SUITE),
                    float(version.tags.get(LINEAGE_RETAIN_DROP, 0.0)))


@task(name="register-candidate", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register_candidate(settings: ErasureSettings, folder: Path, name: str, tags: dict[str, str], run_id: str | None) -> str:
    """Register ``folder`` as a new version of ``name`` (not promoted). Returns the version."""
    version = registry.register_model_folder(folder, settings.model_copy(update={"model_name": name}), tags=tags, run_id=run_id)
    return str(version.version)


def _alias_version(name: str, alias: str) -> str | None:
    found = registry.get_version_by_alias(name, alias)
    return None if found is None else str(found.version)


def _point_alias(name: str, alias: str, version: str | None) -> None:
    if version:
        registry.set_alias(name, alias, version)
    elif _alias_version(name, alias) is not None:
        MlflowClient().delete_registered_model_alias(name, alias)


@task(name="promote", cache_policy=NO_CACHE)
def promote(name: str, version: str) -> str | None:
    """Move ``champion`` to ``version`` and ``previous`` to the old champion. Returns the old one.

    Inside a Prefect transaction, the aliases as they were are staged so that a failure later in
    the transaction puts them back (see :func:`_restore_aliases`).
    """
    transaction = get_transaction()
    if transaction is not None:
        transaction.set("model_name", name)
        transaction.set("aliases_before", {a: _alias_version(name, a) for a in ("champion", "previous")})
        transaction.set("promoted_version", str(version))
    _, old = registry.promote(name, version)  # records erasure.promoted_at and syncs every status tag
    return None if old is None else str(old.version)


@promote.on_rollback
def _restore_aliases(transaction) -> None:
    """Undo a promotion when anything after it in the transaction fails."""
    name, before = transaction.get("model_name"), transaction.get("aliases_before")
    for alias, version in before.items():
        _point_alias(name, alias, version)
    promoted = transaction.get("promoted_version", None)
    if promoted is not None:
        # It never served for good: not superseded (that would make it look once-promoted to the purge), but undone.
        registry.tag_version(name, promoted, **{registry.PROMOTION_UNDONE_AT: registry.now_iso()})
        MlflowClient().delete_model_version_tag(name, promoted, registry.PROMOTED_AT)
    registry.sync_status_tags(name)
    emit_event("clip-erasure.promotion.undone", resource={"prefect.resource.id": f"clip-erasure.model.{name}"},
               payload={"restored_aliases": before})


@task(name="tag-version", retries=2, cache_policy=NO_CACHE)
def tag_version(name: str, version: str, **tags: str) -> None:
    registry.tag_version(name, version, **tags)


def _retry_unless_refused(task, task_run, state) -> bool:
    # A refusal (purged target, nothing to roll back to) is final: retrying cannot change it.
    return not isinstance(state.data, (LookupError, ValueError))


@task(name="rollback-champion", retries=1, cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_refused)
def rollback_champion(settings: ErasureSettings, name: str, to_version: str | None, reason: str) -> dict:
    """Move ``champion`` back (to ``to_version``, default the ``previous`` alias) and record why.

    Requests carried by the version rolled back over but not by the restored one return to
    ``pending`` in the ledger: a rollback never silently resurrects erased data. A purged target
    (past the rollback window, no weights left) is refused with
    :class:`tasks.registry.VersionPurged` before any alias moves.
    """
    from tasks import ledger, locks

    # Every alias move of a model happens under its promotion lock (as promotions do).
    with locks.exclusive(f"promote:{name}", settings, timeout_s=settings.lock_timeout_s):
        current = registry.get_version_by_alias(name, "champion")
        if current is None:
            raise LookupError(f"registered model {name!r} has no champion to roll back")
        if to_version is None:
            previous = registry.get_version_by_alias(name, "previous")
            if previous is None:
                raise LookupError(f"{name!r} has no 'previous' alias: name a version with --to")
            to_version = str(previous.version)
        restored = MlflowClient().get_model_version(name, str(to_version))
        if str(restored.version) == str(current.version):
            raise ValueError(f"version {to_version} is already the champion of {name!r}")
        registry.refuse_purged(restored)
        registry.rollback_to(name, str(restored.version), reason)
        # `previous` must never point at the version just rolled back over (a second rollback would
        # resurrect it): it follows the restored champion's lineage instead.
        _point_alias(name, "previous", restored.tags.get(PARENT))
        registry.sync_status_tags(name)
    _, current_requests = carried(current.tags)
    _, restored_requests = carried(restored.tags)
    reopened = [r for r in current_requests if r not in restored_requests]
    client = MlflowClient()
    registry.tag_version(name, str(current.version), reopened_requests=json.dumps(reopened))
    for request_id in reopened:
        entry = ledger.find(client, settings.experiment, request_id)
        if entry is not None:
            ledger.set_status(client, entry.run_id, "pending",
                              reason=f"model v{current.version} rolled back to v{restored.version}: {reason}")
    event = {"rolled_back": str(current.version), "champion": str(restored.version), "reason": reason, "reopened_requests": reopened}
    events.notify_serving(events.CHAMPION_ROLLED_BACK, name, str(restored.version), reopened, extra=event)
    get_run_logger().warning("rolled %s back from v%s to v%s (%s); requests back to pending: %s", name, current.version,
                             restored.version, reason, reopened or "none")
    return event
