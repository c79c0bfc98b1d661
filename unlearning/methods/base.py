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
        forget_index: index of the target in ``classnames`` (None for associations).
        forget: real forget images (None: the method synthesises, e.g. Kravets).
        retain: retain images (other classes, sibling subgroups, or non-forget pairs).
        forget_val / retain_val: held-out images for stopping rules and calibration (α search).
        templates: *training* prompt templates; evaluation prompts are kept out of the loss.
    """

    classnames: list[str]
    forget_index: int | None = None
    forget: LabelledImages | None = None
    retain: LabelledImages | None = None
    forget_val: LabelledImages | None = None
    retain_val: LabelledImages | None = None
    templates: list[str] = field(default_factory=lambda: ["a picture of a {}."])


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


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig], *, target_kinds: Sequence[str], needs_forget_data: bool,
             needs_retain_data: bool, needs_original: bool, paper: str = ""):
    """Decorator: make a method findable by ``name``."""

    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, config_cls, frozenset(target_kinds), needs_forget_data, needs_retain_data, needs_original, paper)
        return fn

    return wrap


def get_method(name: str) -> Method:
    import unlearning.methods  # noqa: F401  (importing the package registers every method)

    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def unmet_needs(name: str, target: ForgetTarget, data: UnlearningData, config: MethodConfig | None = None) -> list[str]:
    """What method ``name`` would need to run on ``target`` with ``data`` (and ``config``) but lacks.

    Returns:
        Empty when it can run; else any of ``"target_kind"`` (the method does not handle this kind
        of target) and the missing :class:`UnlearningData` fields: ``"forget_index"`` (a class or
        subgroup target outside ``data.classnames``), ``"forget"``, ``"retain"``, or one that
        ``config.data_needs()`` names (e.g. ``"forget_val"``).
    """
    method = get_method(name)
    unmet = [] if target.kind in method.target_kinds else ["target_kind"]
    if target.kind != "association" and data.forget_index is None:
        unmet.append("forget_index")
    wanted = [*(["forget"] if method.needs_forget_data else []), *(["retain"] if method.needs_retain_data else []),
              *(config.data_needs() if config is not None else ())]
    return unmet + [need for need in dict.fromkeys(wanted) if not getattr(data, need)]


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
    if unmet:
        raise ValueError(f"method {name!r} needs data.{', data.'.join(unmet)}, which the data given lacks")
    if method.needs_original and original is None:
        raise ValueError(f"method {name!r} needs the frozen original model")
    torch.manual_seed(config.seed)
    model.eval()
    with autocast(precision or resolve_precision("fp32"), next(model.parameters()).device):
        return method.run(model, tokenizer, target, data, config, original=original, progress=progress)
