"""The erasure flow: the pipeline as a list of task calls.

    validate & prepare data ─► load champion ─► evaluate before ─► unlearn (method, or `auto`
    escalating on failed gates within the time budget) ─► evaluate after ─► gates ─► register
    candidate ─► promote (`champion`/`previous`) only when every gate passes, inside a transaction
    that restores the aliases if anything after the promotion fails.

Every erasure starts from the current champion, which already carries earlier erasures, and that
champion is the frozen reference for distillation, consistency and souping. The before/after
checks include every earlier forget target, so nothing erased before can come back unnoticed.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from pydantic import ValidationError
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.transactions import transaction

from tasks import ledger
from tasks.champion import lineage_tags, load_champion, promote, register_candidate, tag_version
from tasks.data import prepare_data
from tasks.registry import configure_mlflow
from tasks.report import confusion_plot, gate_markdown, metrics_markdown, per_class_plot, write_certificate
from tasks.request import ErasureRequest, load_request
from tasks.settings import ErasureSettings, get_settings
from tasks.unlearn import attempt_method, evaluate_model, plan_methods
from unlearning.methods import get_method
from unlearning.models import save_model
from unlearning.precision import resolve_precision

RERUNNABLE = ("failed", "pending")  # a request in another state is answered from the ledger


def harmonic_score(metrics: dict[str, float]) -> float:
    """Harmonic mean of (1 - forget accuracy) and retain accuracy: one number to rank attempts."""
    a, b = 1 - metrics.get("forget_accuracy", 1.0), metrics.get("retain_accuracy", 0.0)
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def method_config(method: str, request: ErasureRequest, strict: bool) -> dict:
    """The request's ``method_config`` for ``method``, checked against the method's config class.

    With ``auto``, keys a method does not know are dropped for that method (they target another
    one); with a named method, any unknown or invalid key is an error naming the field.
    """
    config_cls = get_method(method).config_cls
    values = {"seed": request.seeds[0], **request.method_config}
    if not strict:
        values = {k: v for k, v in values.items() if k in config_cls.model_fields}
    try:
        return config_cls.model_validate(values).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"method_config.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{problems} (valid keys for {method}: {', '.join(sorted(config_cls.model_fields))})") from None


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # called outside a flow run (unit tests of helpers)
        return ""


@flow(name="erasure", log_prints=True)
def erasure_flow(request: ErasureRequest | dict | str, settings: ErasureSettings | None = None) -> dict:
    """Carry out one erasure request end to end and return its report (also logged to MLflow)."""
    settings = settings or get_settings()
    request = request if isinstance(request, ErasureRequest) else load_request(request if isinstance(request, str) else json.dumps(request, default=str))
    logger = get_run_logger()
    configure_mlflow(settings)
    client = MlflowClient()

    earlier = ledger.find(client, settings.experiment, request.request_id)
    if earlier is not None and earlier.status not in RERUNNABLE:
        logger.info("request %s was already handled (%s): reporting the earlier result", request.request_id, earlier.status)
        return {"request_id": request.request_id, "status": earlier.status, "idempotent": True, "reason": earlier.reason,
                "model_version": earlier.model_version, "mlflow_run_id": earlier.run_id}

    target = request.target.to_forget_target()
    with mlflow.start_run(run_name=request.request_id) as run:
        run_id = run.info.run_id
        mlflow.set_tags({"erasure.kind": "request", ledger.REQUEST_ID: request.request_id, "erasure.target": target.name,
                         "erasure.requester": request.requester, "erasure.request_hash": request.content_hash(),
                         "prefect.flow_run_id": _flow_run_id()})
        mlflow.log_dict(json.loads(request.model_dump_json()), "request.json")
        ledger.set_status(client, run_id, "received")
        try:
            report = _erase(request, target, settings, client, run_id)
        except Exception as exc:
            ledger.set_status(client, run_id, "failed", reason=f"{type(exc).__name__}: {exc}"[:500])
            raise
    return report


def _erase(request: ErasureRequest, target, settings: ErasureSettings, client: MlflowClient, run_id: str) -> dict:
    logger = get_run_logger()
    name = request.model or settings.model_name
    if request.method != "auto":
        method_config(request.method, request, strict=True)  # a bad method_config fails before any work
    started = time.perf_counter()
    champion = load_champion(settings, name)
    loaded = time.perf_counter()
    data = prepare_data(request, settings, champion.bundle.image_size, champion.targets)
    target = data.target
    # Every method's data needs are checked here, before any evaluation or training.
    plan = plan_methods(request.method, target, data.unlearning, lambda m: method_config(m, request, strict=request.method != "auto"))
    configs = {m: method_config(m, request, strict=request.method != "auto") for m in plan}  # bad config fails before training
    ledger.set_status(client, run_id, "validated")

    all_targets = [*champion.targets, target]
    prepared = time.perf_counter()
    before = evaluate_model(champion.bundle, data.eval_set, all_targets)
    evaluate_before = time.perf_counter() - prepared
    mlflow.log_metrics({f"before.{k.replace('@', '_at_')}": v for k, v in before.metrics.items()})
    mlflow.log_figure(confusion_plot(before.confusions["class"].confusion, before.confusions["class"].classnames,
                                     f"champion v{champion.version} before the erasure"), "plots/confusion_before.png")
    thresholds = (request.gates.model_dump() if request.gates else
                  {"max_forget_accuracy": settings.max_forget_accuracy, "max_retain_drop": settings.max_retain_drop,
                   "max_heldout_drop": settings.max_heldout_drop})
    heldout = data.eval_set.heldout  # the held-out suite: named in the held-out gate, the params, report and version
    thresholds["heldout_suite"] = heldout.label
    device = champion.bundle.model.logit_scale.device
    precision = resolve_precision(settings.precision, device, stage="unlearn")
    mlflow.log_params({"request.method": request.method, "request.target": target.name, "champion.version": champion.version,
                       "device": str(device), "precision": precision.dtype, "precision.reason": precision.reason, "seeds": request.seeds,
                       **{f"gate.{k}": v for k, v in thresholds.items()}, **{f"manifest.{k}": v for k, v in data.manifest_hashes.items()}})

    mlflow.log_params({"heldout.suite": heldout.name, "heldout.kind": heldout.kind, "heldout.source": heldout.source})
    ledger.set_status(client, run_id, "running")
    deadline = time.monotonic() + request.time_budget_s
    attempts = []
    for method in plan:
        attempt = attempt_method(method, champion.bundle, target, data.unlearning, data.eval_set, all_targets, before,
                                 thresholds, config=configs[method], members=data.members, precision=precision)
        attempts.append(attempt)
        if attempt.passed or time.monotonic() > deadline:
            break
    best = next((a for a in attempts if a.passed), None) or max(attempts, key=lambda a: harmonic_score(a.after.metrics))
    passed = best.passed

    mlflow.log_metrics({f"after.{k.replace('@', '_at_')}": v for k, v in best.after.metrics.items()})
    mlflow.log_figure(per_class_plot(before.per_class, best.after.per_class, [t.name for t in all_targets],
                                     f"{request.request_id}: zero-shot accuracy per class ({best.method})"), "plots/per_class_before_after.png")
    gates = [g.as_dict() for g in best.gates]
    mlflow.log_dict({"passed": passed, "method": best.method, "gates": gates, "attempts": [a.method for a in attempts]}, "gates/gate_report.json")
    mlflow.log_text(gate_markdown(gates), "gates/gate_report.md")
    mlflow.set_tags({"erasure.method": best.method, "erasure.gates_passed": str(passed).lower()})

    # Where the time went: model math (unlearning, evaluation), data (loading, GX validation), and
    # the rest (Prefect, MLflow logging, plots, registration) filled in by the caller from the wall time.
    timings = {"load_champion_s": loaded - started, "data_and_validation_s": prepared - loaded,
               "unlearn_s": sum(a.seconds for a in attempts),
               "evaluate_s": evaluate_before + sum(a.evaluate_seconds for a in attempts)}
    mlflow.log_metrics({f"time.{k}": v for k, v in timings.items()})
    report = {"request_id": request.request_id, "target": target.name, "method": best.method, "attempts": [a.method for a in attempts],
              "timings": timings, "data": data.summary,
              "gates_passed": passed, "gates": gates, "heldout_suite": heldout.as_dict(), "before": before.metrics, "after": best.after.metrics,
              "per_class_before": before.per_class, "per_class_after": best.after.per_class,
              "champion_before": champion.version, "mlflow_run_id": run_id, "dry_run": request.dry_run}
    if request.dry_run:
        ledger.set_status(client, run_id, "dry_run", reason="gates passed" if passed else "gates failed")
        return {**report, "status": "dry_run", "model_version": None}

    folder = save_model(best.bundle, Path(tempfile.mkdtemp(prefix="candidate-")))
    tags = {**lineage_tags(all_targets, [*champion.request_ids, request.request_id], champion.version),
            "erasure.method": best.method, "erasure.seeds": json.dumps(request.seeds), "erasure.device": str(champion.bundle.model.logit_scale.device),
            "erasure.manifest_hashes": json.dumps(data.manifest_hashes), "prefect.flow_run_id": _flow_run_id(),
            "erasure.heldout_suite": heldout.reference, "status": "candidate"}
    version = register_candidate(settings, folder, name, tags, run_id)
    report["model_version"] = version

    if not passed:
        failed = ", ".join(g["name"] for g in gates if not g["passed"])
        tag_version(name, version, status="rejected", reason=f"failed gates: {failed}")
        ledger.set_status(client, run_id, "rejected", reason=f"failed gates: {failed}", **{"erasure.model_version": version})
        emit_event("clip-erasure.candidate.rejected", resource={"prefect.resource.id": f"clip-erasure.model.{name}"},
                   payload={"request_id": request.request_id, "version": version, "failed_gates": failed})
        _publish(request, report, settings, champion.version, version, "rejected", all_targets)
        return {**report, "status": "rejected"}

    with transaction():
        promote(name, version)
        # Anything failing from here on (certificate, ledger) rolls the alias move back.
        _publish(request, report, settings, champion.version, version, "promoted", all_targets)
        ledger.set_status(client, run_id, "promoted", **{"erasure.model_version": version})
    logger.info("promoted %s v%s to champion (previous: v%s)", name, version, champion.version)
    return {**report, "status": "promoted"}


def _publish(request: ErasureRequest, report: dict, settings: ErasureSettings, parent: str, version: str, decision: str, targets) -> None:
    """Certificate (JSON + markdown) to MLflow, and the same summary as a Prefect artifact."""
    certificate = {"request_id": request.request_id, "requester": request.requester, "requested_at": request.requested_at.isoformat(),
                   "target": report["target"], "method": report["method"], "model_name": request.model or settings.model_name,
                   "model_version": version, "parent_version": parent, "decision": decision,
                   "carried_targets": [t.name for t in targets], "before": report["before"], "after": report["after"],
                   "gates": report["gates"], "heldout_suite": report["heldout_suite"], "data": report.get("data"),
                   "mlflow_run_id": report["mlflow_run_id"]}
    folder = Path(tempfile.mkdtemp(prefix="certificate-"))
    json_path, md_path = write_certificate(folder, certificate)
    mlflow.log_artifact(str(json_path), "certificate")
    mlflow.log_artifact(str(md_path), "certificate")
    link = f"{settings.mlflow_ui_url}/#/experiments/{mlflow.active_run().info.experiment_id}/runs/{report['mlflow_run_id']}"
    create_markdown_artifact(
        key=f"erasure-{request.request_id.lower().replace('_', '-').replace('.', '-')}"[:100],
        markdown=f"# Erasure `{request.request_id}`: **{decision}**\n\nMLflow run: [{report['mlflow_run_id']}]({link})\n\n"
                 f"{metrics_markdown(report['before'], report['after'])}\n\n{gate_markdown(report['gates'])}\n",
        description=f"erasure of {report['target']}: {decision}",
    )
