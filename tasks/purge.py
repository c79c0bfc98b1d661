"""Purge: once the rollback window has passed, versions that miss a promoted erasure lose their weights.

A version that is not the champion and lacks a request id the champion carries (``erasure.request_ids``)
still holds the erased data in its weights. It stays a rollback target for
``rollback_window_days`` after the promotion that superseded it; after that its weight files are
deleted from the artifact store. Its audit record stays: the version with its tags, metrics,
params, lineage, the run and every run artifact other than weights, and the logged model's
``MLmodel`` and config (the registry UI keeps showing the version). The version is tagged
``erasure.purged_*`` and each request whose erasure made it purgeable gets
``certificate/purged.json`` on its ledger run.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, computed_field

from tasks import registry
from tasks.champion import carried
from tasks.settings import ErasureSettings

# What counts as weights in a logged model or a run's artifacts; everything else is audit record.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
CERTIFICATE_DIR, PURGED_CERTIFICATE = "certificate", "purged.json"
_MAX_LISTED_REQUESTS = 20  # in the purged_reason tag (MLflow caps tag values at 8k characters)


class WeightFile(BaseModel):
    """One weight file: the artifact repository it lives in and its path there."""

    root: str
    path: str
    size: int = 0

    @property
    def uri(self) -> str:
        return posixpath.join(self.root, self.path)


class PurgeEntry(BaseModel):
    """A version whose weights are (or would be) purged, and why."""

    version: str
    missed_requests: list[str]
    promoted_at: dict[str, str] = Field(description="request id -> when its erasure was promoted (ISO, UTC)")
    files: list[WeightFile] = []
    purged_at: str | None = None  # None: not purged (a dry run)

    @computed_field
    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @computed_field
    @property
    def reason(self) -> str:
        listed = [f"{r} (promoted {self.promoted_at[r]})" for r in self.missed_requests[:_MAX_LISTED_REQUESTS]]
        more = len(self.missed_requests) - len(listed)
        return "misses the promoted erasure(s) " + ", ".join(listed) + (f" and {more} more" if more > 0 else "")


class KeptVersion(BaseModel):
    """A version that keeps its weights, and why."""

    version: str
    status: str
    reason: str


class PurgeReport(BaseModel):
    """What a purge did (or, in a dry run, would do) to one registered model."""

    model: str
    window_days: float
    dry_run: bool
    checked_at: str
    purged: list[PurgeEntry] = []
    would_purge: list[PurgeEntry] = []
    kept: list[KeptVersion] = []
    uncertified_requests: list[str] = Field([], description="requests with no ledger run to log certificate/purged.json on")


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _created(version: ModelVersion) -> datetime:
    return datetime.fromtimestamp(int(version.creation_timestamp) / 1000, tz=timezone.utc)


def _was_promoted(version: ModelVersion, aliases: list[str]) -> bool:
    tags = version.tags or {}
    return (registry.PROMOTED_AT in tags or registry.CHAMPION in aliases or registry.PREVIOUS in aliases
            or registry.ROLLED_BACK_AT in tags or "rollback_reason" in tags
            or tags.get("status") in ("champion", "previous", "superseded", "rolled_back"))


def request_promotion_times(versions: list[ModelVersion], aliases: dict[str, list[str]]) -> dict[str, datetime]:
    """When each request's erasure was promoted: the promotion of the earliest promoted version carrying it.

    Args:
        versions: every version of the model.
        aliases: version -> the aliases pointing at it.

    Returns:
        request id -> promotion time (UTC).
    """
    times: dict[str, datetime] = {}
    for version in sorted(versions, key=lambda v: int(v.version)):
        if not _was_promoted(version, aliases.get(str(version.version), [])):
            continue
        promoted_at = (version.tags or {}).get(registry.PROMOTED_AT)
        # Versions promoted before erasure.promoted_at was recorded: their creation time stands in (the
        # promotion came after it, so the window may end early by the time the erasure took to run).
        when = _parse_time(promoted_at) if promoted_at else _created(version)
        for request_id in carried(version.tags or {})[1]:
            times.setdefault(request_id, when)
    return times


def _resolved_source(version: ModelVersion) -> str:
    """The artifact URI of a version's logged model."""
    source = version.source
    if source.startswith("models:/m-"):
        return MlflowClient().get_logged_model(source[len("models:/"):].split("/")[0]).artifact_location
    if source.startswith("runs:/"):
        return RunsArtifactRepository.get_underlying_uri(source)
    return source


def _list_weights(root: str, path: str | None = None) -> list[WeightFile]:
    repository = get_artifact_repository(root)
    found = []
    for info in repository.list_artifacts(path):
        if info.is_dir:
            found += _list_weights(root, info.path)
        elif info.path.endswith(WEIGHT_SUFFIXES):
            found.append(WeightFile(root=root, path=info.path, size=info.file_size or 0))
    return found


def weight_files(version: ModelVersion, protected_roots: tuple[str, ...] = ()) -> list[WeightFile]:
    """Every weight file a version holds: in its logged model, and any copy under its run's artifacts.

    Args:
        version: the model version.
        protected_roots: artifact URIs of versions that keep their weights; files under them are
            left out (a run may hold the model of a version that is kept).

    Returns:
        The weight files, with their sizes.
    """
    files = _list_weights(_resolved_source(version))
    if version.run_id:
        run_root = MlflowClient().get_run(version.run_id).info.artifact_uri
        seen = {f.uri for f in files}
        files += [f for f in _list_weights(run_root) if f.uri not in seen]
    return [f for f in files if not any(f.uri.startswith(root.rstrip("/") + "/") for root in protected_roots)]


@task(name="plan-purge", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def plan_purge(name: str, window_days: float, now: datetime | None = None) -> PurgeReport:
    """Which versions of ``name`` are past the rollback window and miss a promoted erasure; changes nothing.

    Args:
        name: registered model name.
        window_days: days after a promotion during which superseded versions keep their weights.
        now: the time to judge the window at (default: now).

    Returns:
        A dry-run report: ``would_purge`` (with the weight files) and ``kept`` (with reasons).
    """
    if not window_days >= 0:
        raise ValueError(f"window_days must be >= 0 (got {window_days}): the days superseded versions keep their weights, 0 purges at once")
    now = now or datetime.now(timezone.utc)
    report = PurgeReport(model=name, window_days=window_days, dry_run=True, checked_at=now.isoformat(timespec="seconds"))
    versions = registry.list_versions(name)
    if not versions:
        return report
    aliases: dict[str, list[str]] = {}
    for alias, number in MlflowClient().get_registered_model(name).aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    champion = next((v for v in versions if registry.CHAMPION in aliases.get(str(v.version), [])), None)
    promoted_requests = carried(champion.tags or {})[1] if champion is not None else []
    times = request_promotion_times(versions, aliases)
    window = timedelta(days=window_days)

    purgeable, kept = [], []
    for version in versions:
        number, tags = str(version.version), version.tags or {}
        status = registry.derive_status(tags, aliases.get(number, []))
        if champion is not None and number == str(champion.version):
            kept.append(KeptVersion(version=number, status=status, reason="the champion"))
            continue
        if registry.PURGED_AT in tags:
            kept.append(KeptVersion(version=number, status=status, reason=f"already purged at {tags[registry.PURGED_AT]}"))
            continue
        carries = set(carried(tags)[1])
        missed = [r for r in promoted_requests if r not in carries and r in times]
        due = [r for r in missed if times[r] + window <= now]
        if due:
            purgeable.append(PurgeEntry(version=number, missed_requests=due,
                                        promoted_at={r: times[r].isoformat(timespec="seconds") for r in due}))
        elif missed:
            first = min(missed, key=lambda r: times[r])
            kept.append(KeptVersion(version=number, status=status, reason=(
                f"misses {', '.join(missed)}; inside the rollback window of {window_days:g} days until "
                f"{(times[first] + window).isoformat(timespec='seconds')}")))
        else:
            reason = "no champion: no erasure was promoted" if champion is None else "carries every erasure the champion carries"
            kept.append(KeptVersion(version=number, status=status, reason=reason))

    by_number = {str(v.version): v for v in versions}
    kept_numbers = {k.version for k in kept if registry.PURGED_AT not in (by_number[k.version].tags or {})}
    protected = tuple(_resolved_source(by_number[n]) for n in kept_numbers)
    for entry in purgeable:
        entry.files = weight_files(by_number[entry.version], protected)
    report.would_purge, report.kept = purgeable, kept
    return report


@task(name="purge-version", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def purge_version(name: str, entry: PurgeEntry, window_days: float) -> PurgeEntry:
    """Delete one version's weight files (as planned) and tag it purged.

    Files go first, tags after: a purge that fails half-way leaves the version untagged, so the next
    purge finds and deletes what is left.

    Args:
        name: registered model name.
        entry: the planned purge, from :func:`plan_purge`.
        window_days: the rollback window the plan was made with (recorded on the version).

    Returns:
        ``entry`` with ``purged_at`` set.
    """
    champion = registry.get_version_by_alias(name, registry.CHAMPION)
    if champion is not None and str(champion.version) == entry.version:
        raise RuntimeError(f"version {entry.version} of {name!r} became the champion after the purge was planned: not purged")
    for weight in entry.files:
        get_artifact_repository(weight.root).delete_artifacts(weight.path)
    purged_at = registry.now_iso()
    registry.tag_version(name, entry.version, **{
        registry.PURGED_AT: purged_at,
        registry.PURGED_REASON: f"{entry.reason}; the rollback window of {window_days:g} days had passed",
        registry.PURGED_FILES: json.dumps({"files": len(entry.files), "bytes": entry.bytes}),
        registry.PURGED_WINDOW_DAYS: f"{window_days:g}",
    })
    registry.sync_status_tags(name)
    return entry.model_copy(update={"purged_at": purged_at})


@task(name="certify-purges", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def certify_purges(settings: ErasureSettings, name: str, purged: list[PurgeEntry]) -> list[str]:
    """Append each purge to ``certificate/purged.json`` on the ledger run of every request that caused it.

    Args:
        settings: the experiment the ledger lives in.
        name: registered model name.
        purged: the versions purged.

    Returns:
        The request ids that have no ledger run (nothing logged for them).
    """
    from tasks import ledger

    client = MlflowClient()
    by_request: dict[str, list[dict]] = {}
    for entry in purged:
        record = {"model": name, "version": entry.version, "purged_at": entry.purged_at, "files": len(entry.files), "bytes": entry.bytes}
        for request_id in entry.missed_requests:
            by_request.setdefault(request_id, []).append(record)
    uncertified = []
    for request_id, records in by_request.items():
        found = ledger.find(client, settings.experiment, request_id)
        if found is None:
            uncertified.append(request_id)
            continue
        _append_certificate(client, found.run_id, records)
    return uncertified


def _append_certificate(client: MlflowClient, run_id: str, records: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        existing = []
        if any(a.path == f"{CERTIFICATE_DIR}/{PURGED_CERTIFICATE}" for a in client.list_artifacts(run_id, CERTIFICATE_DIR)):
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CERTIFICATE_DIR}/{PURGED_CERTIFICATE}",
                                                        dst_path=str(Path(tmp, "old")))
            existing = json.loads(Path(local).read_text())
        done = {(r["model"], r["version"]) for r in existing}
        merged = existing + [r for r in records if (r["model"], r["version"]) not in done]
        path = Path(tmp, PURGED_CERTIFICATE)
        path.write_text(json.dumps(merged, indent=2))
        client.log_artifact(run_id, str(path), CERTIFICATE_DIR)
