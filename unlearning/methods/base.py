"""The one interface every unlearning method implements, and the registry that finds them by name.

A method is a function

    run(model, tokenizer, target, data, config, original=None, progress=None) -> MethodResult

that changes ``model`` in place (and returns it). ``original`` is a frozen copy of the model the
erasure starts from (the current champion, which already carries earlier erasures): methods use it
for distillation, consistency and souping. ``progress`` is called with each history row so callers
can stream metrics (to MLflow, a progress bar, ...).

Conventions all methods follow:
- The model stays in ``eval()`` mode while unlearning: forget-only batches would otherwise skew
  BatchNorm running statistics (measured: GA retain 57 % -> 31 % in train mode).
- Images arrive as uint8 tensors; :func:`unlearning.metrics.prepare_images` normalises them.
- Class-like targets (class, subgroup) are one entry of ``data.classnames``; association targets
  are the forget image-text pairs themselves.
- Joint data (several targets of one :func:`joint_key`, ``data.forget_targets``) goes only to a
  method whose ``joint_kinds`` has their kind; ``target`` is then the first of them, and every index
  of ``data.forget_indices`` (each forget image's label) is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from unlearning.precision import Precision, autocast, resolve_precision
from unlearning.target import ForgetTarget, TargetKind  # noqa: F401  (re-exported)

@dataclass
class LabelledImages:
    """Images (uint8 ``N x 3 x H x W``) with a caption each and a class index into ``classnames``
    (-1 where an image has no class in the task)."""

    images: torch.Tensor
    texts: list[str]
    labels: torch.Tensor

    def __post_init__(self):
        if not (len(self.images) == len(self.texts) == len(self.labels)):
            raise ValueError(f"images ({len(self.images)}), texts ({len(self.texts)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor | Sequence[int]) -> "LabelledImages":
        index = torch.as_tensor(index, dtype=torch.long)
        return LabelledImages(self.images[index], [self.texts[i] for i in index.tolist()], self.labels[index])


@dataclass
class UnlearningData:
    """What a method may use. Which parts are required depends on the method (see ``Method``).

    Attributes:
        classnames: the zero-shot classes the target lives among (all shapes; or all colour x shape
            subgroups for a subgroup target).
        forget_index: index of the target in ``classnames`` (None for associations, and for joint
            data where some target is not among ``classnames``).
        forget: real forget images (None: the method synthesises, e.g. Kravets).
        retain: retain images (other classes, sibling subgroups, or non-forget pairs).
        forget_val / retain_val: held-out images for stopping rules and calibration (α search).
        templates: *training* prompt templates; evaluation prompts are kept out of the loss.
        forget_indices: every forgotten class index (``[forget_index]`` for one target, filled in
            from it); the first is ``forget_index``.
        forget_targets: every target the data forgets, for joint data; empty: the run's target alone.
    """

    classnames: list[str]
    forget_index: int | None = None
    forget: LabelledImages | None = None
    retain: LabelledImages | None = None
    forget_val: LabelledImages | None = None
    retain_val: LabelledImages | None = None
    templates: list[str] = field(default_factory=lambda: ["a picture of a {}."])
    forget_indices: list[int] = field(default_factory=list)
    forget_targets: list[ForgetTarget] = field(default_factory=list)

    def __post_init__(self):
        if not self.forget_indices and self.forget_index is not None:
            self.forget_indices = [self.forget_index]
        if self.forget_index is not None and self.forget_indices[0] != self.forget_index:
            raise ValueError(f"forget_indices {self.forget_indices} must start with forget_index {self.forget_index}")


class MethodConfig(BaseModel):
    """Fields every method shares. Subclasses add their own hyperparameters with the paper's values."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    lr: float = 1e-5
    max_steps: int = 200
    batch_size: int = 64
    stop_forget_accuracy: float = 0.0  # stop once forget accuracy on the stop set is at or below this
    eval_every: int = 1

    def for_kind(self, name: str, kind: str):
        """Field ``name``, or its ``subgroup_<name>`` override for a subgroup target where the method has one."""
        if kind == "subgroup" and f"subgroup_{name}" in type(self).model_fields:
            return getattr(self, f"subgroup_{name}")
        return getattr(self, name)

    def data_needs(self) -> tuple[str, ...]:
        """:class:`UnlearningData` fields this configuration needs beyond its method's (e.g. a stop set)."""
        return ()


@dataclass
class MethodResult:
    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # e.g. {"synthetic_images": uint8 tensor}


ProgressFn = Callable[[dict], None]


class MethodFn(Protocol):
    def __call__(self, model: torch.nn.Module, tokenizer, target: ForgetTarget, data: UnlearningData, config: MethodConfig,
                 original: torch.nn.Module | None = None, progress: ProgressFn | None = None) -> MethodResult: ...


@dataclass(frozen=True)
class Method:
    name: str
    run: MethodFn
    config_cls: type[MethodConfig]
    target_kinds: frozenset[str]
    needs_forget_data: bool
    needs_retain_data: bool
    needs_original: bool
    paper: str = ""
    joint_kinds: frozenset[str] = frozenset()  # target kinds it can forget several of in one run


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig], *, target_kinds: Sequence[str], needs_forget_data: bool,
             needs_retain_data: bool, needs_original: bool, paper: str = "", joint_kinds: Sequence[str] = ()):
    """Decorator: make a method findable by ``name``; ``joint_kinds``: the target kinds it can
    forget several of in one run (see :func:`supports_joint`)."""

    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, config_cls, frozenset(target_kinds), needs_forget_data, needs_retain_data, needs_original, paper,
                               frozenset(joint_kinds))
        return fn

    return wrap


def get_method(name: str) -> Method:
    import unlearning.methods  # noqa: F401  (importing the package registers every method)

    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def joint_key(target: ForgetTarget) -> str:
    """Targets with the same key can be forgotten in one update: they share a class set
    (``"class"``; ``"subgroup:<attribute>"``) or are all image-text pairs (``"association"``)."""
    return f"subgroup:{target.attribute}" if target.kind == "subgroup" else target.kind


def distinct_targets(targets: Sequence[ForgetTarget]) -> list[ForgetTarget]:
    """``targets`` without repeats, in order (a batch may name a class twice)."""
    unique: list[ForgetTarget] = []
    for target in targets:
        if target not in unique:
            unique.append(target)
    return unique


def supports_joint(method_name: str, targets: Sequence[ForgetTarget]) -> bool:
    """Can method ``method_name`` forget all of ``targets`` in one run? One distinct target: if it
    handles its kind; several: if they share a :func:`joint_key` and their kind is a joint kind of the method."""
    method = get_method(method_name)
    unique = distinct_targets(targets)
    if len(unique) <= 1:
        return all(t.kind in method.target_kinds for t in unique)
    return len({joint_key(t) for t in unique}) == 1 and unique[0].kind in method.joint_kinds & method.target_kinds


def unmet_needs(name: str, target: ForgetTarget, data: UnlearningData, config: MethodConfig | None = None) -> list[str]:
    """What method ``name`` would need to run on ``target`` with ``data`` (and ``config``) but lacks.

    Returns:
        Empty when it can run; else any of ``"target_kind"`` (the method does not handle this kind
        of target) and the missing :class:`UnlearningData` fields: ``"forget_index"`` (a class or
        subgroup target outside ``data.classnames``; for joint data: any of its targets),
        ``"joint"`` (joint data, and the method cannot forget these targets in one run),
        ``"forget"`` (for joint class-like data also: some forgotten index has no forget image),
        ``"retain"``, or one that ``config.data_needs()`` names (e.g. ``"forget_val"``).
    """
    method = get_method(name)
    unmet = [] if target.kind in method.target_kinds else ["target_kind"]
    if target.kind != "association" and data.forget_index is None:
        unmet.append("forget_index")
    if len(data.forget_targets) > 1 and not supports_joint(name, data.forget_targets):
        unmet.append("joint")
    wanted = [*(["forget"] if method.needs_forget_data else []), *(["retain"] if method.needs_retain_data else []),
              *(config.data_needs() if config is not None else ())]
    missing = [need for need in dict.fromkeys(wanted) if not getattr(data, need)]
    if "forget" in wanted and "forget" not in missing and len(data.forget_indices) > 1:
        if set(data.forget_indices) - set(data.forget.labels.tolist()):  # a target of the batch with nothing to forget
            missing.insert(0, "forget")
    return unmet + missing


def run_method(name: str, model: torch.nn.Module, tokenizer, target: ForgetTarget, data: UnlearningData,
               config: MethodConfig | dict | None = None, original: torch.nn.Module | None = None,
               progress: ProgressFn | None = None, precision: Precision | None = None) -> MethodResult:
    """Look a method up, validate its inputs and config, and run it.

    ``precision``: the resolved dtype (``unlearning.precision``); default fp32, as methods were calibrated."""
    method = get_method(name)
    if not isinstance(config, method.config_cls):
        config = method.config_cls.model_validate(config or {})
    unmet = unmet_needs(name, target, data, config)
    if "target_kind" in unmet:
        raise ValueError(f"method {name!r} handles {sorted(method.target_kinds)} targets, not {target.kind!r}")
    if data.forget_targets and target != data.forget_targets[0]:
        raise ValueError(f"target {target.name!r} is not the first of data.forget_targets "
                         f"({', '.join(repr(t.name) for t in data.forget_targets)}): pass data.forget_targets[0]")
    if "joint" in unmet:
        fitting = sorted(m.name for m in METHODS.values() if supports_joint(m.name, data.forget_targets))
        raise ValueError(f"method {name!r} forgets one {target.kind} target per run, and the data names "
                         f"{len(data.forget_targets)} ({', '.join(repr(t.name) for t in data.forget_targets)}) — "
                         f"run them one after another, or use one of: {', '.join(fitting) or 'none'}")
    if unmet:
        raise ValueError(f"method {name!r} needs data.{', data.'.join(unmet)}, which the data given lacks")
    if method.needs_original and original is None:
        raise ValueError(f"method {name!r} needs the frozen original model")
    torch.manual_seed(config.seed)
    model.eval()
    with autocast(precision or resolve_precision("fp32"), next(model.parameters()).device):
        return method.run(model, tokenizer, target, data, config, original=original, progress=progress)
