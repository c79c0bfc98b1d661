"""Held-out suites: the zero-shot checks of general ability that no unlearning method trains on.

The held-out gate compares a candidate with the champion on a *held-out suite*. Three built-ins:

- ``world``: the shapes world's probes (colour, size, colour x shape), on the embedded world only;
- ``paraphrase``: the retained classes under :data:`PARAPHRASE_TEMPLATES`, minus any template the
  model's captions, the methods' training prompts or the class prompt already use — works on any
  labelled data;
- ``auto`` (the default): ``world`` when the images carry the world's attributes, else ``paraphrase``.

Or a suite of one's own, as JSON (a file, or inline in a request)::

    {"name": "product-probes",
     "templates": ["a product shot of a {}.", "a {} on a shelf."],
     "probes": [{"name": "material", "attribute": "material", "templates": ["something made of {}."]}],
     "manifest": "probe_images.jsonl"}

``templates`` probe the retained classes (``label``) and are reported as probe ``<name>``; each
entry of ``probes`` classifies one field of the images: ``label`` or a key of the manifest rows'
``attributes``. ``manifest`` (optional; relative to the suite file) holds the images to probe, in
the usual manifest format; by default the evaluation images (the reference data's test split).
Images of a forget target are always left out, and label probes only offer the retained classes.

Kept free of torch so that request validation stays fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

BUILTIN_SUITES = ("auto", "world", "paraphrase")
# Phrasings absent from the world's captions ("a picture of", "an image of", "a drawing of", "this
# is a"), from the methods' training prompt ("a picture of a {}.") and from the class prompt ("a photo
# of a {}."), so that accuracy under them measures zero-shot generalisation, not recall.
PARAPHRASE_TEMPLATES = (
    "a rendering of a {}.",
    "a close-up of the {}.",
    "there is a {} in the scene.",
    "an example of a {}.",
    "a snapshot of one {}.",
)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class HeldoutSuiteError(ValueError):
    """A held-out suite that cannot be read or does not fit the data; the message names the field and the fix."""


def _check_template(value: str) -> str:
    if value.count("{}") != 1 or "{" in value.replace("{}", "") or "}" in value.replace("{}", ""):
        raise ValueError('a template holds the class name as "{}" exactly once and no other braces, e.g. "a sketch of a {}."')
    return value


Template = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3), AfterValidator(_check_template)]
Name = Annotated[str, StringConstraints(pattern=_NAME)]
NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class ProbeSpec(BaseModel):
    """One zero-shot probe: classify one field of each probe image, prompting with ``templates``."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="Metric name: reported as heldout/<name>; 1-64 letters, digits, '.', '_', '-'.")
    attribute: NonEmpty = Field(default="label", description="The field to classify: 'label' (the image's class) or a key "
                                                             "of the manifest rows' attributes, e.g. 'colour'.")
    templates: list[Template] = Field(min_length=1, description='Prompt templates with "{}" for the answer, e.g. '
                                                                '"a {} object."; never ones the methods train with.')
    classnames: list[NonEmpty] | None = Field(default=None, min_length=2, description="Candidate answers; default: the values "
                                              "found among the probe images (for 'label': the retained classes).")


class HeldoutSuite(BaseModel):
    """A held-out suite of one's own: prompt templates for the retained classes and/or probe tasks."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="The suite's name, shown in reports, MLflow params and the held-out gate.")
    templates: list[Template] = Field(default_factory=list, description="Templates for the retained classes that training "
                                      "never uses, e.g. \"a sketch of a {}.\"; reported as probe heldout/<name>.")
    probes: list[ProbeSpec] = Field(default_factory=list, description="Probe tasks over the probe images.")
    manifest: NonEmpty | None = Field(default=None, description="Manifest of the probe images (local path, relative to the "
                                      "suite file); default: the evaluation images.")

    @model_validator(mode="after")
    def _complete(self) -> "HeldoutSuite":
        if self.name in BUILTIN_SUITES:
            raise ValueError(f'name "{self.name}" is a built-in suite — choose another name, e.g. "{self.name}-own"')
        if not self.templates and not self.probes:
            raise ValueError('templates or probes is required — add "templates": ["a sketch of a {}."]')
        names = [p.name for p in self.probes] + ([self.name] if self.templates else [])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"probes: {', '.join(twice)} named twice (the templates probe takes the suite's name) "
                             "— give every probe its own name")
        if self.manifest and "://" in self.manifest:
            raise ValueError("manifest: must be a local path — copy the probe images next to the suite file")
        return self

    @property
    def kind(self) -> str:
        return "probes" if self.probes else "templates"


@dataclass(frozen=True)
class HeldoutInfo:
    """Which held-out suite an evaluation set probes with, for reports, MLflow and the gate."""

    name: str
    kind: str  # "world", "templates" or "probes"
    source: str  # "built-in", a suite file, "request" (inline) or "JSON text" (e.g. as recorded on a model version)
    probes: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    note: str = ""  # why the suite has no probe, when it has none
    reference: str = ""  # names the same suite again: a built-in name or the suite as JSON (for the guard)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.kind}" + (f"; {self.note}" if self.note else "") + ")"

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "probes": list(self.probes),
                "templates": list(self.templates), "note": self.note}


def check_suite_reference(value: str) -> str:
    """A suite named by a string: a built-in name, a ``.json`` suite file or a suite's JSON text."""
    value = value.strip()
    if value in BUILTIN_SUITES or value.startswith("{"):
        return value
    if "://" in value:
        raise ValueError("a held-out suite file must be a local path — copy it next to the pipeline, e.g. \"suites/heldout.json\"")
    if not value.endswith(".json"):
        raise ValueError(f'"{value}" is neither a built-in suite ({", ".join(BUILTIN_SUITES)}) nor a .json suite file '
                         '— use "auto" or a path such as "suites/heldout.json"')
    return value


def load_heldout_suite(ref: str | HeldoutSuite | None, where: str = "heldout_suite") -> tuple[str | HeldoutSuite, str]:
    """Resolve a suite reference to a built-in name or a validated :class:`HeldoutSuite` (its
    ``manifest`` made absolute and checked), and say where it came from.

    Args:
        ref: a built-in name, a ``.json`` path, a suite's JSON text, a :class:`HeldoutSuite`, or None ("auto").
        where: how messages name the setting (``heldout_suite``, ``ERASURE_HELDOUT_SUITE``).

    Raises:
        HeldoutSuiteError: unknown name, missing or malformed file, invalid fields (one line per
            problem, each naming the field and the fix), missing probe manifest.
    """
    if ref is None:
        return "auto", "built-in"
    base, source = Path.cwd(), "request"
    if isinstance(ref, str):
        try:
            ref = check_suite_reference(ref)
        except ValueError as exc:
            raise HeldoutSuiteError(f"{where}: {exc}") from None
        if ref in BUILTIN_SUITES:
            return ref, "built-in"
        if ref.startswith("{"):
            text, source = ref, "JSON text"
        else:
            path = Path(ref)
            if not path.is_file():
                raise HeldoutSuiteError(f"{where}: no suite file at {path} — give the path of a suite .json or one of: "
                                        f"{', '.join(BUILTIN_SUITES)}")
            text, base, source, where = path.read_text(), path.parent.resolve(), str(path), f"{where} {path}"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HeldoutSuiteError(f"{where}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                                    "— fix the syntax there") from None
        try:
            ref = HeldoutSuite.model_validate(data)
        except ValidationError as exc:
            raise HeldoutSuiteError("\n".join(f"{where}: {_describe(error)}" for error in exc.errors(include_url=False))) from None
    if ref.manifest:
        manifest = Path(ref.manifest).expanduser()
        manifest = manifest if manifest.is_absolute() else base / manifest
        if not manifest.is_file():
            raise HeldoutSuiteError(f"{where}: manifest: no file at {manifest} — give the probe images' manifest "
                                    "(relative to the suite file) or leave it out to probe the evaluation images")
        ref = ref.model_copy(update={"manifest": str(manifest.resolve())})
    return ref, source


_EXAMPLES = {"name": '"my-heldout-suite"', "templates": '["a sketch of a {}."]'}


def _describe(error: dict) -> str:
    """``probes[0].templates[1]: <problem> — <fix>`` for one pydantic error of a suite."""
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".") or "suite"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        field = error["loc"][-1]
        return f"{loc}: required — add " + (f'"{field}": {_EXAMPLES[field]}' if field in _EXAMPLES else f'"{field}"')
    if error["type"] == "extra_forbidden":
        model = ProbeSpec if error["loc"][:1] == ("probes",) else HeldoutSuite
        return f"{loc}: unknown field — allowed: {', '.join(model.model_fields)}"
    if not error["loc"]:  # the suite's own checks name their fields first
        return message if error["type"] == "value_error" else f'{message} — write the suite as {{"name": ..., "templates": [...]}}'
    got = error.get("input")
    return f"{loc}: {message}" + ("" if isinstance(got, (dict, list)) else f" (got {json.dumps(got, default=str)})")


def _normalised(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .!?")


def template_seen_in(template: str, texts: Iterable[str]) -> str | None:
    """The first of ``texts`` that ``template`` could have produced (case, spacing and final
    punctuation ignored; ``{}`` stands for any words), or None: is this phrasing really unseen?"""
    prefix, suffix = (re.escape(part) for part in _normalised(template).split("{}"))
    pattern = re.compile(f"^{prefix}.+{suffix}$")
    return next((text for text in texts if pattern.match(_normalised(text))), None)
