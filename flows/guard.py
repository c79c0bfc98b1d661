"""The guard flow: re-check the current champion and roll it back automatically when it fails.

The check covers every forget target the champion carries (earlier erasures included) and the
retain/regression suite: retain accuracy must stay at or above ``min_retain_accuracy`` and every
carried target must stay forgotten (``max_forget_accuracy``). Held-out metrics are measured (and
logged) on the held-out suite the champion was promoted on, else the configured one.
"""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger
from prefect.events import emit_event

from tasks.champion import load_champion, rollback_champion
from tasks.data import reference_eval_set
from tasks.registry import VersionPurged, configure_mlflow
from tasks.report import metric_name
from tasks.settings import ErasureSettings, get_settings
from tasks.unlearn import evaluate_model


@flow(name="guard", log_prints=True)
def guard_flow(model_name: str | None = None, settings: ErasureSettings | None = None) -> dict:
    """Evaluate the champion; on failure move ``champion`` back to ``previous``. Returns the verdict.

    A purged ``previous`` (past the rollback window) is not rolled back to: the verdict's
    ``rollback`` is then ``{"refused": why}`` and the champion stays.
    """
    settings = settings or get_settings()
    configure_mlflow(settings)
    logger = get_run_logger()
    name = model_name or settings.model_name
    champion = load_champion(settings, name)
    eval_set = reference_eval_set(settings, champion.bundle.image_size, champion.heldout_suite)
    with mlflow.start_run(run_name=f"guard-v{champion.version}", tags={"erasure.kind": "guard", "erasure.model_version": champion.version,
                                                                     "erasure.heldout_suite": eval_set.heldout.name}):
        evaluation = evaluate_model(champion.bundle, eval_set, champion.targets)
        metrics = evaluation.metrics
        mlflow.log_metrics({metric_name(k): v for k, v in metrics.items()})
        failures = []
        if metrics.get("retain_accuracy", 0.0) < settings.min_retain_accuracy:
            failures.append(f"retain accuracy {metrics.get('retain_accuracy', float('nan')):.4f} < {settings.min_retain_accuracy}")
        if champion.targets and metrics.get("forget_accuracy", 1.0) > settings.max_forget_accuracy:
            failures.append(f"forget accuracy {metrics['forget_accuracy']:.4f} > {settings.max_forget_accuracy}")
        verdict = {"model": name, "champion": champion.version, "passed": not failures, "failures": failures, "metrics": metrics,
                   "heldout_suite": eval_set.heldout.as_dict()}
        mlflow.set_tags({"erasure.guard_passed": str(not failures).lower(), "erasure.guard_failures": "; ".join(failures)})
        if failures:
            try:
                verdict["rollback"] = rollback_champion(settings, name, None, "guard: " + "; ".join(failures))
            except VersionPurged as refused:
                # The rollback target lost its weights after the rollback window: the failing champion keeps serving.
                verdict["rollback"] = {"refused": str(refused)}
                mlflow.set_tag("erasure.guard_rollback_refused", str(refused))
                emit_event("clip-erasure.rollback.refused", resource={"prefect.resource.id": f"clip-erasure.model.{name}"},
                           payload={"champion": champion.version, "failures": failures, "refused": str(refused)})
                logger.warning("champion %s v%s fails the guard, and its rollback was refused: %s", name, champion.version, refused)
        else:
            logger.info("champion %s v%s passes the guard: retain %.2f %%", name, champion.version, 100 * metrics.get("retain_accuracy", 0))
    return verdict
