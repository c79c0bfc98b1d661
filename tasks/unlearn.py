"""Prefect tasks that run the library: evaluate a model, run one method attempt, decide the gates.

Each method attempt is a nested MLflow run under the request's run, with the method's config as
params, its per-step history as metric curves, and its plots and synthetic images as artifacts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import mlflow
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.report import confusion_plot, history_plot, image_grid, metric_name, plt
from unlearning.erasure import unlearn_and_evaluate
from unlearning.evaluation import EvalSet, Evaluation, Gate, check_gates, evaluate
from unlearning.methods import METHODS, get_method, unmet_needs
from unlearning.methods.base import ForgetTarget, UnlearningData
from unlearning.models import ClipBundle
from unlearning.precision import Precision

# `auto`: first choice by target kind, escalating to the next when the gates fail.
AUTO_PLAN = {
    "class": ("cliperase", "three_stage", "lipschitz"),
    "subgroup": ("three_stage", "cliperase"),
    "association": ("cliperase", "graddiff"),
}


def plan_methods(method: str, target: ForgetTarget, data: UnlearningData,
                 config_of: Callable[[str], dict] | None = None) -> list[str]:
    """The methods to try, in order, each checked up front for the data it needs, so that no
    method starts (or dies) without it.

    Args:
        method: the request's method, or ``auto`` (skips methods whose needs are unmet).
        config_of: method -> its validated config, for needs that depend on it (e.g. a stop set).

    Raises:
        ValueError: the named method, or every method ``auto`` could pick, lacks something; the
            message names the request field to change and how.
    """
    def unmet(name: str, configured: bool = True) -> list[str]:
        config = get_method(name).config_cls.model_validate(config_of(name)) if config_of and configured else None
        return unmet_needs(name, target, data, config)

    def auto_plan(configured: bool) -> list[str]:
        plan = [name for name in AUTO_PLAN[target.kind] if not unmet(name, configured)]
        if not plan and not unmet("lipschitz", configured):
            plan = ["lipschitz"]  # no real data at all: the zero-shot (synthetic) method
        return plan

    def other() -> str | None:
        """A way out to offer (configs aside: they are the request's to change). Not finetune: a
        baseline that trains on retain data only and erases nothing by itself."""
        if method != "auto" and auto_plan(False):
            return "auto"
        return next((n for n in sorted(METHODS) if n != "finetune" and not unmet(n, False)), None)

    if method != "auto":
        problems = unmet(method)
        if problems:
            raise ValueError(_unmet_message(method, target, problems[0], other()))
        return [method]
    plan = auto_plan(True)
    if not plan:
        first = AUTO_PLAN[target.kind][0]
        raise ValueError(_unmet_message(first, target, unmet(first)[0], other(), auto=True))
    return plan


def _unmet_message(method: str, target: ForgetTarget, need: str, other: str | None, auto: bool = False) -> str:
    """One line for an unmet need of ``method`` (see :func:`unmet_needs`): the request field and the fix.

    ``other``: a method (or "auto") that can run on the data given, offered as the other way out.
    """
    who = (f"every method \"auto\" picks for {target.kind} targets ({', '.join(AUTO_PLAN[target.kind])})" if auto
           else f"method {method!r}")
    instead = f', or use "method": {json.dumps(other)}' if other else ""
    if need == "target_kind":
        fitting = sorted(m.name for m in METHODS.values() if target.kind in m.target_kinds)
        return f'method: {method!r} cannot erase {target.kind} targets — use "auto" or one of: {", ".join(fitting)}'
    if need == "forget_index":
        return (f"target: {target.name!r} is not among the model's classes (from its reference data) — "
                "name a class, or a subgroup, that the reference data has")
    if need == "forget":
        if target.kind == "association":
            return (f"forget_manifest: {who} needs the image-text pairs to forget, and there are none (the request lists "
                    "none and no reference train image has the target's captions) — add a forget_manifest "
                    "(or target.pairs_manifest) listing them" + instead)
        return (f"forget_manifest: {who} needs real images of {target.name!r} to forget, and there are none (the request "
                "lists none and the reference data's train split has none) — add a forget_manifest listing them" + instead)
    if need == "retain":
        return (f"retain_manifest: {who} needs images to keep, and there are none (the request lists none and the "
                "reference data's train split has no image outside the forgotten targets) — add a retain_manifest "
                "listing images the model must keep knowing" + instead)
    if need == "forget_val":
        return (f"method_config.stop_set: {method!r} with stop_set 'forget_val' needs held-out images of {target.name!r} "
                "in the reference data's val split, and it has none — use stop_set 'train' or 'heldout'")
    return f"method: {who} needs data.{need}, which the request's data lacks — " + (instead.removeprefix(", or ") or "change the method")


@dataclass
class Attempt:
    method: str
    bundle: ClipBundle
    after: Evaluation
    gates: list[Gate]
    seconds: float
    summary: dict = field(default_factory=dict)
    run_id: str | None = None
    evaluate_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(bundle: ClipBundle, eval_set: EvalSet, targets: list[ForgetTarget], members=None) -> Evaluation:
    """Forget / retain / held-out / retrieval / MIA metrics, over every target the model must carry."""
    return evaluate(bundle.model, bundle.tokenizer, eval_set, targets, members=members)


def _log_figure(figure, path: str) -> None:
    mlflow.log_figure(figure, path)
    plt.close(figure)  # pyplot keeps every open figure alive otherwise


def _log_history(history: list[dict]) -> None:
    for i, row in enumerate(history):
        step = int(row.get("step", i))
        numeric = {k.replace("@", "_at_"): float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if numeric:
            mlflow.log_metrics(numeric, step=step)


@task(name="unlearn", cache_policy=NO_CACHE, timeout_seconds=3600)
def attempt_method(method: str, champion: ClipBundle, target: ForgetTarget, data: UnlearningData, eval_set: EvalSet,
                   all_targets: list[ForgetTarget], before: Evaluation, thresholds: dict[str, float],
                   config: dict | None = None, members=None, precision: Precision | None = None,
                   start: ClipBundle | None = None, evaluate_after: bool = True) -> Attempt:
    """Unlearn ``target`` from a copy of the champion with ``method``, evaluate, and check the gates.

    Logs a nested MLflow run named after the method (call inside the request's active run).

    Args:
        start: the model to start from, when not ``champion`` (the frozen reference).
        evaluate_after: False skips the evaluation and the gates (a batch's intermediate step).
    """
    logger = get_run_logger()
    spec = get_method(method)
    original = champion.model.requires_grad_(False)  # frozen reference: the champion, carrying earlier erasures
    with mlflow.start_run(run_name=f"attempt-{method}", nested=True) as run:
        config_model = spec.config_cls.model_validate(config or {})
        mlflow.log_params({f"method.{k}": v for k, v in config_model.model_dump().items()})
        forgets = data.forget_targets or [target]
        mlflow.set_tags({"erasure.kind": "attempt", "erasure.method": method, "erasure.paper": spec.paper,
                         "erasure.forgets": ", ".join(t.name for t in forgets)})
        last_log = [0.0]

        def progress(row: dict) -> None:
            if time.perf_counter() - last_log[0] > 5:
                last_log[0] = time.perf_counter()
                logger.info("%s step %s: %s", method, row.get("step"), {k: v for k, v in row.items() if isinstance(v, float)})

        outcome = unlearn_and_evaluate(method, start or champion, target, data, eval_set, all_targets=all_targets, original=original,
                                       config=config_model, members=members, precision=precision, progress=progress,
                                       evaluate_after=evaluate_after)
        result, candidate, seconds = outcome.result, outcome.bundle, outcome.seconds
        _log_history(result.history)
        if not evaluate_after:
            mlflow.log_metric("unlearn_seconds", seconds)
            return Attempt(method, candidate, before, [], seconds, result.summary, run.info.run_id, 0.0)
        after = outcome.after
        gates = check_gates(before.metrics, after.metrics, **thresholds)
        mlflow.log_metrics({f"after.{metric_name(k)}": v for k, v in after.metrics.items()})
        mlflow.log_metric("unlearn_seconds", seconds)
        mlflow.log_dict({"summary": result.summary, "gates": [g.as_dict() for g in gates]}, "attempt.json")
        keys = [k for k in ("loss", "forget_accuracy", "retain_accuracy", "synthetic_forget_acc") if any(k in r for r in result.history)]
        if keys:
            _log_figure(history_plot(result.history, keys, f"{method}: per-step curves"), "plots/history.png")
        class_result = after.confusions["class"]
        _log_figure(confusion_plot(class_result.confusion, class_result.classnames, f"after {method}"), "plots/confusion_after.png")
        synthetic = result.artifacts.get("synthetic_images")
        if isinstance(synthetic, torch.Tensor) and len(synthetic):
            mlflow.log_image(image_grid(synthetic[:64]), "synthetic_forget_set.png")
        mlflow.set_tag("erasure.gates_passed", str(all(g.passed for g in gates)).lower())
        logger.info("%s: forget %.2f %% retain %.2f %% in %.1f s — gates %s", method, 100 * after.metrics.get("forget_accuracy", float("nan")),
                    100 * after.metrics.get("retain_accuracy", float("nan")), seconds, "pass" if all(g.passed for g in gates) else "FAIL")
        return Attempt(method, candidate, after, gates, seconds, result.summary, run.info.run_id, outcome.evaluate_seconds)
