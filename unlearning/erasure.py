"""One erasure: run one method on one target from a start model, time it and evaluate the result.

Two layers, both free of Prefect and MLflow:

- :func:`unlearn_and_evaluate`: the start model and the data are in hand (the flow's task, a batch
  step); it copies the start, runs the method and evaluates the copy.
- :func:`erase`: from a model reference and the reference data (a manifest or its records); it
  loads the model, builds the :class:`UnlearningData` and calls :func:`unlearn_and_evaluate` (the
  benchmark, the GPU sweep and the soup-curve script).

The :class:`ErasureOutcome` keeps what further measures need (the frozen original, the data, the
tokenizer on the bundle, the evaluation set), so a caller computes relearning, probes or an oracle
comparison after the call, on the same objects.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from pydantic import ValidationError

from unlearning.data import Record, read_manifest
from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet, Evaluation, build_eval_set, evaluate
from unlearning.methods import ForgetTarget, LabelledImages, MethodConfig, MethodResult, UnlearningData, get_method, run_method
from unlearning.methods.base import ProgressFn
from unlearning.models import ClipBundle, load_model, pick_device
from unlearning.precision import Precision


@dataclass
class ErasureOutcome:
    """One method run on one target, and its evaluation.

    Attributes:
        bundle: the unlearned model (a copy: the start model is left as it was).
        result: what the method returned (history, summary, artifacts).
        after: the evaluation of ``bundle`` on ``eval_set`` (None when not evaluated).
        seconds: wall time of the method alone.
        evaluate_seconds: wall time of the evaluation (0 when not evaluated).
        original: the frozen reference model the method used (distillation, souping), for
            measures that compare against it (e.g. the relearning attack).
        data: the data the method ran on.
    """

    method: str
    target: ForgetTarget
    config: MethodConfig
    bundle: ClipBundle
    result: MethodResult
    after: Evaluation | None
    seconds: float
    evaluate_seconds: float
    original: torch.nn.Module
    data: UnlearningData
    eval_set: EvalSet | None = None

    @property
    def steps(self) -> int:
        return self.result.summary.get("steps", len(self.result.history))


def method_config(method: str, config: MethodConfig | dict | None) -> MethodConfig:
    """``config`` validated against ``method``'s settings.

    Raises:
        KeyError: no method of that name (the message lists them).
        ValueError: a key the method does not have, or a value of the wrong kind, named.
    """
    spec = get_method(method)
    if isinstance(config, spec.config_cls):
        return config
    if isinstance(config, MethodConfig):
        raise ValueError(f"config: a {type(config).__name__} was given for method {method!r}, which takes a "
                         f"{spec.config_cls.__name__} (or a dict of its settings)")
    try:
        return spec.config_cls.model_validate(config or {})
    except ValidationError as exc:
        problems = "; ".join(f"config.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        settings = ", ".join(sorted(spec.config_cls.model_fields))
        raise ValueError(f"method {method!r}: {problems} (its settings: {settings})") from exc


def unlearn_and_evaluate(method: str, start: ClipBundle, target: ForgetTarget, data: UnlearningData, eval_set: EvalSet | None, *,
                         all_targets: Sequence[ForgetTarget] | None = None, original: torch.nn.Module | None = None,
                         config: MethodConfig | dict | None = None, members: LabelledImages | None = None,
                         precision: Precision | None = None, progress: ProgressFn | None = None,
                         evaluate_after: bool = True) -> ErasureOutcome:
    """Run ``method`` on a copy of ``start``, then evaluate the copy.

    Args:
        start: the model to unlearn from; it is not changed.
        original: the frozen reference the method may use; default a frozen copy of ``start``.
        all_targets: every target the result must have forgotten (earlier erasures included);
            default ``[target]``.
        members: the forget images trained on, for the membership-inference AUC (None: skipped).
        evaluate_after: False skips the evaluation (``after`` is None), e.g. a batch's middle step.

    Raises:
        KeyError / ValueError: an unknown method or a bad config, before anything runs.
    """
    settings = method_config(method, config)
    if evaluate_after and eval_set is None:
        raise ValueError("eval_set: needed to evaluate the result — pass one, or evaluate_after=False")
    if original is None:
        original = start.copy().model.requires_grad_(False)
    candidate = start.copy()
    candidate.model.requires_grad_(True)  # a copy of a frozen model would stay frozen
    started = time.perf_counter()
    result = run_method(method, candidate.model, candidate.tokenizer, target, data, settings, original=original,
                        progress=progress, precision=precision)
    seconds = time.perf_counter() - started
    candidate.model = result.model
    after, evaluate_seconds = None, 0.0
    if evaluate_after:
        evaluated = time.perf_counter()
        after = evaluate(candidate.model, candidate.tokenizer, eval_set, list(all_targets or [target]), members=members)
        evaluate_seconds = time.perf_counter() - evaluated
    return ErasureOutcome(method, target, settings, candidate, result, after, seconds, evaluate_seconds, original, data, eval_set)


def erase(model: str | ClipBundle, reference: str | os.PathLike | Sequence[Record], target: ForgetTarget, method: str, *,
          seed: int = 0, config: dict | None = None, eval_set: EvalSet | None = None, device: str | None = None,
          data: UnlearningData | None = None, progress: ProgressFn | None = None, evaluate_after: bool = True) -> ErasureOutcome:
    """Erase ``target`` from ``model`` with ``method`` and evaluate the result.

    Args:
        model: a model reference for :func:`unlearning.models.load_model` (``local-dir:/path``, a
            name), or a loaded bundle, which is copied and left unchanged.
        reference: the reference data: a manifest path, or its records (splits train / val / test).
        seed: the method's seed and the one that draws the forget / retain pools.
        config: overrides of the method's defaults (``seed`` may be left out: ``seed`` sets it).
        eval_set: where the result is scored; default the reference's test split (for a manifest,
            with the shapes world's held-out probes).
        device: where a model loaded from a reference goes (default CUDA when present); a bundle
            given stays where it is.
        data: the method's data when the caller built (or altered) it; default built from
            ``reference`` for ``target`` with :func:`build_unlearning_data`.

    Returns:
        The outcome, evaluated with the forget images as the membership-inference members.

    Raises:
        KeyError / ValueError: an unknown method, a bad config, or a target kind the method does not
            handle, before the model or any data is loaded.
    """
    config = dict(config or {})
    if config.get("seed", seed) != seed:
        raise ValueError(f"config.seed ({config['seed']}) differs from seed ({seed}): give the seed once")
    settings = method_config(method, {**config, "seed": seed})
    spec = get_method(method)
    if target.kind not in spec.target_kinds:
        raise ValueError(f"method {method!r} handles {sorted(spec.target_kinds)} targets, not {target.kind!r}")

    bundle = model if isinstance(model, ClipBundle) else load_model(model, device=str(pick_device(device)))
    manifest = Path(reference) if isinstance(reference, (str, os.PathLike)) else None
    records = read_manifest(manifest) if manifest is not None else list(reference)
    if data is None:
        data = build_unlearning_data(target, records, bundle.image_size, seed=seed)
    if eval_set is None and evaluate_after:
        eval_set = _default_eval_set(manifest, records, bundle.image_size)
    return unlearn_and_evaluate(method, bundle, target, data, eval_set, config=settings, members=data.forget, progress=progress,
                                evaluate_after=evaluate_after)


def _default_eval_set(manifest: Path | None, records: Sequence[Record], image_size: int) -> EvalSet:
    """The reference's test split: the world's probes for a manifest, else the held-out suite ``auto`` picks."""
    if manifest is not None:
        from unlearning.bootstrap import world_eval_set  # bootstrap imports the trainer: only when needed

        return world_eval_set(manifest, "test", image_size)
    test = [r for r in records if r.split == "test"]
    if not test:
        raise ValueError("eval_set: the reference records have no test split to evaluate on — pass an eval_set")
    return build_eval_set(test, image_size, seen_texts=[r.caption for r in records])
