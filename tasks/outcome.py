"""The typed results of an erasure: what one model update did, what became of each request.

One :class:`UpdateReport` per unlearning update (one candidate, one gate decision); one
:class:`RequestOutcome` per request. The single-request flow returns an :class:`ErasureReport`
(both in one), the batch flow a :class:`BatchReport`. The same models are the ``--report`` JSON
and the source of each request's certificate (:func:`certificate_of`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

RequestStatus = Literal["promoted", "rejected", "dry_run", "failed", "pending", "received", "running", "validated"]
Decision = Literal["promoted", "rejected", "dry_run", "split", "failed"]


class GateResult(BaseModel):
    name: str
    value: float
    threshold: float
    comparison: str
    passed: bool
    description: str = ""


class Timings(BaseModel):
    """Where an update's time went: model math, data, and the rest (Prefect, MLflow, plots, registration)."""

    load_champion_s: float = 0.0
    data_and_validation_s: float = 0.0
    unlearn_s: float = 0.0
    evaluate_s: float = 0.0
    wall_s: float = 0.0


class UpdateReport(BaseModel):
    """One unlearning update of a model: the requests it carries, the candidate and its gates."""

    request_ids: list[str]
    targets: list[str]  # this update's new targets, by name
    carried_targets: list[str] = Field(default_factory=list)  # every target the candidate must carry (earlier ones too)
    method: str = ""  # the method of the attempt the decision is about ("cliperase", or "cliperase+three_stage" for a sequence)
    attempts: list[str] = Field(default_factory=list)
    decision: Decision
    reason: str = ""
    gates_passed: bool = False
    gates: list[GateResult] = Field(default_factory=list)
    thresholds: dict[str, float | str] = Field(default_factory=dict)
    heldout_suite: dict = Field(default_factory=dict)
    before: dict[str, float] = Field(default_factory=dict)
    after: dict[str, float] = Field(default_factory=dict)
    per_class_before: dict[str, float] = Field(default_factory=dict)
    per_class_after: dict[str, float] = Field(default_factory=dict)
    champion_before: str | None = None
    model_version: str | None = None
    mlflow_run_id: str | None = None
    data: dict = Field(default_factory=dict)  # per request id: what went where (tasks.data.data_summary)
    timings: Timings = Field(default_factory=Timings)
    depth: dict = Field(default_factory=dict)  # tasks.depth.DepthEvidence.as_dict(): per new target, before / after / oracle
    lineage_retain_drop: float | None = None  # the champion's, plus this update's retain drop

    @property
    def failed_gates(self) -> list[str]:
        return [g.name for g in self.gates if not g.passed]


class RequestOutcome(BaseModel):
    """What became of one request."""

    request_id: str
    status: RequestStatus
    reason: str = ""
    model_version: str | None = None
    mlflow_run_id: str | None = None
    idempotent: bool = False  # answered from the ledger: it had run before
    attempt: int | None = None
    due_at: str | None = None


class ErasureReport(UpdateReport):
    """The single-request flow's result: the update and the request's outcome in one."""

    request_id: str
    status: RequestStatus
    target: str = ""
    idempotent: bool = False
    dry_run: bool = False

    @classmethod
    def answered(cls, outcome: RequestOutcome) -> "ErasureReport":
        """A request the ledger already holds an outcome for: nothing ran."""
        return cls(request_ids=[outcome.request_id], targets=[], decision=_decision_of(outcome.status), request_id=outcome.request_id,
                   status=outcome.status, reason=outcome.reason, model_version=outcome.model_version,
                   mlflow_run_id=outcome.mlflow_run_id, idempotent=outcome.idempotent)


class BatchReport(BaseModel):
    """The batch flow's result: every request's outcome and every update it took."""

    model_name: str
    requests: list[RequestOutcome] = Field(default_factory=list)
    updates: list[UpdateReport] = Field(default_factory=list)
    champion_before: str | None = None
    champion_after: str | None = None
    wall_s: float = 0.0

    def outcome(self, request_id: str) -> RequestOutcome:
        return next(o for o in self.requests if o.request_id == request_id)


def _decision_of(status: str) -> Decision:
    return status if status in ("promoted", "rejected", "dry_run") else "failed"  # type: ignore[return-value]


def certificate_of(update: UpdateReport, request, model_name: str, decision: str, purged: list[dict] | None = None,
                   serving: dict | None = None) -> dict:
    """The certificate of one request in ``update`` (JSON-able), as :func:`tasks.report.write_certificate` writes it.

    Args:
        serving: what the serving webhook confirmed (:func:`tasks.events.notify_serving`); None
            when none did (none configured, or not yet asked).
    """
    target = request.target.to_forget_target().name
    return {"request_id": request.request_id, "requester": request.requester, "requested_at": request.requested_at.isoformat(),
            "target": target, "method": update.method, "model_name": model_name, "model_version": update.model_version,
            "parent_version": update.champion_before, "decision": decision, "batch": update.request_ids,
            "carried_targets": update.carried_targets, "before": update.before, "after": update.after,
            "gates": [g.model_dump() for g in update.gates], "heldout_suite": update.heldout_suite,
            "data": update.data.get(request.request_id), "mlflow_run_id": update.mlflow_run_id, "purged": purged or [],
            "depth": _depth_of(update.depth, target), "serving": serving or {"notified_at": None, "in_service_at": None}}


def _depth_of(depth: dict, target: str) -> dict:
    """The depth evidence of one request's target: the candidate's measures beside the champion's
    before the erasure and, when one was cached, the retrain oracle's (``docs/depth.md``)."""
    if not depth:
        return {}
    targets = depth.get("targets", {})
    sides = targets.get(target) or (next(iter(targets.values())) if len(targets) == 1 else {})  # an association's completed name differs
    return {**sides, "oracle_model": depth.get("oracle")}
