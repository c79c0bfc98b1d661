"""Prefect tasks that fetch and validate the data an erasure needs and shape it for the library."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import storage
from tasks.request import ErasureRequest
from tasks.settings import ErasureSettings
from tasks.validation import ValidationReport, validate_request_data
from unlearning.data import Record, load_images, read_manifest
from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet
from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData
from unlearning.world import COLOURS, SIZES, world_probes


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


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def local_manifest(uri: str | None, settings: ErasureSettings) -> Path | None:
    """A local path for a manifest given as a path or an ``s3://`` URI (fetched with its images)."""
    if not uri:
        return None
    if storage.is_s3(uri):
        return storage.fetch_manifest(uri, Path(tempfile.mkdtemp(prefix="manifest-")), settings)
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {uri} does not exist: give a readable .jsonl/.csv path or an s3:// URI")
    return path


def eval_set_of(records: list[Record], image_size: int) -> EvalSet:
    """Evaluation images with the held-out probes available for them: the world's probes (over the
    retained shapes) when the records carry its colour and size attributes, none otherwise."""
    probes = None
    if records and all(k in records[0].attributes for k in ("colour", "size")):
        values = {r.attributes["colour"] for r in records} | {r.attributes["size"] for r in records}
        if values <= set(COLOURS) | set(SIZES):
            probes = world_probes
    return EvalSet(records, load_images(records, image_size), probes_for=probes)


@task(name="validate-and-prepare-data", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_data(request: ErasureRequest, settings: ErasureSettings, image_size: int, earlier: list[ForgetTarget]) -> ErasureData:
    """Fetch manifests, validate them with Great Expectations (stop before any training on failure),
    and build the library's inputs: forget/retain/stop sets and the evaluation set."""
    logger = get_run_logger()
    reference_path = Path(settings.reference_manifest or settings.world_dir / "manifest.jsonl")
    forget_path = local_manifest(request.forget_manifest or request.target.pairs_manifest, settings)
    retain_path = local_manifest(request.retain_manifest, settings) or reference_path
    reference = read_manifest(reference_path)
    classnames = sorted({r.label for r in reference})
    target = request.target.to_forget_target()
    if target.kind == "association" and not target.captions and forget_path:
        # the pairs to forget are named by the manifest: their captions identify them in evaluation
        target = target.model_copy(update={"captions": sorted({r.caption for r in read_manifest(forget_path)})})

    report = validate_request_data(forget_path, retain_path, classnames, settings.allowed_buckets)
    mlflow.log_dict(report.to_dict(), "validation/gx_report.json")
    mlflow.log_text(report.to_markdown(), "validation/gx_report.md")
    report.raise_for_failure()
    if target.kind in ("class", "subgroup") and not any(target.matches(r) for r in reference):
        raise ValueError(f"target: {target.name!r} matches no image of the model's reference data; "
                         f"use one of the known classes: {', '.join(classnames)}")

    forget_records = read_manifest(forget_path) if forget_path else None
    if forget_path and not forget_records:
        raise ValueError(f"forget_manifest {request.forget_manifest} is empty: list the images to forget")
    retain_reference = read_manifest(retain_path) if retain_path != reference_path else reference
    unlearning = build_unlearning_data(target, retain_reference, image_size, forget_records, earlier, seed=request.seeds[0])

    test = [r for r in reference if r.split == "test"] or reference
    eval_set = eval_set_of(test, image_size)
    hashes = {"reference": file_hash(reference_path)}
    if forget_path:
        hashes["forget"] = file_hash(forget_path)
    if retain_path != reference_path:
        hashes["retain"] = file_hash(retain_path)
    logger.info("data ready: %d forget, %d retain, %d eval images", len(unlearning.forget or []), len(unlearning.retain or []), len(test))
    return ErasureData(target, reference, unlearning, eval_set, unlearning.forget, hashes, report)


def reference_eval_set(settings: ErasureSettings, image_size: int) -> EvalSet:
    """The retain/regression suite: the reference data's test split with its probes."""
    reference = read_manifest(Path(settings.reference_manifest or settings.world_dir / "manifest.jsonl"))
    test = [r for r in reference if r.split == "test"] or reference
    return eval_set_of(test, image_size)
