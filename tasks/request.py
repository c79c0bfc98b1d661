"""The erasure request: what to forget, from which data, with which method, under which gates.

A request arrives as JSON (a file, CLI text or an event payload):

    {"request_id": "req-2026-001", "requester": "privacy@example.org",
     "target": {"kind": "class", "class_name": "circle"},
     "forget_manifest": "s3://erasure-data/forget.jsonl", "method": "auto"}

Every model forbids unknown fields, so a typo ("clas_name") fails loudly instead of being ignored.
:func:`load_request` turns every problem into one line per error that names the field and the
fix, e.g. ``target.class_name: required for a class target — add "class_name": "circle"``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.validation import split_s3_uri
from unlearning.heldout import HeldoutSuite, check_suite_reference
from unlearning.target import ForgetTarget

AUTO_METHOD = "auto"
# The registry's names (unlearning.methods); a caller holding the live registry passes its names
# as validation context instead: ErasureRequest.model_validate(data, context={"methods": [...]}).
METHOD_NAMES = ("lipschitz", "three_stage", "cliperase", "gradient_ascent", "graddiff", "finetune",
                "lipschitz:paper", "three_stage:paper", "cliperase:paper", "cliperase:deep")

# Starts with a letter or digit so that an id can never be "." or ".." when used in paths and keys.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class RequestError(ValueError):
    """A request that cannot be read or validated; the message says which field is wrong and how to fix it."""


def _check_location(value: str) -> str:
    if value.startswith("s3://"):
        try:
            split_s3_uri(value)
        except ValueError as exc:
            raise ValueError(f"{exc} — write it as \"s3://bucket/path/forget.jsonl\"") from None
    elif "://" in value:
        raise ValueError('only local paths and s3:// URIs are supported — use "data/forget.jsonl" or "s3://bucket/forget.jsonl"')
    return value


NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Location = Annotated[NonEmptyStr, AfterValidator(_check_location)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class TargetSpec(ForgetTarget):
    """What to forget: :class:`ForgetTarget`'s fields and rules, plus where association pairs live.

    Examples: ``{"kind": "class", "class_name": "circle"}``;
    ``{"kind": "subgroup", "class_name": "circle", "attribute": "colour", "value": "red"}``;
    ``{"kind": "association", "captions": ["a red circle"], "pairs_manifest": "s3://bucket/pairs.jsonl"}``.
    """

    model_config = ConfigDict(extra="forbid")

    pairs_manifest: Location | None = Field(
        default=None, description="Manifest (local path or s3:// URI) of the image-text pairs to forget; association targets only.")

    @model_validator(mode="after")
    def _pairs_only_for_associations(self) -> "TargetSpec":
        if self.pairs_manifest and self.kind != "association":
            raise ValueError('target.pairs_manifest is only for association targets — remove it or set "kind": "association"')
        return self

    def to_forget_target(self) -> ForgetTarget:
        """The library's view of this target (without the data location)."""
        return ForgetTarget.model_validate(self.model_dump(exclude={"pairs_manifest"}))


class GateThresholds(BaseModel):
    """Promotion gates, as fractions: the erased model is registered only if it passes all three."""

    model_config = ConfigDict(extra="forbid")

    max_forget_accuracy: Fraction = Field(description="Highest accuracy on the forget target still counted as forgotten.")
    max_retain_drop: Fraction = Field(description="Largest allowed drop in accuracy on the retain data.")
    max_heldout_drop: Fraction = Field(description="Largest allowed drop in zero-shot accuracy on held-out probes.")
    # Depth gates (docs/depth.md), off unless set here or in the settings (ERASURE_MAX_RELEARN_ACCURACY, ...).
    max_relearn_accuracy: Fraction | None = Field(default=None, description=(
        "Highest target accuracy allowed after 10 relearning steps on 8 of its images; unset: not gated."))
    max_knn_recall: Fraction | None = Field(default=None, description=(
        "Highest target recall of a 10-nearest-neighbour vote in image-embedding space; unset: not gated."))
    max_lineage_retain_drop: Fraction | None = Field(default=None, description=(
        "Largest retain-accuracy drop summed over the model's lineage: every erasure since the first champion, this one "
        "included, each against its own champion; unset: ERASURE_MAX_LINEAGE_RETAIN_DROP (default 0.05)."))
    max_mia_distance: Fraction | None = Field(default=None, description=(
        "Largest distance of the membership-inference AUC from the retrain oracle's (0.5 without one); unset: not gated."))


# A held-out suite by name or file ("paraphrase", "suites/heldout.json"), or inline ({"name": ...,
# "templates": [...]}). The tags pick one branch, so an error reports only that branch's problem.
SUITE_TAGS = ("suite-name", "suite-inline")
HeldoutSuiteRef = Annotated[
    Annotated[Annotated[str, AfterValidator(check_suite_reference)], Tag(SUITE_TAGS[0])] | Annotated[HeldoutSuite, Tag(SUITE_TAGS[1])],
    Discriminator(lambda value: SUITE_TAGS[0] if isinstance(value, str) else SUITE_TAGS[1]),
]


class SourceObject(BaseModel):
    """An object in the owner's data lake that held an image to forget."""

    model_config = ConfigDict(extra="forbid")

    bucket: NonEmptyStr
    key: NonEmptyStr
    version_id: str | None = Field(default=None, description=(
        "The object version that still holds the image (versioned buckets): deleted for good once the erasure is promoted."))

    @property
    def identity(self) -> str:
        """A short stable id of this object version, for ledger tags."""
        text = f"{self.bucket}/{self.key}@{self.version_id or ''}"
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


class RequestOrigin(BaseModel):
    """Where a request came from when a system filed it, e.g. deletions in a data lake."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["deletion"] = "deletion"
    objects: list[SourceObject] = Field(min_length=1, description="The deleted objects this request erases.")
    note: str = Field(default="", description="How the forget data was obtained (e.g. previous versions, or a synthetic set).")


class ErasureRequest(BaseModel):
    """One erasure request, as submitted; ``content_hash()`` identifies it for idempotency."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="Caller's id: 1-128 letters, digits, '-', '_', '.'.")
    requested_at: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc),
                                        description="When the erasure was requested (ISO 8601 with a zone); default now.")
    requester: NonEmptyStr = Field(description="Who asked (person, team or system), for the audit trail.")
    target: TargetSpec
    forget_manifest: Location | None = Field(default=None, description=(
        "Manifest of images to forget: local path or s3://bucket/key. Every row must be an image of a class or subgroup "
        "target. Rows may be images of the model's reference data: those leave the retain data and the evaluation's "
        "retain side. Default: the target's images in the reference data's train split."))
    retain_manifest: Location | None = Field(default=None, description=(
        "Manifest of images to keep: local path or s3://bucket/key. Every row is retain data, whatever its split; none "
        "may be in forget_manifest or be an image of a forgotten class or subgroup. The class set still comes from the "
        "reference data. Default: the reference data's train split, without forgotten targets and forget images."))
    method: str = Field(default=AUTO_METHOD, examples=[AUTO_METHOD, *METHOD_NAMES],
                        description="Unlearning method from the registry, or 'auto' to pick one for the target.")
    model: NonEmptyStr | None = Field(default=None, description="Registered model to erase from; default: the configured champion.")
    gates: GateThresholds | None = Field(default=None, description="Promotion gates; default: the configured gates.")
    heldout_suite: HeldoutSuiteRef | None = Field(
        default=None, description='Held-out suite of the held-out gate: "auto", "world", "paraphrase", a suite .json file, or '
        'a suite inline, e.g. {"name": "sketches", "templates": ["a sketch of a {}."]} (format: unlearning/heldout.py); '
        "default: the configured ERASURE_HELDOUT_SUITE.")
    method_config: dict[str, Any] = Field(default_factory=dict, description="Overrides of the method's hyperparameters, e.g. "
                                          '{"max_steps": 100}; checked against the method\'s config (unknown keys are refused).')
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default=[0], min_length=1, description="Random seeds; the first seeds the "
                                                      "unlearning run, all are recorded.")
    dry_run: bool = Field(default=False, description="Run and evaluate, but register nothing.")
    time_budget_s: float = Field(default=600.0, gt=0, allow_inf_nan=False, description="Wall-clock budget for unlearning, in seconds.")
    due_at: AwareDatetime | None = Field(default=None, description=(
        "When the erasure is due (ISO 8601 with a zone); default: requested_at + ERASURE_DEADLINE_DAYS (30, GDPR's one month)."))
    extension_days: int = Field(default=0, ge=0, le=60, description=(
        "Days added to the due date (0-60: GDPR art. 12(3) allows two more months for complex requests); needs extension_reason."))
    extension_reason: NonEmptyStr | None = Field(default=None, description="Why the deadline was extended, for the audit trail.")
    origin: RequestOrigin | None = Field(default=None, description="Set by the deletion bridge: the data-lake objects behind this request.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        names = list((info.context or {}).get("methods") or METHOD_NAMES)
        if value != AUTO_METHOD and value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise ValueError(f'unknown method "{value}" — {hint}use "{AUTO_METHOD}" or one of: {", ".join(sorted(names))}')
        return value

    @model_validator(mode="after")
    def _association_has_pairs(self) -> "ErasureRequest":
        target = self.target
        if target.kind == "association" and not (target.captions or target.pairs_manifest or self.forget_manifest):
            raise ValueError("target.captions or target.pairs_manifest is required for an association target without a "
                             'forget_manifest — add "captions": ["a red circle"] or "pairs_manifest": "s3://bucket/pairs.jsonl"')
        return self

    @model_validator(mode="after")
    def _deadline_is_consistent(self) -> "ErasureRequest":
        if self.extension_days and not self.extension_reason:
            raise ValueError("extension_reason is required when extension_days > 0 — add "
                             '"extension_reason": "several systems hold the data", or set "extension_days": 0')
        if self.due_at is not None and self.due_at < self.requested_at:
            raise ValueError(f"due_at is before requested_at ({self.requested_at.isoformat()}) — give a later due_at, "
                             "or leave it out for the default deadline")
        return self

    def due(self, deadline_days: float) -> datetime:
        """When the erasure is due: ``due_at`` (default ``requested_at`` + ``deadline_days``) plus ``extension_days``."""
        base = self.due_at or self.requested_at + timedelta(days=deadline_days)
        return base + timedelta(days=self.extension_days)

    def content_hash(self) -> str:
        """SHA-256 of the request's content, ignoring when it was made and is due (a resubmission,
        or one with its deadline extended, is the same request).

        Fields left at their defaults are left out, so adding a defaulted field to this model
        later does not change the hash of existing requests.
        """
        content = self.model_dump(mode="json", exclude={"requested_at", "due_at", "extension_days", "extension_reason"},
                                  exclude_defaults=True)
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of an erasure request, for ``erasure schema`` and editors."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **ErasureRequest.model_json_schema()}


def load_request(source: str | Path | Mapping[str, Any], methods: Sequence[str] | None = None) -> ErasureRequest:
    """Read and validate a request.

    Args:
        source: a path to a JSON file, the JSON text itself (anything starting with ``{``), or an
            already-parsed mapping (an event payload).
        methods: valid method names (the live registry's); default :data:`METHOD_NAMES`.

    Raises:
        RequestError: unreadable file, malformed JSON (with line and column), duplicate, unknown,
            missing or wrongly typed fields; one line per problem, each naming the field and the fix.
    """
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        text, where = _read_text(source)
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{where}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                               "— fix the syntax there") from None
        except _DuplicateKey as exc:
            raise RequestError(f'{exc.key}: given twice in {where} — keep one "{exc.key}"') from None
    if not isinstance(data, dict):
        raise RequestError(f"request: expected a JSON object {{...}}, got {type(data).__name__} — put the fields between braces")
    try:
        return ErasureRequest.model_validate(data, context={"methods": list(methods)} if methods else None)
    except ValidationError as exc:
        raise RequestError(format_validation_error(exc)) from None


def _read_text(source: str | Path) -> tuple[str, str]:
    """The JSON text and a name for it in messages."""
    if isinstance(source, str) and source.lstrip().startswith(("{", "[")):
        return source, "request"
    path = Path(source)
    if not path.is_file():
        raise RequestError(f"request: no file at {path} — pass the path of a .json request or the JSON text itself")
    return path.read_text(), str(path)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads silently keeps the last of two equal keys; in a request that could erase the wrong class.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


# Example values, by field name, for "add ..." fixes.
_EXAMPLES = {
    "request_id": '"req-2026-001"',
    "requester": '"privacy-team@example.org"',
    "target": '{"kind": "class", "class_name": "circle"}',
    "kind": '"class"',
    "class_name": '"circle"',
    "attribute": '"colour"',
    "value": '"red"',
    "captions": '["a red circle"]',
    "pairs_manifest": '"s3://erasure-data/pairs.jsonl"',
    "max_forget_accuracy": "0.05",
    "max_retain_drop": "0.05",
    "max_heldout_drop": "0.05",
    "due_at": '"2026-12-02T09:30:00Z"',
    "extension_days": "30",
    "extension_reason": '"several systems hold the data"',
}
# How to fix a wrong value, by field name, where pydantic's message does not say.
_HINTS = {
    "request_id": 'use 1-128 letters, digits, "-", "_" or ".", starting with a letter or digit, e.g. "req-2026-001"',
    "requested_at": 'use an ISO 8601 time with a zone, e.g. "2026-11-02T09:30:00Z"',
    "requester": 'name who asked, e.g. "privacy-team@example.org"',
    "max_forget_accuracy": "use a fraction between 0 and 1, e.g. 0.05",
    "max_retain_drop": "use a fraction between 0 and 1, e.g. 0.05",
    "max_heldout_drop": "use a fraction between 0 and 1, e.g. 0.05",
    "seeds": "use a non-empty list of non-negative integers, e.g. [0, 1, 2]",
    "time_budget_s": "use a positive number of seconds, e.g. 600",
    "dry_run": "use true or false",
    "due_at": 'use an ISO 8601 time with a zone, e.g. "2026-12-02T09:30:00Z", or leave it out for requested_at + 30 days',
    "extension_days": "use a whole number of days from 0 to 60 (GDPR allows up to two more months), e.g. 30",
    "extension_reason": 'say why the deadline was extended, e.g. "several systems hold the data"',
    "heldout_suite": 'use "auto", "paraphrase", a suite .json path or {"name": "sketches", "templates": ["a sketch of a {}."]}',
    "gates": 'use {"max_forget_accuracy": 0.05, "max_retain_drop": 0.05, "max_heldout_drop": 0.05} or leave it out',
}
# A validator message that starts with the fields it is about: "target.class_name is required ...".
_NAMED_FIELDS = re.compile(r"^(?P<fields>[a-z_][a-z_.]*(?:(?:, | and | or )[a-z_][a-z_.]*)*) (?:is|are) (?P<rest>.+)$", re.S)


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: ``<field path>: <problem> — <fix>``.

    Args:
        exc: a ValidationError raised while validating an :class:`ErasureRequest`.
    """
    return "\n".join(_format_error(error) for error in exc.errors(include_url=False))


def _format_error(error: dict) -> str:
    loc = tuple(part for part in error["loc"] if part not in SUITE_TAGS)  # union branches are no fields
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    field = next((part for part in reversed(loc) if isinstance(part, str)), "request")
    path = _path(loc)
    fix = ""
    if kind == "missing":
        message = "required"
        fix = f'add "{field}": {_EXAMPLES[field]}' if field in _EXAMPLES else f'add "{field}"'
    elif kind == "extra_forbidden":
        allowed = list(getattr(_model_at(loc[:-1]), "model_fields", {}))
        close = difflib.get_close_matches(field, allowed, n=1)
        message = "unknown field"
        fix = (f'did you mean "{close[0]}"? ' if close else "remove it; ") + f"allowed: {', '.join(allowed)}"
    elif kind == "value_error":
        path, message, fix = _named_fields(path, message)
    else:
        fix = _HINTS.get(field) or (f"e.g. {_EXAMPLES[field]}" if field in _EXAMPLES else "")
        if not isinstance(error.get("input"), (dict, list)):
            message += f" (got {json.dumps(error.get('input'), default=str)})"
    return f"{path}: {message}" + (f" — {fix}" if fix else "")


def _named_fields(path: str, message: str) -> tuple[str, str, str]:
    """Move the fields a model-level message names ("target.class_name is required ...") to the front."""
    match = _NAMED_FIELDS.match(message)
    if not match:
        return path, message, ""
    fields = re.split(r", | and | or ", match["fields"])
    if not all(_is_field(f) for f in fields):
        return path, message, ""
    rest = match["rest"]
    if " — " in rest:  # our own messages carry their fix already
        return ", ".join(fields), rest, ""
    names = [f.split(".")[-1] for f in fields]
    if rest.startswith("required") and all(n in _EXAMPLES for n in names):
        rest = re.sub(r"\s*\(e\.g\.[^)]*\)$", "", rest)  # the "add" fix below shows the example
        return ", ".join(fields), rest, "add " + ", ".join(f'"{n}": {_EXAMPLES[n]}' for n in names)
    return ", ".join(fields), rest, ""


def _is_field(dotted: str) -> bool:
    *parents, name = dotted.split(".")
    model = _model_at(tuple(parents))
    return model is not None and name in model.model_fields


def _path(loc: tuple) -> str:
    """``("seeds", 1)`` -> ``seeds[1]``; the model root is "request"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "request"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class found by following field names from :class:`ErasureRequest`."""
    model: type[BaseModel] | None = ErasureRequest
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _first_model(model.model_fields[part].annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found:
            return found
    return None
