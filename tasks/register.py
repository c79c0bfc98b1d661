"""Prefect tasks that bring a user's own model in: load it, validate the owner's reference data,
score the model on it, register it, and hand its lineage over to the ledger.

A registered model is a fresh lineage: it carries no erasure, and it records (as version tags) the
reference manifest it was scored on and that file's hash. Later erasures and guards read the
reference manifest from the champion's lineage (:func:`reference_for_champion`), so the data an
erasure measures retain accuracy on is the data the champion's baseline was measured on.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import ledger, registry, storage
from tasks.champion import HELDOUT_SUITE, PARENT, carried, lineage_tags
from tasks.data import eval_set_of, file_hash
from tasks.report import confusion_plot, metric_name, per_class_plot
from tasks.settings import ErasureSettings
from tasks.validation import ValidationReport, validate_manifest_file
from unlearning.data import Record, read_manifest
from unlearning.evaluation import Evaluation, evaluate
from unlearning.heldout import HeldoutInfo
from unlearning.models import CONFIG_FILE, LOCAL_DIR, WEIGHTS_FILE, ClipBundle, count_parameters, load_model

REFERENCE_MANIFEST, REFERENCE_HASH = "erasure.reference_manifest", "erasure.reference_manifest_hash"
SOURCE_MODEL = "erasure.source_model"
REQUIRED_SPLITS = ("train", "test")  # train: the retain pool of erasures; test: what every check scores
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_FIX = ("give NAME:PRETRAINED (e.g. ViT-B-32:openai), local-dir:/path to a folder holding "
             f"{CONFIG_FILE} and {WEIGHTS_FILE} (as unlearning.models.save_model writes), or an s3:// prefix holding one")


class RegistrationError(ValueError):
    """The model or the reference data cannot be registered; the message names the input and the fix."""


@dataclass
class ReferenceData:
    """The owner's validated reference manifest."""

    path: Path
    records: list[Record]
    sha: str  # tasks.data.file_hash, as erasures log it (param ``manifest.reference``)
    report: ValidationReport

    @property
    def test(self) -> list[Record]:
        return [r for r in self.records if r.split == "test"]


@task(name="load-model-to-register", retries=0, cache_policy=NO_CACHE)
def load_model_to_register(model_ref: str, settings: ErasureSettings) -> ClipBundle:
    """Load ``model_ref`` through ``unlearning.models.load_model`` (S3 prefixes fetched first).

    Raises:
        RegistrationError: the reference names no loadable model with weights.
    """
    ref = model_ref.strip()
    folder = _local_folder(ref)
    if folder is None and not storage.is_s3(ref) and ":" not in ref:
        raise RegistrationError(f"model {ref}: an architecture name without weights would register a randomly "
                                f"initialised model — {MODEL_FIX}")
    try:
        with tempfile.TemporaryDirectory(prefix="register-model-") as scratch:  # an S3 model's download goes once it is loaded
            if storage.is_s3(ref):
                ref = storage.resolve_model_ref(ref, settings, scratch)
                folder = _local_folder(ref)
            if folder is not None:
                _check_folder(folder, model_ref)
                ref = LOCAL_DIR + str(folder)  # a bare or ~ path, spelled the way load_model reads folders
            bundle = load_model(ref, device=settings.device)
    except RegistrationError:
        raise
    except json.JSONDecodeError as exc:
        raise RegistrationError(f"model {model_ref}: its {CONFIG_FILE} is not valid JSON ({exc.msg}, line {exc.lineno}) — {MODEL_FIX}") from None
    except (FileNotFoundError, PermissionError, ConnectionError) as exc:
        raise RegistrationError(f"model {model_ref}: {_first_line(exc)}") from None
    except Exception as exc:  # open_clip, torch and safetensors raise many kinds for a config or weights they cannot use
        detail = ("its weights do not fit the architecture in its config (missing or unexpected tensors)"
                  if "state_dict" in str(exc) else _first_line(exc))
        raise RegistrationError(f"model {model_ref}: cannot load it ({type(exc).__name__}: {detail}) — {MODEL_FIX}") from None
    get_run_logger().info("loaded %s (%d parameters, %d px)", model_ref, count_parameters(bundle.model), bundle.image_size)
    return bundle


def _local_folder(ref: str) -> Path | None:
    if ref.startswith(LOCAL_DIR):
        return Path(ref[len(LOCAL_DIR):]).expanduser()
    path = Path(ref).expanduser()
    return path if ref.startswith(("/", "./", "../", "~")) or path.exists() else None


def _check_folder(folder: Path, model_ref: str) -> None:
    """Clear errors for the usual folder mistakes, before open_clip sees it."""
    if not folder.is_dir():
        raise RegistrationError(f"model {model_ref}: folder {folder} does not exist — {MODEL_FIX}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not (folder / WEIGHTS_FILE).is_file() and pickles:
        raise RegistrationError(f"model {model_ref}: the folder holds pickled weights ({', '.join(pickles)}), which clip-erasure "
                                f"never loads — convert them to {WEIGHTS_FILE} (safetensors.torch.save_file of the state dict)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@task(name="validate-reference-manifest", retries=0, cache_policy=NO_CACHE)
def validate_reference(path: str | Path, settings: ErasureSettings) -> ReferenceData:
    """Validate the owner's reference manifest with the GX suite of :mod:`tasks.validation` and check
    that it has the splits erasures need (``train`` and ``test``; ``val`` is the optional stop set).

    Raises:
        RegistrationError: not a local file, or no test/train split.
        DataValidationError: a GX check failed (the message names the rows and the fix).
    """
    location = str(path)
    if storage.is_s3(location):
        raise RegistrationError(f"reference manifest {location}: must be a local file, as erasures read it from disk "
                                "(ERASURE_REFERENCE_MANIFEST) — download the manifest and its images first")
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise RegistrationError(f"reference manifest {location} does not exist — pass --reference-manifest PATH of a .jsonl "
                                "or .csv manifest with splits train/val/test")
    # The reference data defines the model's classes, so its own labels are the known set.
    report = validate_manifest_file(path, "reference", _labels(path), settings.allowed_buckets)
    report.raise_for_failure()
    records = read_manifest(path)
    splits = {r.split for r in records}
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        found = ", ".join(sorted(s or '""' for s in splits))
        raise RegistrationError(f"reference manifest {location}: no rows with split {' or '.join(map(repr, missing))} (found: {found}) — "
                                'mark the images to evaluate on "split": "test", the retain pool "train" and the stop set "val"')
    classes = {r.label for r in records if r.split == "test"}
    if len(classes) < 2:
        raise RegistrationError(f"reference manifest {location}: the test split has {len(classes)} class; zero-shot "
                                "accuracy needs at least two — add test images of the other classes")
    return ReferenceData(path, records, file_hash(path), report)


def _labels(path: Path) -> list[str]:
    """The non-empty labels of a manifest, read leniently: the GX suite reports what is malformed."""
    text = path.read_text(errors="replace")
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return sorted({str(r["label"]) for r in rows if isinstance(r, dict) and r.get("label") not in (None, "")})


@dataclass
class Baseline:
    """The model's metrics on the reference test split, and the held-out suite they were probed with."""

    evaluation: Evaluation
    heldout: HeldoutInfo

    @property
    def accuracy(self) -> float:
        """Zero-shot class accuracy over the whole test split."""
        return self.evaluation.confusions["class"].accuracy


@task(name="evaluate-baseline", cache_policy=NO_CACHE)
def evaluate_baseline(bundle: ClipBundle, reference: ReferenceData, settings: ErasureSettings) -> Baseline:
    """Score the model with no forget target, on the eval set an erasure of it would build (the
    configured held-out suite, no template matching a reference caption)."""
    eval_set = eval_set_of(reference.test, bundle.image_size, settings.heldout_suite, {r.caption for r in reference.records})
    return Baseline(evaluate(bundle.model, bundle.tokenizer, eval_set, []), eval_set.heldout)


@task(name="register-model", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register_baseline(settings: ErasureSettings, name: str, model_ref: str, bundle: ClipBundle, reference: ReferenceData,
                      baseline: Baseline, flow_run_id: str = "") -> dict:
    """Log the baseline to an MLflow run and register the model as a new version of ``name`` (not promoted).

    The version carries no erased targets and no parent: it starts a lineage. Its tags name the
    source, the reference manifest and its hash.
    """
    accuracy, evaluation = baseline.accuracy, baseline.evaluation
    with mlflow.start_run(run_name=f"register-{name}", tags={"erasure.kind": "register", SOURCE_MODEL: model_ref}) as run:
        mlflow.log_params({"model_ref": model_ref, "model_name": name, "parameters": count_parameters(bundle.model),
                           "image_size": bundle.image_size, "device": str(bundle.model.logit_scale.device),
                           "reference_manifest": str(reference.path), "manifest.reference": reference.sha,
                           "test_images": len(reference.test), "classes": len(evaluation.per_class), "heldout_suite": baseline.heldout.label})
        mlflow.log_metrics({"accuracy": accuracy, **{metric_name(k): v for k, v in evaluation.metrics.items()}})
        mlflow.log_dict({"per_class": evaluation.per_class, "metrics": evaluation.metrics, "accuracy": accuracy,
                         "heldout_suite": baseline.heldout.as_dict()}, "evaluation.json")
        mlflow.log_dict(reference.report.to_dict(), "validation/gx_report.json")
        mlflow.log_text(reference.report.to_markdown(), "validation/gx_report.md")
        mlflow.log_figure(per_class_plot(evaluation.per_class, evaluation.per_class, [], f"{model_ref}: zero-shot accuracy per class"),
                          "plots/per_class.png")
        classes = evaluation.confusions["class"]
        mlflow.log_figure(confusion_plot(classes.confusion, classes.classnames, f"{model_ref}: confusion"), "plots/confusion.png")
        # Re-saved, not copied: the registry gets open_clip's layout with safetensors only, whatever else the folder held.
        tags = {**lineage_tags([], [], None), "status": "candidate", "erasure.method": "register", SOURCE_MODEL: model_ref,
                REFERENCE_MANIFEST: str(reference.path), REFERENCE_HASH: reference.sha, "erasure.baseline_accuracy": f"{accuracy:.6f}",
                HELDOUT_SUITE: baseline.heldout.reference,
                "prefect.flow_run_id": flow_run_id}
        version = registry.register_bundle(bundle, settings.model_copy(update={"model_name": name}), tags, run.info.run_id)
    get_run_logger().info("registered %s v%s from %s: zero-shot accuracy %.1f %% on %d test images", name, version.version,
                          model_ref, 100 * accuracy, len(reference.test))
    return {"version": str(version.version), "run_id": run.info.run_id, "accuracy": accuracy}


@task(name="reopen-replaced-requests", retries=1, cache_policy=NO_CACHE)
def reopen_replaced_requests(settings: ErasureSettings, name: str, replaced: str | None, version: str) -> list[str]:
    """Requests the replaced champion carried go back to ``pending``: the new model embodies none of
    them (as after a rollback, nothing erased comes back silently). Returns their ids."""
    if replaced is None:
        return []
    client = MlflowClient()
    _, request_ids = carried(client.get_model_version(name, replaced).tags)
    for request_id in request_ids:
        entry = ledger.find(client, settings.experiment, request_id)
        if entry is not None:
            ledger.set_status(client, entry.run_id, "pending",
                              reason=f"champion v{replaced} replaced by registered model v{version}, which does not carry this erasure")
    registry.tag_version(name, version, **{"erasure.replaced_version": replaced, "reopened_requests": json.dumps(request_ids)})
    if request_ids:
        get_run_logger().warning("v%s replaced champion v%s, which carried %d erasure(s); back to pending: %s", version, replaced,
                                 len(request_ids), ", ".join(request_ids))
    return request_ids


@dataclass
class ReferenceChoice:
    """The reference manifest an erasure or guard of a champion uses, and what the user must know."""

    settings: ErasureSettings
    manifest: Path  # what will be read
    registered: str | None = None  # what the champion's lineage was registered with, if recorded
    warning: str | None = None

    @property
    def tags(self) -> dict[str, str]:
        tags = {REFERENCE_MANIFEST: str(self.manifest)}
        if self.warning:
            tags["erasure.reference_warning"] = self.warning[:5000]
        return tags


def reference_for_champion(settings: ErasureSettings, model_name: str | None = None) -> ReferenceChoice:
    """Pick the reference manifest for work on the champion of ``model_name``.

    The manifest recorded by ``erasure register`` in the champion's lineage (followed through
    ``erasure.parent_version``) is used unless ``ERASURE_REFERENCE_MANIFEST`` is set; when that
    setting names other data, or the recorded file changed since, the choice carries a warning.
    Call after :func:`tasks.registry.configure_mlflow`.

    Raises:
        FileNotFoundError: the recorded manifest is gone and no other is configured.
    """
    name = model_name or settings.model_name
    configured = settings.reference_manifest
    default = Path(configured or settings.world_dir / "manifest.jsonl")
    recorded = _recorded_reference(name)
    if recorded is None:
        return ReferenceChoice(settings, default)
    path, sha, origin = recorded
    if configured is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"champion of {name!r} was registered (v{origin}) with reference manifest {path}, which no "
                                    "longer exists: restore it, or set ERASURE_REFERENCE_MANIFEST to the same data")
        warning = None
        if file_hash(Path(path)) != sha:
            warning = (f"reference manifest {path} changed since {name} v{origin} was registered with it (sha {sha}, now "
                       f"{file_hash(Path(path))}): before/after metrics are measured on other data than the registered baseline")
        return ReferenceChoice(settings.model_copy(update={"reference_manifest": Path(path)}), Path(path), path, warning)
    chosen = Path(configured).expanduser().resolve()
    same = chosen == Path(path) and chosen.is_file() and file_hash(chosen) == sha
    warning = None if same else (
        f"ERASURE_REFERENCE_MANIFEST={configured} is not the reference manifest {path} (sha {sha}) that {name} v{origin} was "
        f"registered and scored with; this run measures on the configured one — unset ERASURE_REFERENCE_MANIFEST to use "
        f"the registered data, or register the model again with --reference-manifest {configured}")
    return ReferenceChoice(settings, chosen, path, warning)


def _recorded_reference(name: str) -> tuple[str, str, str] | None:
    """(manifest path, its hash, version that recorded it) from the champion's lineage, or None."""
    version = registry.get_version_by_alias(name, registry.CHAMPION)
    client, seen = MlflowClient(), set()
    while version is not None and str(version.version) not in seen:
        seen.add(str(version.version))
        if REFERENCE_MANIFEST in version.tags:
            return version.tags[REFERENCE_MANIFEST], version.tags.get(REFERENCE_HASH, ""), str(version.version)
        parent = version.tags.get(PARENT)
        version = client.get_model_version(name, parent) if parent else None
    return None


def record_reference_choice(run_id: str, choice: ReferenceChoice) -> None:
    """Tag an erasure's or guard's MLflow run with the reference manifest it used (and any warning)."""
    client = MlflowClient()
    for key, value in choice.tags.items():
        client.set_tag(run_id, key, value)
