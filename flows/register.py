"""The register flow: bring your own model and make it the champion.

    load the model (name:pretrained, local-dir: folder or s3:// prefix) ─► validate the reference
    manifest (GX) ─► score the model on its test split ─► register a new version with the baseline
    and the manifest's hash ─► promote (`champion`, old champion `previous`) inside a transaction
    ─► requests the old champion carried go back to pending.

Nothing is registered when the model does not load or the reference data fails validation.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.transactions import transaction

from tasks.champion import promote
from tasks.registry import configure_mlflow
from tasks.register import (
    evaluate_baseline,
    load_model_to_register,
    register_baseline,
    reopen_replaced_requests,
    validate_reference,
)
from tasks.settings import ErasureSettings, get_settings


def _flow_run_id() -> str:
    from prefect.context import get_run_context

    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # called outside a flow run
        return ""


@flow(name="register", log_prints=True)
def register_flow(model_ref: str, name: str | None = None, reference_manifest: str | Path | None = None,
                  settings: ErasureSettings | None = None) -> dict:
    """Register ``model_ref`` as a new version of ``name`` scored on ``reference_manifest`` and make it the champion.

    Args:
        model_ref: ``NAME:PRETRAINED``, ``local-dir:/folder`` or ``s3://bucket/prefix``.
        name: registered model name; default ``settings.model_name``.
        reference_manifest: the owner's manifest (splits train/val/test); default the configured one.
    """
    settings = settings or get_settings()
    configure_mlflow(settings)
    name = name or settings.model_name
    bundle = load_model_to_register(model_ref, settings)
    reference = validate_reference(reference_manifest or settings.reference_manifest_path, settings)
    baseline = evaluate_baseline(bundle, reference, settings)
    registered = register_baseline(settings, name, model_ref, bundle, reference, baseline, _flow_run_id())
    version = registered["version"]
    with transaction():
        replaced = promote(name, version)
        reopened = reopen_replaced_requests(settings, name, replaced, version)
    return {"name": name, "version": version, "model_ref": model_ref, "accuracy": baseline.accuracy,
            "metrics": baseline.evaluation.metrics, "per_class": baseline.evaluation.per_class, "test_images": len(reference.test),
            "heldout_suite": baseline.heldout.label,
            "reference_manifest": str(reference.path), "reference_hash": reference.sha,
            "aliases": {"champion": version, "previous": replaced}, "reopened_requests": reopened, "mlflow_run_id": registered["run_id"]}
