"""The erasure pipeline's stages, as Prefect tasks that each log their own part to MLflow.

    admit (ledger, locks) ─► load champion ─► validate (each request alone) ─► plan the update ─►
    evaluate before ─► unlearn (attempts) ─► gates ─► register ─► promote or reject ─► publish

The flows (``flows/erasure.py``, ``flows/batch.py``) only call these in order. Every request has
its own MLflow run per attempt (the ledger); an update of several requests has a run of its own
(``erasure.kind=batch``) holding the unlearning, the evaluation and the gates, and each request's
run links to it. An update of one request logs all of it on the request's run.

Retries only on idempotent I/O: loading the champion, and registering (which finds the version a
failed try already made instead of making another); never on a deterministic validation failure.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import mlflow
import torch
from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.utilities.annotations import quote
from pydantic import ValidationError

from tasks import events, ledger, locks, registry
from tasks.champion import LINEAGE_RETAIN_DROP, Champion, lineage_tags
from tasks.data import ErasureData, cache_folder, eval_set_of, prepare_data
from tasks.depth import DepthEvidence, depth_gates
from tasks.outcome import GateResult, RequestOutcome, Timings, UpdateReport, certificate_of
from tasks.report import metric_name, confusion_plot, gate_markdown, metrics_markdown, per_class_plot, plt, write_certificate
from tasks.request import ErasureRequest
from tasks.settings import ErasureSettings
from tasks.unlearn import Attempt, attempt_method, evaluate_model, plan_methods
from tasks.retry import only_transient
from unlearning.erasure_data import build_joint_unlearning_data, evaluation_records, joint_key
from unlearning.evaluation import EvalSet, Evaluation
from unlearning.image_cache import ImageCache, file_digest
from unlearning.methods import get_method
from unlearning.methods.base import ForgetTarget, LabelledImages, UnlearningData, supports_joint
from unlearning.precision import resolve_precision

DEPTH_GATES = ("max_relearn_accuracy", "max_knn_recall", "max_mia_distance")

NOTE = "mlflow.note.content"  # the description MLflow shows first on a run
RETRYABLE = ledger.RETRYABLE


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


def flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # outside a flow run (unit tests of helpers)
        return ""


# ── admit ────────────────────────────────────────────────────────────────────────────────────────

def answer_from_ledger(client: MlflowClient, settings: ErasureSettings, request: ErasureRequest) -> RequestOutcome | None:
    """The recorded outcome of a request that ran to an end before (idempotent answer), else None.

    Raises:
        ledger.RequestConflict: the id was recorded with other content.
    """
    state = ledger.find(client, settings.experiment, request.request_id)
    ledger.check_resubmission(state, request)
    if state is None or state.status not in ledger.TERMINAL:
        return None
    return RequestOutcome(request_id=request.request_id, status=state.status, reason=state.reason, model_version=state.model_version,
                          mlflow_run_id=state.run_id, idempotent=True, attempt=len(state.attempts), due_at=state.due_at)


@contextmanager
def exclusive_work(settings: ErasureSettings, model_name: str, request_ids: Sequence[str]) -> Iterator[None]:
    """Hold the locks of an update: each request's (so no two runs work on one request) and the
    model's (so erasures of one model run one after the other, each from the champion the last one
    left). Taken in one order everywhere (requests sorted, then the model), so runs never deadlock."""
    with ExitStack() as stack:
        for request_id in sorted(set(request_ids)):
            stack.enter_context(locks.exclusive(f"request:{request_id}", settings, timeout_s=settings.lock_timeout_s))
        logger = get_run_logger()
        logger.info("waiting for other erasures of %s to finish (if any)", model_name)
        stack.enter_context(locks.exclusive(f"model:{model_name}", settings, timeout_s=settings.lock_timeout_s))
        yield


def open_attempt(client: MlflowClient, settings: ErasureSettings, experiment_id: str, request: ErasureRequest, model_name: str) -> str:
    """Start the request's next attempt (or its filed one) and return its MLflow run id. Call with
    the request's lock held: an unfinished earlier attempt is then known to be dead, and is closed."""
    state = ledger.find(client, settings.experiment, request.request_id)
    if state is not None and state.status == "received" and state.attempts and state.attempts[-1].status == "received":
        run_id = state.run_id  # filed by `erasure submit`, never started: this is its first attempt
    else:
        if state is not None and state.attempts and state.attempts[-1].status in ("received", "validated", "running"):
            ledger.set_status(client, state.attempts[-1].run_id, "failed", reason="abandoned: the run stopped without finishing "
                              "(its lock was free)", **{RETRYABLE: "true"})
        run_id = ledger.start_attempt(client, experiment_id, request, model_name)
    client.set_tag(run_id, "prefect.flow_run_id", flow_run_id())
    return run_id


# ── champion and data ────────────────────────────────────────────────────────────────────────────

@task(name="validate-request", cache_policy=NO_CACHE)
def validate_request(request: ErasureRequest, settings: ErasureSettings, champion: Champion) -> ErasureData:
    """Fetch and validate one request's data (Great Expectations) and check its method's needs,
    before any training. A failure fails this request alone."""
    data = prepare_data(request, settings, champion.bundle.image_size, champion.targets)
    # Every method's data needs and config are checked here, before any evaluation or training.
    strict = request.method != "auto"
    plan = plan_methods(request.method, data.target, data.unlearning, lambda m: method_config(m, request, strict))
    for method in plan:
        method_config(method, request, strict)
    return data


@dataclass
class Group:
    """Targets forgotten by one method run (several where the method can forget them together)."""

    request_ids: list[str]
    targets: list[ForgetTarget]
    plan: list[str]
    configs: dict[str, dict]
    data: UnlearningData


@dataclass
class UpdatePlan:
    """What one model update unlearns, and what it is checked on."""

    requests: list[ErasureRequest]
    groups: list[Group]
    eval_set: EvalSet
    all_targets: list[ForgetTarget]  # earlier erasures + this update's
    members: LabelledImages | None
    thresholds: dict
    data: dict[str, ErasureData] = field(default_factory=dict)
    depth_thresholds: dict = field(default_factory=dict)  # the depth gates switched on (tasks.depth), decided once measured
    lineage_limit: float | None = None  # max_lineage_retain_drop; None: not gated

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]


def strictest_gates(requests: Sequence[ErasureRequest], settings: ErasureSettings) -> dict[str, float]:
    """One gate decision covers every target: each threshold is the strictest any request asked for."""
    default = {"max_forget_accuracy": settings.max_forget_accuracy, "max_retain_drop": settings.max_retain_drop,
               "max_heldout_drop": settings.max_heldout_drop}
    asked = [r.gates.model_dump() if r.gates else default for r in requests]
    return {key: min(a[key] for a in asked) for key in default}


def lineage_limit(requests: Sequence[ErasureRequest], settings: ErasureSettings) -> float | None:
    """The lineage gate's threshold: the strictest a request asked for, else the setting (None: off)."""
    asked = [r.gates.max_lineage_retain_drop for r in requests if r.gates and r.gates.max_lineage_retain_drop is not None]
    return min(asked) if asked else settings.max_lineage_retain_drop


def lineage_gate(champion: Champion, lineage: float, limit: float) -> GateResult:
    """Retain accuracy lost since the first champion (the champion's sum plus this update's drop) against ``limit``."""
    return GateResult(name="lineage_retain_drop", value=lineage, threshold=limit, comparison="<=", passed=bool(lineage <= limit),
                      description=f"retain accuracy lost over the lineage: v{champion.version}'s "
                                  f"{100 * champion.lineage_retain_drop:.1f} pt plus this erasure's; past it, retrain without "
                                  "the targets (or raise ERASURE_MAX_LINEAGE_RETAIN_DROP knowingly)")


def strictest_depth_gates(requests: Sequence[ErasureRequest], settings: ErasureSettings) -> dict[str, float]:
    """The depth gates switched on: by any request (its strictest value wins) or by the settings."""
    gates = {}
    for key in DEPTH_GATES:
        asked = [getattr(r.gates, key) for r in requests if r.gates and getattr(r.gates, key) is not None]
        value = min(asked) if asked else getattr(settings, key)
        if value is not None:
            gates[key] = value
    return gates


@task(name="plan-update", cache_policy=NO_CACHE)
def plan_update(requests: list[ErasureRequest], data: dict[str, ErasureData], champion: Champion, settings: ErasureSettings) -> UpdatePlan:
    """Group the requests' targets into method runs: targets that one method can forget together
    (same kind of target, same method and config) share one run; the rest follow in sequence."""
    first = data[requests[0].request_id]
    new_targets = [data[r.request_id].target for r in requests]
    all_targets = [*champion.targets, *new_targets]
    thresholds = {**strictest_gates(requests, settings), "heldout_suite": first.eval_set.heldout.label}
    if len(requests) == 1:
        request = requests[0]
        strict = request.method != "auto"
        plan = plan_methods(request.method, first.target, first.unlearning, lambda m: method_config(m, request, strict))
        group = Group([request.request_id], [first.target], plan, {m: method_config(m, request, strict) for m in plan}, first.unlearning)
        return UpdatePlan(requests, [group], first.eval_set, all_targets, first.members, thresholds, data,
                          strictest_depth_gates(requests, settings), lineage_limit(requests, settings))

    buckets: dict[tuple, list[ErasureRequest]] = {}
    for request in requests:
        key = (joint_key(data[request.request_id].target), request.method, json.dumps(request.method_config, sort_keys=True), request.seeds[0])
        buckets.setdefault(key, []).append(request)
    groups = []
    reference = first.reference
    size = settings.joint_max_targets
    for members_of in buckets.values():
        for start in range(0, len(members_of), size):  # one method run forgets at most `size` targets (docs/benchmarks.md)
            groups.extend(_groups_of(members_of[start:start + size], data, reference, champion, all_targets,
                                     cache_folder(settings, "images")))
    forget_rows = [row for r in requests for row in (data[r.request_id].forget_records or [])]
    test = [r for r in reference if r.split == "test"] or reference
    seen = {r.caption for r in reference} | {row.caption for r in requests for row in (data[r.request_id].retain_records or [])}
    eval_set = eval_set_of(evaluation_records(test, forget_rows or None, all_targets), champion.bundle.image_size,
                           requests[0].heldout_suite or settings.heldout_suite, seen, cache_dir=cache_folder(settings, "images"))
    forgotten = [g.data.forget for g in groups if g.data.forget is not None]
    members = (LabelledImages(torch.cat([f.images for f in forgotten]), [t for f in forgotten for t in f.texts],
                              torch.full((sum(len(f) for f in forgotten),), -1, dtype=torch.long)) if forgotten else None)
    return UpdatePlan(requests, groups, eval_set, all_targets, members, thresholds, data, strictest_depth_gates(requests, settings),
                      lineage_limit(requests, settings))


def _groups_of(requests: list[ErasureRequest], data: dict[str, ErasureData], reference, champion: Champion,
               all_targets: list[ForgetTarget], cache_dir: Path) -> list[Group]:
    """One joint group when the method can forget these targets together, else one group each."""
    lead = requests[0]
    strict = lead.method != "auto"
    targets = [data[r.request_id].target for r in requests]
    single = [Group([r.request_id], [data[r.request_id].target], *_plan_of(r, data[r.request_id].target, data[r.request_id].unlearning))
              for r in requests]
    if len(requests) == 1:
        return single
    retain_rows = [row for r in requests for row in (data[r.request_id].retain_records or [])]
    joint = build_joint_unlearning_data(targets, reference, champion.bundle.image_size,
                                        [data[r.request_id].forget_records for r in requests],
                                        earlier=[t for t in all_targets if t not in targets],
                                        retain_records=retain_rows or None, seed=lead.seeds[0], cache_dir=cache_dir)
    try:
        plan = plan_methods(lead.method, targets[0], joint, lambda m: method_config(m, lead, strict))
    except ValueError:
        return single
    plan = [m for m in plan if supports_joint(m, targets)]
    if not plan:
        return single  # no method here forgets these together: one after the other
    return [Group([r.request_id for r in requests], targets, plan, {m: method_config(m, lead, strict) for m in plan}, joint)]


def _plan_of(request: ErasureRequest, target: ForgetTarget, unlearning: UnlearningData) -> tuple[list[str], dict[str, dict], UnlearningData]:
    strict = request.method != "auto"
    plan = plan_methods(request.method, target, unlearning, lambda m: method_config(m, request, strict))
    return plan, {m: method_config(m, request, strict) for m in plan}, unlearning


def with_returned_targets(group: Group, plan: UpdatePlan, champion: Champion, evaluation: Evaluation,
                          settings: ErasureSettings) -> Group | None:
    """``group`` joined by every target the champion carries that ``evaluation`` finds above the
    forget threshold again, to be forgotten in one run with it; None when there is none, or when no
    method of the group can forget them together.

    Only class and subgroup targets of the group's kind whose images the reference data holds:
    the requester's own forget images of an earlier erasure may be gone (deleted at its source)."""
    threshold = plan.thresholds["max_forget_accuracy"]
    kind = joint_key(group.targets[0])
    request = plan.data[group.request_ids[0]]
    train = [r for r in request.reference if r.split == "train"]
    returned = [t for t in champion.targets
                if t not in group.targets and t.kind in ("class", "subgroup") and joint_key(t) == kind
                and evaluation.metrics.get(f"forget_accuracy/{t.name}", 0.0) > threshold and any(t.matches(r) for r in train)]
    if not returned:
        return None
    targets = [*group.targets, *returned]
    methods = [m for m in group.plan if supports_joint(m, targets)]
    if not methods:
        return None
    own = [plan.data[rid] for rid in group.request_ids]
    retain_rows = [row for d in own for row in (d.retain_records or [])]
    data = build_joint_unlearning_data(targets, request.reference, champion.bundle.image_size,
                                       [d.forget_records for d in own] + [None] * len(returned),
                                       earlier=[t for t in plan.all_targets if t not in targets], retain_records=retain_rows or None,
                                       seed=plan.requests[0].seeds[0], cache_dir=cache_folder(settings, "images"))
    configs = {}
    for method in methods:
        config = dict(group.configs[method])
        wide = get_method(method).config_cls.model_fields.get("wide_joint_targets")
        if wide is not None and len(group.request_ids) < config.get("wide_joint_targets", wide.default):  # one new target a request
            # The returned targets ride along: the run lasts as long as the new targets need. With the
            # wide-joint lr (tuned for many new targets) pentagon + two returned classes stopped after
            # 20 steps with 40 % left (docs/benchmarks.md).
            config["wide_joint_targets"] = 0
        configs[method] = config
    return Group(group.request_ids, targets, methods, configs, data)


# ── evaluate, unlearn, decide ────────────────────────────────────────────────────────────────────

@task(name="evaluate-before", cache_policy=NO_CACHE)
def evaluate_before(champion: Champion, plan: UpdatePlan) -> Evaluation:
    """The champion on every target of the update (earlier ones included), logged as ``before.*``."""
    before = evaluate_model.fn(champion.bundle, plan.eval_set, plan.all_targets)
    mlflow.log_metrics({f"before.{metric_name(k)}": v for k, v in before.metrics.items()})
    figure = confusion_plot(before.confusions["class"].confusion, before.confusions["class"].classnames,
                            f"champion v{champion.version} before the erasure")
    mlflow.log_figure(figure, "plots/confusion_before.png")
    plt.close(figure)
    return before


@dataclass
class Unlearned:
    attempts: list[Attempt]
    best: Attempt
    method: str
    seconds: float
    evaluate_seconds: float


@task(name="unlearn-update", cache_policy=NO_CACHE)
def unlearn_update(plan: UpdatePlan, champion: Champion, before: Evaluation, settings: ErasureSettings, budget_s: float) -> Unlearned:
    """Run each group's methods on the candidate.

    One group: its methods in plan order until the gates pass or the budget ends (``auto``
    escalates), the champion the frozen reference; a carried target above the forget threshold, on
    the champion or after an attempt, is forgotten again with the group's (:func:`with_returned_targets`)
    by the same method before the next one is tried. Several groups: each group's first method, one
    after the other, each from (and referenced to) the candidate the group before left, and the
    gates once at the end (a failing batch is split by the flow)."""
    device = champion.bundle.model.logit_scale.device
    precision = resolve_precision(settings.precision, device, stage="unlearn")
    mlflow.log_params({"device": str(device), "precision": precision.dtype, "precision.reason": precision.reason})
    deadline = time.monotonic() + budget_s
    if len(plan.groups) == 1:
        group = with_returned_targets(plan.groups[0], plan, champion, before, settings) or plan.groups[0]
        attempts = []

        def attempt_with(method: str, group: Group) -> Attempt:
            returned = group.targets[len(plan.groups[0].targets):]
            if returned:
                get_run_logger().info("%s forgets %s again with %s: above %.0f %% on the champion or after the last attempt", method,
                                      ", ".join(t.name for t in returned), ", ".join(t.name for t in plan.groups[0].targets),
                                      100 * plan.thresholds["max_forget_accuracy"])
            attempt = attempt_method(method, champion.bundle, group.targets[0], quote(group.data), quote(plan.eval_set), plan.all_targets, before,
                                     plan.thresholds, config=group.configs[method], members=plan.members, precision=precision)
            attempts.append(attempt)
            return attempt

        for method in plan.groups[0].plan:
            if method not in group.plan:  # a method that cannot forget the returned targets with the new ones
                group = plan.groups[0]
            attempt = attempt_with(method, group)
            if attempt.passed or time.monotonic() > deadline:
                break
            # Forgetting one class can hand an earlier one's images back to their own name (they had
            # gone to the class now forgotten): forget those again in the same run before escalating.
            again = with_returned_targets(group, plan, champion, attempt.after, settings)
            if again is not None and method in again.plan:
                group = again
                attempt = attempt_with(method, group)
                if attempt.passed or time.monotonic() > deadline:
                    break
        best = next((a for a in attempts if a.passed), None) or max(attempts, key=lambda a: harmonic_score(a.after.metrics))
        return Unlearned(attempts, best, best.method, sum(a.seconds for a in attempts), sum(a.evaluate_seconds for a in attempts))
    attempts, candidate = [], None
    for n, group in enumerate(plan.groups):
        last = n == len(plan.groups) - 1
        method = group.plan[0]
        # A later group's frozen reference is the candidate it starts from, as if the earlier
        # groups had been promoted: with the champion as reference, its consistency and retention
        # pulled the earlier groups' targets back (docs/benchmarks.md, 5-class batch: circle 0 % →
        # 97.7 % after two more groups).
        reference = candidate or champion.bundle
        attempt = attempt_method(method, reference, group.targets[0], quote(group.data), quote(plan.eval_set), plan.all_targets, before,
                                 plan.thresholds, config=group.configs[method], members=plan.members, precision=precision,
                                 evaluate_after=last)
        attempts.append(attempt)
        candidate = attempt.bundle
    methods = "+".join(dict.fromkeys(a.method for a in attempts))
    return Unlearned(attempts, attempts[-1], methods, sum(a.seconds for a in attempts), sum(a.evaluate_seconds for a in attempts))


@task(name="decide-gates", cache_policy=NO_CACHE)
def decide_gates(plan: UpdatePlan, unlearned: Unlearned, before: Evaluation, champion: Champion, timings: Timings,
                 depth: DepthEvidence | None = None) -> UpdateReport:
    """The one gate decision of the update, logged (metrics after, per-class plot, gate report);
    the depth gates switched on join the others once ``depth`` is measured."""
    best = unlearned.best
    gates = [GateResult(**g.as_dict()) for g in [*best.gates, *depth_gates(depth, plan.depth_thresholds)]]
    lineage = champion.lineage_retain_drop + before.metrics["retain_accuracy"] - best.after.metrics["retain_accuracy"]
    if plan.lineage_limit is not None:
        gates.append(lineage_gate(champion, lineage, plan.lineage_limit))
    passed = all(g.passed for g in gates)
    mlflow.log_metrics({f"after.{metric_name(k)}": v for k, v in best.after.metrics.items()})
    names = [t.name for t in plan.all_targets]
    figure = per_class_plot(before.per_class, best.after.per_class, names,
                            f"{', '.join(plan.request_ids)[:80]}: zero-shot accuracy per class ({unlearned.method})")
    mlflow.log_figure(figure, "plots/per_class_before_after.png")
    plt.close(figure)
    gate_dicts = [g.model_dump() for g in gates]
    mlflow.log_dict({"passed": passed, "method": unlearned.method, "gates": gate_dicts, "attempts": [a.method for a in unlearned.attempts],
                     "thresholds": {**plan.thresholds, **plan.depth_thresholds, **_lineage(plan)}}, "gates/gate_report.json")
    mlflow.log_text(gate_markdown(gate_dicts), "gates/gate_report.md")
    mlflow.set_tags({"erasure.method": unlearned.method, "erasure.gates_passed": str(passed).lower()})
    timings = timings.model_copy(update={"unlearn_s": unlearned.seconds, "evaluate_s": timings.evaluate_s + unlearned.evaluate_seconds})
    mlflow.log_metrics({f"time.{k}": v for k, v in timings.model_dump().items() if k != "wall_s"})
    first = plan.data[plan.request_ids[0]]
    return UpdateReport(
        request_ids=plan.request_ids, targets=[t.name for t in plan.all_targets[len(champion.targets):]], carried_targets=names,
        method=unlearned.method, attempts=[a.method for a in unlearned.attempts], decision="rejected" if not passed else "promoted",
        gates_passed=passed, gates=gates, thresholds={**plan.thresholds, **plan.depth_thresholds, **_lineage(plan)},
        depth=depth.as_dict() if depth else {}, heldout_suite=first.eval_set.heldout.as_dict(),
        before=before.metrics, after=best.after.metrics, per_class_before=before.per_class, per_class_after=best.after.per_class,
        champion_before=champion.version, mlflow_run_id=mlflow.active_run().info.run_id,
        data={rid: plan.data[rid].summary for rid in plan.request_ids}, timings=timings, lineage_retain_drop=lineage)


def _lineage(plan: UpdatePlan) -> dict:
    return {} if plan.lineage_limit is None else {"max_lineage_retain_drop": plan.lineage_limit}


def culprits(report: UpdateReport) -> list[str]:
    """The requests whose own target failed the forget gate; empty when the failure is shared
    (a retain or held-out drop), which only splitting the batch can attribute."""
    limit = report.thresholds["max_forget_accuracy"]
    return [rid for rid, name in zip(report.request_ids, report.targets) if report.after.get(f"forget_accuracy/{name}", 0.0) > limit]


# ── register, promote or reject, publish ─────────────────────────────────────────────────────────

@task(name="register-candidate", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient, cache_policy=NO_CACHE)
def register_update(settings: ErasureSettings, name: str, plan: UpdatePlan, unlearned: Unlearned, champion: Champion,
                    report: UpdateReport) -> str:
    """Register the candidate (not promoted). Idempotent: a retry finds the version an earlier try
    of this run registered instead of making a second one."""
    run_id = report.mlflow_run_id
    made = [v for v in MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")]
    if made:
        return str(made[0].version)
    tags = {**lineage_tags(plan.all_targets, [*champion.request_ids, *plan.request_ids], champion.version),
            "erasure.method": unlearned.method, "erasure.seeds": json.dumps(sorted({s for r in plan.requests for s in r.seeds})),
            "erasure.device": str(champion.bundle.model.logit_scale.device), "prefect.flow_run_id": flow_run_id(),
            "erasure.manifest_hashes": json.dumps({rid: plan.data[rid].manifest_hashes for rid in plan.request_ids})[:5000],
            "erasure.heldout_suite": plan.data[plan.request_ids[0]].eval_set.heldout.reference, "erasure.decision": "candidate",
            LINEAGE_RETAIN_DROP: f"{report.lineage_retain_drop:.6f}",
            "status": "candidate"}
    # the lineage keeps the recipe its oracles are trained with
    version = registry.register_bundle(unlearned.best.bundle, settings.model_copy(update={"model_name": name}), tags, run_id,
                                       champion.recipe)
    return str(version.version)


def describe(report: UpdateReport, decision: str) -> str:
    """What a reviewer reads first in the MLflow UI, on the run and on the version."""
    failed = ", ".join(report.failed_gates) or "none"
    gates = "all gates passed" if report.gates_passed else f"failed gates: {failed}"
    forget = report.after.get("forget_accuracy", float("nan"))
    retain = (report.before.get("retain_accuracy", float("nan")), report.after.get("retain_accuracy", float("nan")))
    version = f"v{report.model_version}" if report.model_version else "no version"
    return (f"**{decision}** ({gates}): erased {', '.join(report.targets)} for request(s) {', '.join(report.request_ids)} "
            f"with {report.method}, from champion v{report.champion_before} → {version}. Forget accuracy {100 * forget:.1f} %, "
            f"retain {100 * retain[0]:.1f} → {100 * retain[1]:.1f} %. Carries: {', '.join(report.carried_targets)}.")


@task(name="promote", cache_policy=NO_CACHE)
def promote_update(settings: ErasureSettings, name: str, report: UpdateReport) -> None:
    """Make the candidate champion (old champion → ``previous``), under the model's promotion lock,
    only if the champion is still the one it was made from."""
    from tasks.champion import promote

    with locks.exclusive(f"promote:{name}", settings, timeout_s=settings.lock_timeout_s):
        current = registry.get_version_by_alias(name, registry.CHAMPION)
        if current is None or str(current.version) != str(report.champion_before):
            raise registry.ChampionMoved(f"the champion of {name!r} is now v{None if current is None else current.version}, but the candidate "
                                f"v{report.model_version} was made from v{report.champion_before}: it is not promoted; the requests "
                                "may run again from the new champion")
        promote(name, report.model_version)
        registry.tag_version(name, report.model_version, **{"erasure.decision": "promoted"})


def mark_rejected(name: str, report: UpdateReport) -> None:
    reason = f"failed gates: {', '.join(report.failed_gates)}"
    registry.tag_version(name, report.model_version, **{"erasure.decision": "rejected", "status": "rejected", "reason": reason})
    emit_event("clip-erasure.candidate.rejected", resource={"prefect.resource.id": f"clip-erasure.model.{name}"},
               payload={"request_ids": report.request_ids, "version": report.model_version, "failed_gates": reason})


@task(name="publish", cache_policy=NO_CACHE)
def publish(settings: ErasureSettings, name: str, report: UpdateReport, requests: list[ErasureRequest], runs: dict[str, str],
            decision: str) -> list[RequestOutcome]:
    """Per request: its certificate (JSON + markdown) on its run, its ledger status and a Prefect
    artifact; the descriptions of the runs and the version. Returns each request's outcome."""
    client = MlflowClient()
    note = describe(report, decision)
    client.set_tag(report.mlflow_run_id, NOTE, note)
    if report.model_version:
        client.update_model_version(name, report.model_version, description=note)
    outcomes = []
    for request in requests:
        run_id = runs[request.request_id]
        certificate = certificate_of(report, request, name, decision)
        _log_certificate(client, run_id, certificate)
        if run_id != report.mlflow_run_id:
            client.set_tag(run_id, "erasure.update_run_id", report.mlflow_run_id)
            client.set_tag(run_id, NOTE, f"Request {request.request_id}, one of {len(requests)} in update run "
                                         f"{report.mlflow_run_id}: " + note)
        status = decision if decision in ("promoted", "rejected", "dry_run") else "failed"
        reason = "" if decision == "promoted" else (f"failed gates: {', '.join(report.failed_gates)}" if decision == "rejected" else
                                                    ("gates passed" if report.gates_passed else "gates failed"))
        tags = {"erasure.model_version": report.model_version} if report.model_version else {}
        ledger.set_status(client, run_id, status, reason=reason, **tags)
        link = f"{settings.mlflow_ui_url}/#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"
        create_markdown_artifact(
            key=f"erasure-{request.request_id.lower().replace('_', '-').replace('.', '-')}"[:100],
            markdown=f"# Erasure `{request.request_id}`: **{decision}**\n\nMLflow run: [{run_id}]({link})\n\n{note}\n\n"
                     f"{metrics_markdown(report.before, report.after)}\n\n{gate_markdown([g.model_dump() for g in report.gates])}\n",
            description=f"erasure of {certificate['target']}: {decision}")
        outcomes.append(RequestOutcome(request_id=request.request_id, status=status, reason=reason, model_version=report.model_version,
                                       mlflow_run_id=run_id))
    if decision == "promoted":
        # After the ledger says promoted: a receiver that reloads the served model may take a while,
        # and the certificate, already written, gains when the new champion went into service.
        serving = events.notify_serving(events.CHAMPION_PROMOTED, name, report.model_version, report.request_ids)
        if serving:
            client.set_tag(report.mlflow_run_id, "erasure.serving_notified_at", serving["notified_at"])
            if serving["in_service_at"]:
                client.set_tag(report.mlflow_run_id, "erasure.in_service_at", serving["in_service_at"])
            for request in requests:
                _log_certificate(client, runs[request.request_id], certificate_of(report, request, name, decision, serving=serving))
    get_run_logger().info("%s: %s", decision, note)
    return outcomes


def _log_certificate(client: MlflowClient, run_id: str, certificate: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="certificate-") as folder:
        for path in write_certificate(Path(folder), certificate):
            client.log_artifact(run_id, str(path), "certificate")


def fail_request(client: MlflowClient, run_id: str, request_id: str, exc: BaseException) -> RequestOutcome:
    """Record a request that failed; validation failures are not retried by batches (the request
    must change), anything else (I/O, a crash, a moved champion) is."""
    retryable = not isinstance(exc, (ValueError, LookupError)) or isinstance(exc, registry.ChampionMoved)
    reason = f"{type(exc).__name__}: {exc}"[:500]
    ledger.set_status(client, run_id, "failed", reason=reason, **{RETRYABLE: str(retryable).lower()})
    return RequestOutcome(request_id=request_id, status="failed", reason=reason, mlflow_run_id=run_id)


@task(name="forget-cached-images", cache_policy=NO_CACHE)
def forget_cached_images(settings: ErasureSettings, plan: UpdatePlan, runs: dict[str, str]) -> None:
    """After a promotion: the decoded copies of each request's own forget images leave the image
    cache (the reference data's images stay: they are the owner's), recorded on its certificate."""
    cache = ImageCache(cache_folder(settings, "images"))
    client = MlflowClient()
    for request_id in plan.request_ids:
        records = plan.data[request_id].forget_records
        if not records:
            continue
        digests = set()
        for record in records:
            with contextlib.suppress(OSError):  # read by this update moments ago; gone only if deleted meanwhile
                digests.add(file_digest(record.image_path))
        removed = cache.forget(digests)
        client.log_dict(runs[request_id], {"request_id": request_id, "forget_images": len(records), "decoded_copies_removed": removed},
                        "certificate/image-cache-forgotten.json")


@task(name="delete-source-versions", cache_policy=NO_CACHE)
def delete_sources(settings: ErasureSettings, requests: list[ErasureRequest], runs: dict[str, str]) -> None:
    """After a promotion: delete for good the data-lake object versions a deletion request was made
    from (the bridge read them as forget data), and record what went on each request's certificate."""
    sourced = [r for r in requests if r.origin is not None]
    if not sourced:
        return
    from tasks.bridge import delete_source_versions

    client = MlflowClient()
    for request in sourced:
        deleted = delete_source_versions(request, settings)
        client.log_dict(runs[request.request_id], {"request_id": request.request_id, "deleted": deleted, "note": request.origin.note},
                        "certificate/source-versions-deleted.json")
