"""Prefect tasks that fetch and validate the data an erasure needs and shape it for the library."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import storage
from tasks.request import ErasureRequest
from tasks.settings import ErasureSettings
from tasks.validation import ValidationReport, cached_validate_request_data
from tasks.retry import only_transient
from unlearning.data import Record, read_manifest
from unlearning.erasure_data import build_unlearning_data, evaluation_records, rows_in, unknown_target
from unlearning.evaluation import EvalSet, build_eval_set
from unlearning.heldout import HeldoutSuite
from unlearning.image_cache import ImageCache, cached_read_manifest
from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData


@dataclass
class ErasureData:
    """Everything the unlearning and evaluation stages read, fetched and validated."""

    target: ForgetTarget  # the request's target, completed (an association's captions from its manifest)
    reference: list[Record]
    unlearning: UnlearningData
    eval_set: EvalSet
    members: LabelledImages | None  # the forget images trained on, for membership inference
    manifest_hashes: dict[str, str]
    validation: ValidationReport
    summary: dict = field(default_factory=dict)  # counts of what went where (data_summary), for the report and MLflow
    forget_records: list[Record] | None = None  # the request's own forget rows (None: the target's reference images)
    retain_records: list[Record] | None = None  # the request's own retain rows (None: the reference default)


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def local_manifest(uri: str | None, settings: ErasureSettings) -> Path | None:
    """A local path for a manifest given as a path or an ``s3://`` URI (fetched with its images)."""
    if not uri:
        return None
    if storage.is_s3(uri):
        return storage.fetch_manifest(uri, Path(tempfile.mkdtemp(prefix="manifest-", dir=settings.fetch_dir)), settings)
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {uri} does not exist: give a readable .jsonl/.csv path or an s3:// URI")
    return path


def cache_folder(settings: ErasureSettings, kind: str) -> Path:
    """Where a kind of cache ("images", "validation", "manifests") lives: ``<home>/cache/<kind>``."""
    return settings.home / "cache" / kind


def eval_set_of(records: list[Record], image_size: int, heldout_suite: str | HeldoutSuite | None = None,
                seen_captions: Iterable[str] = (), cache_dir: Path | ImageCache | None = None) -> EvalSet:
    """Evaluation images with their held-out suite (:func:`unlearning.evaluation.build_eval_set`).

    Args:
        heldout_suite: a built-in name, a suite file or a suite; None: "auto" (the world's probes on
            the shapes world, else the retained classes under unseen paraphrase templates).
        seen_captions: the reference data's captions; no held-out template may match one.
        cache_dir: where decoded images are cached; None: no cache.
    """
    suite = heldout_suite or "auto"
    if _SHARED is None or not isinstance(suite, str):
        return build_eval_set(records, image_size, suite, seen_captions, cache_dir=cache_dir)
    seen = frozenset(seen_captions)
    key = (_records_digest(records), image_size, suite, _mtime_of(suite), seen)
    if key not in _SHARED:
        _SHARED[key] = build_eval_set(records, image_size, suite, seen, cache_dir=cache_dir)
    return _SHARED[key]


_SHARED: dict[tuple, EvalSet] | None = None


@contextmanager
def shared_eval_sets() -> Iterator[None]:
    """Inside: evaluation sets of the same rows, image files and suite are built once (EvalSet is
    never changed). One update's requests mostly evaluate on the same test split; outside, every
    call builds anew, so a later update sees any change the image cache would."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def _records_digest(records: list[Record]) -> str:
    """The rows and the state of their image files (a changed image makes another key)."""
    digest = hashlib.blake2b(digest_size=16)
    for r in records:
        try:
            stat = os.stat(r.image_path)
            state = f"{stat.st_mtime_ns}:{stat.st_size}"
        except OSError:
            state = "missing"
        digest.update(f"{r.image_path}\0{state}\0{r.caption}\0{r.label}\0{r.split}\0{sorted(r.attributes.items())}\n".encode())
    return digest.hexdigest()


def _mtime_of(suite: str) -> float | None:
    try:
        return Path(suite).stat().st_mtime
    except (OSError, ValueError):
        return None


@task(name="validate-and-prepare-data", retries=1, retry_delay_seconds=2, retry_condition_fn=only_transient, cache_policy=NO_CACHE)
def prepare_data(request: ErasureRequest, settings: ErasureSettings, image_size: int, earlier: list[ForgetTarget]) -> ErasureData:
    """Fetch manifests, validate them with Great Expectations (stop before any training on failure),
    and build the library's inputs: forget/retain/stop sets and the evaluation set.

    The reference data (the owner's manifest) gives the class set and, unless the request brings
    its own retain manifest, the retain pool. Forget images may be reference images: they then
    leave the retain pool and the evaluation's retain side, and ``summary`` counts them
    (``forget_rows_in_reference``). Every row of a request's retain manifest is retain data.
    """
    logger = get_run_logger()
    reference_path = settings.reference_manifest_path
    # the owner's manifest rarely changes: its parse is cached by content (~1 s for 60k rows otherwise)
    reference, reference_sha256, manifest_cache = cached_read_manifest(reference_path, cache_folder(settings, "manifests"))
    classnames = sorted({r.label for r in reference})
    target = request.target.to_forget_target()
    problem = unknown_target(target, reference)
    if problem:  # before any download or validation
        raise ValueError(problem)
    forget_path = local_manifest(request.forget_manifest or request.target.pairs_manifest, settings)
    retain_path = local_manifest(request.retain_manifest, settings)

    # The reference data is not a retain manifest here: forget images may be part of it.
    report, validation_cache = cached_validate_request_data(forget_path, retain_path, classnames, settings.allowed_buckets,
                                                            cache_folder(settings, "validation"), target=target, erased=earlier)
    report.notes.append(f"reference: the owner's manifest {reference_path} is the model's training data, not re-validated per request")
    mlflow.log_dict(report.to_dict(), "validation/gx_report.json")
    mlflow.log_text(report.to_markdown(), "validation/gx_report.md")
    report.raise_for_failure()

    forget_records = read_manifest(forget_path) if forget_path else None
    if forget_path and not forget_records:
        raise ValueError(f"forget_manifest {request.forget_manifest} is empty: list the images to forget")
    if target.kind == "association" and not target.captions and forget_records:
        # the pairs to forget are named by the manifest: their captions identify them in evaluation
        target = target.model_copy(update={"captions": sorted({r.caption for r in forget_records})})
    retain_records = read_manifest(retain_path) if retain_path else None
    images = ImageCache(cache_folder(settings, "images"))  # decoded images of unchanged files are not decoded again
    unlearning = build_unlearning_data(target, reference, image_size, forget_records, earlier, retain_records=retain_records,
                                       seed=request.seeds[0], cache_dir=images)

    test = [r for r in reference if r.split == "test"] or reference
    evaluated = evaluation_records(test, forget_records, [target, *earlier])
    eval_set = eval_set_of(evaluated, image_size, request.heldout_suite or settings.heldout_suite,
                           {r.caption for r in reference} | {r.caption for r in retain_records or ()}, images)
    hashes = {"reference": reference_sha256[:16]}
    if forget_path:
        hashes["forget"] = file_hash(forget_path)
    if retain_path:
        hashes["retain"] = file_hash(retain_path)
    summary = data_summary(unlearning, forget_records, retain_records, reference, len(evaluated), len(test) - len(evaluated))
    summary["cache"] = {"images": images.outcome, "validation": validation_cache, "reference_manifest": manifest_cache}
    mlflow.log_dict(summary, "validation/data_summary.json")
    mlflow.log_metrics({f"data.{k}": v for k, v in summary.items() if isinstance(v, int)})
    logger.info("data ready: %d forget (%d of them reference images), %d retain (%s), %d eval images", summary["forget_images"],
                summary["forget_rows_in_reference"], summary["retain_images"], summary["retain_source"], len(evaluated))
    return ErasureData(target, reference, unlearning, eval_set, unlearning.forget, hashes, report, summary, forget_records, retain_records)


def data_summary(unlearning: UnlearningData, forget_records: list[Record] | None, retain_records: list[Record] | None,
                 reference: list[Record], eval_images: int, eval_left_out: int) -> dict:
    """What went where: forget/retain images used (after sampling), where they came from, and how
    many forget rows are the owner's reference images (taken out of every retain set)."""
    return {
        "forget_images": len(unlearning.forget or []),
        "forget_source": "forget_manifest" if forget_records else "reference train split",
        "forget_manifest_rows": len(forget_records or []),
        "forget_rows_in_reference": len(rows_in(forget_records, reference)) if forget_records else 0,
        "retain_images": len(unlearning.retain or []),
        "retain_source": "retain_manifest" if retain_records is not None else "reference train split",
        "retain_manifest_rows": len(retain_records or []),
        "eval_images": eval_images,
        "eval_forget_images_left_out": eval_left_out,
    }


def reference_eval_set(settings: ErasureSettings, image_size: int, heldout_suite: str | HeldoutSuite | None = None) -> EvalSet:
    """The retain/regression suite: the reference data's test split with its held-out suite
    (``heldout_suite``, default the configured ``ERASURE_HELDOUT_SUITE``)."""
    reference = cached_read_manifest(settings.reference_manifest_path,
                                     cache_folder(settings, "manifests"))[0]
    test = [r for r in reference if r.split == "test"] or reference
    return eval_set_of(test, image_size, heldout_suite or settings.heldout_suite, {r.caption for r in reference},
                       cache_folder(settings, "images"))
