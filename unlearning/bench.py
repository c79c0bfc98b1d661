"""Benchmark: every method on the same champion, the same data and the same budget.

Cases: (a) each class (shape) alone, (b) one attribute x class subgroup with its siblings
retained, (c) an association set (every caption naming one attribute value). Each run starts from
the same original; each is evaluated on the test split (hyperparameter defaults were chosen on
the val split). Writes ``bench.json`` (every run) and ``bench.md`` (mean ± spread over targets
and seeds), which ``erasure bench`` also plots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from unlearning.data import Record, read_manifest
from unlearning.depth import depth_measures
from unlearning.erasure import erase
from unlearning.erasure_data import build_unlearning_data
from unlearning.evaluation import EvalSet, evaluate
from unlearning.methods import get_method
from unlearning.methods.base import ForgetTarget
from unlearning.models import ClipBundle, load_model, pick_device
from unlearning.oracle import TrainingRecipe, read_recipe, train_oracle

PAPER_METHODS = ("lipschitz", "three_stage", "cliperase")
BASELINES = ("gradient_ascent", "graddiff", "finetune")


@dataclass(frozen=True)
class Case:
    kind: str
    target: ForgetTarget


def default_cases(records: Sequence[Record], classes: Sequence[str] | None = None, subgroup=("colour", "red", "circle"),
                  association_word: str = "red") -> list[Case]:
    """Each class, one subgroup and one association set (all captions containing ``association_word``)."""
    labels = sorted({r.label for r in records})
    cases = [Case("class", ForgetTarget(kind="class", class_name=c)) for c in (classes or labels)]
    attribute, value, label = subgroup
    cases.append(Case("subgroup", ForgetTarget(kind="subgroup", class_name=label, attribute=attribute, value=value)))
    captions = sorted({r.caption for r in records if association_word in r.caption.split()})
    cases.append(Case("association", ForgetTarget(kind="association", captions=captions)))
    return cases


def _headline(metrics: dict) -> dict:
    keep = ("forget_accuracy", "retain_accuracy", "sibling_accuracy", "heldout_accuracy", "heldout/colour", "heldout/size",
            "heldout/colour_shape", "forget_R@5", "retain_R@5", "mia_auc")
    return {k: metrics[k] for k in keep if k in metrics}


def run_one(model: str | ClipBundle, reference: Sequence[Record], eval_set: EvalSet, case: Case, method: str, seed: int,
            before: dict, relearn: bool = True, device: str | None = None, config: dict | None = None, depth: bool = False) -> dict:
    """One method on one case from the original weights; returns the benchmark row.

    Args:
        model: the original's folder, or the original itself (copied, left unchanged).
        config: overrides of the method's defaults (a hyperparameter sweep); the row records them.
        depth: add the depth measures (``unlearning.depth``) of the erased model as ``row["depth"]``.
    """
    model = model if isinstance(model, ClipBundle) else f"local-dir:{model}"
    outcome = erase(model, reference, case.target, method, seed=seed, config=config, eval_set=eval_set, device=device)
    row = {"kind": case.kind, "target": case.target.name, "method": method, "seed": seed, "seconds": round(outcome.seconds, 2),
           "steps": outcome.steps, "before": _headline(before), "after": _headline(outcome.after.metrics)}
    if config:
        row["config"] = config
    if relearn and case.kind != "association" and outcome.data.forget is not None:
        from unlearning.evidence import relearn_test

        attack = relearn_test(outcome.bundle.model, outcome.original, outcome.bundle.tokenizer, case.target, outcome.data, seed=seed)
        row["relearn"] = {"unlearned": attack.unlearned, "original": attack.original}
    if depth:
        row["depth"] = depth_measures(outcome.bundle.model, outcome.bundle.tokenizer, case.target, reference,
                                      image_size=outcome.bundle.image_size, seed=seed)
    return row


def reference_row(kind: str, bundle: ClipBundle, reference: Sequence[Record], eval_set: EvalSet, case: Case, seed: int,
                  before: dict, seconds: float = 0.0) -> dict:
    """A model that is not an erasure, as a benchmark row: the ``original`` itself or the retrain
    ``oracle`` (``kind``), evaluated and measured exactly like the methods' results."""
    members = build_unlearning_data(case.target, reference, bundle.image_size, seed=seed).forget  # what an erasure with this seed forgets
    after = evaluate(bundle.model, bundle.tokenizer, eval_set, [case.target], members=members).metrics
    return {"kind": case.kind, "target": case.target.name, "method": kind, "seed": seed, "seconds": round(seconds, 2), "steps": 0,
            "before": _headline(before), "after": _headline(after),
            "depth": depth_measures(bundle.model, bundle.tokenizer, case.target, reference, image_size=bundle.image_size, seed=seed)}


def harmonic(forget: float, retained: float) -> float:
    a = 1 - forget
    return 0.0 if a <= 0 or retained <= 0 else 2 * a * retained / (a + retained)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread (population std) per (kind, method) over targets and seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["method"]), []).append(row)
    # The oracle of each case and seed, for every row's distance to it on each depth measure.
    oracles = {(r["kind"], r["target"], r["seed"]): r.get("depth") or {} for r in rows if r["method"] == "oracle"}

    def stat(values):
        values = [v for v in values if v is not None and v == v]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    summary = []
    for (kind, method), group in sorted(groups.items()):
        retained_key = "sibling_accuracy" if kind == "subgroup" else "retain_accuracy"
        forget_key = "forget_accuracy"
        entry = {"kind": kind, "method": method,
                 "forget": stat([r["after"].get(forget_key) for r in group]),
                 "retain_drop": stat([r["before"].get("retain_accuracy", 0) - r["after"].get("retain_accuracy", 0) for r in group]),
                 "sibling_drop": stat([r["before"][retained_key] - r["after"][retained_key] for r in group if retained_key in r["after"]]) if kind == "subgroup" else None,
                 "heldout_drop": stat([r["before"].get("heldout_accuracy", 0) - r["after"].get("heldout_accuracy", 0) for r in group]),
                 "retain_R@5_drop": stat([r["before"].get("retain_R@5", 0) - r["after"].get("retain_R@5", 0) for r in group]),
                 "forget_R@5": stat([r["after"].get("forget_R@5") for r in group]),
                 "mia_auc": stat([r["after"].get("mia_auc") for r in group]),
                 "relearn": stat([_relearn_value(r, "unlearned") for r in group]),
                 "relearn_original": stat([_relearn_value(r, "original") for r in group]),
                 "harmonic": stat([harmonic(r["after"].get(forget_key, 1.0), r["after"].get(retained_key, 0.0)) for r in group]),
                 "seconds": stat([r["seconds"] for r in group]),
                 "steps": stat([r["steps"] for r in group])}
        for key in DEPTH_KEYS:
            entry[key] = stat([(r.get("depth") or {}).get(key) for r in group])
            entry[f"{key}:oracle_gap"] = stat([abs(r["depth"][key] - oracles[(r["kind"], r["target"], r["seed"])][key]) for r in group
                                               if key in (r.get("depth") or {}) and key in oracles.get((r["kind"], r["target"], r["seed"]), {})])
        summary.append(entry)
    return summary


DEPTH_KEYS = ("depth/relearn@0", "depth/relearn@5", "depth/relearn@10", "depth/relearn@20", "depth/probe", "depth/knn",
              "depth/mia_auc", "depth/paraphrase", "depth/forget_R@5")


def _relearn_value(row: dict, curve: str) -> float | None:
    """Forget-target accuracy at the end of the relearning attack (``unlearned`` or ``original`` curve)."""
    values = (row.get("relearn") or {}).get(curve)
    return float(values[-1]) if values else None


def markdown(summary: list[dict], meta: dict) -> str:
    def cell(stat, scale=100.0, digits=1):
        if not stat:
            return "–"
        return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"

    lines = [f"Model `{meta['model']}`, {meta['n_runs']} runs, seeds {meta['seeds']}, test split, on {meta.get('device', 'cpu')}. "
             "Accuracies in %, drops in points (before − after; negative = improved), mean ± spread over targets × seeds.", "",
             "| kind | method | forget acc | retain drop | sibling drop | held-out drop | forget R@5 | retain R@5 drop | MIA AUC | relearn acc (original) | harmonic | s | steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['kind']} | {e['method']} | {cell(e['forget'])} | {cell(e['retain_drop'])} | {cell(e['sibling_drop'])} | "
                     f"{cell(e['heldout_drop'])} | {cell(e['forget_R@5'])} | {cell(e['retain_R@5_drop'])} | {cell(e['mia_auc'], 1, 2)} | "
                     f"{cell(e['relearn'])} ({cell(e['relearn_original'])}) | {cell(e['harmonic'])} | {cell(e['seconds'], 1, 1)} | {cell(e['steps'], 1, 0)} |")
    if any(e.get("depth/mia_auc") for e in summary):
        lines += ["", "Depth of forgetting (protocols: docs/depth.md), in % (MIA AUC as a fraction); in brackets the mean distance "
                  "to the retrain oracle of the same target and seed, where one was measured.", "",
                  "| kind | model | relearn @0 / 5 / 10 / 20 | linear probe | kNN recall | MIA AUC | paraphrase acc | forget R@5 |",
                  "|---|---|---|---|---|---|---|---|"]
        order = {"original": 0, "oracle": 1}
        for e in sorted(summary, key=lambda e: (e["kind"], order.get(e["method"], 2), e["method"])):
            if not e.get("depth/mia_auc"):
                continue

            def depth_cell(key, scale=100.0, digits=1):
                value = cell(e.get(key), scale, digits)
                gap = e.get(f"{key}:oracle_gap")
                return f"{value} ({scale * gap['mean']:.{digits}f})" if gap and e["method"] != "oracle" else value

            relearn = " / ".join(f"{100 * e[k]['mean']:.0f}" if e.get(k) else "–" for k in DEPTH_KEYS[:4])
            gap = e.get("depth/relearn@10:oracle_gap")
            relearn += f" ({100 * gap['mean']:.0f} at 10)" if gap and e["method"] != "oracle" else ""
            lines.append(f"| {e['kind']} | {e['method']} | {relearn} | {depth_cell('depth/probe')} | {depth_cell('depth/knn')} | "
                         f"{depth_cell('depth/mia_auc', 1, 2)} | {depth_cell('depth/paraphrase')} | {depth_cell('depth/forget_R@5')} |")
    return "\n".join(lines) + "\n"


def _device_name(device: str | None) -> str:
    picked = pick_device(device)
    return torch.cuda.get_device_name(picked) if picked.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def write_report(out: Path, rows: list[dict], meta: dict) -> dict:
    """Summarise ``rows`` and write ``bench.json`` and ``bench.md`` into ``out``."""
    summary = summarise(rows)
    meta = {**meta, "n_runs": len(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    (out / "bench.md").write_text(markdown(summary, meta))
    return {"meta": meta, "summary": summary, "rows": rows}


def merge(parts: Sequence[Path], out: Path) -> dict:
    """Join the ``bench.json`` files of benchmark shards (e.g. one process per method) into one report."""
    rows, metas = [], []
    for part in parts:
        content = json.loads(Path(part).read_text())
        rows += content["rows"]
        metas.append(content.get("meta", {}))
    complete = [m for m in metas if m]  # a shard cut off early wrote its rows but no meta
    first = complete[0] if complete else {}
    meta = {"model": first.get("model", "?"), "seeds": sorted({r["seed"] for r in rows}), "device": first.get("device", "?"),
            "methods": sorted({r["method"] for r in rows}), "errors": [e for m in complete for e in m.get("errors", [])],
            "shards": len(parts), "complete_shards": len(complete)}
    return write_report(out, rows, meta)


def run_bench(model_dir: str, manifest: str, out: Path, methods: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1),
              classes: Sequence[str] | None = None, kinds: Sequence[str] = ("class", "subgroup", "association"),
              progress: bool = True, device: str | None = None, oracle_dir: Path | None = None, depth: bool | None = None,
              recipe: TrainingRecipe | None = None, variants: Sequence[dict] = ()) -> dict:
    """Run the benchmark and write ``bench.json`` and ``bench.md`` into ``out``.

    Args:
        device: where each run trains and is evaluated (default: CUDA when present, else CPU).
        oracle_dir: train (or reuse) the retrain oracle of every class and subgroup case there and
            add it, and the original, as rows of their own; implies ``depth``.
        depth: measure every result's depth of forgetting (default: with ``oracle_dir``).
        recipe: the original's training recipe (default: the one stored with it, else the bootstrap's).
        variants: more runs, each ``{"label", "method", "config"}``: the method with those overrides,
            reported as ``<method>+<label>`` (e.g. the settings tried for deeper forgetting).
    """
    from unlearning.bootstrap import world_eval_set

    out.mkdir(parents=True, exist_ok=True)
    reference = read_manifest(manifest)
    eval_set = world_eval_set(Path(manifest), "test")
    methods = list(methods or [*PAPER_METHODS, *BASELINES])
    original = load_model(f"local-dir:{model_dir}", device=str(pick_device(device)))
    depth = bool(oracle_dir) if depth is None else depth
    recipe = recipe or read_recipe(model_dir) or TrainingRecipe()
    rows, errors = [], []
    for case in [c for c in default_cases(reference, classes) if c.kind in kinds]:
        before = evaluate(original.model, original.tokenizer, eval_set, [case.target]).metrics
        for seed in seeds if depth else ():
            rows.append(reference_row("original", original, reference, eval_set, case, seed, before))
            if oracle_dir and case.kind != "association":  # an association's oracle would drop every image of its captions
                started = time.perf_counter()
                folder = train_oracle(manifest, [case.target], recipe, oracle_dir, device=device, progress=progress)
                made = json.loads((folder / "oracle.json").read_text()).get("seconds", time.perf_counter() - started)
                oracle = load_model(f"local-dir:{folder}", device=str(pick_device(device)))
                rows.append(reference_row("oracle", oracle, reference, eval_set, case, seed, before, seconds=made))
        runs = [(m, m, None) for m in methods] + [(f"{v['method']}+{v['label']}", v["method"], v.get("config") or {}) for v in variants]
        for name, method, config in runs:
            if case.kind not in get_method(method).target_kinds:
                continue
            for seed in seeds:
                try:
                    row = run_one(original, reference, eval_set, case, method, seed, before, device=device, depth=depth, config=config)
                except Exception as exc:  # one broken run must not lose the others; it is reported
                    errors.append({"kind": case.kind, "target": case.target.name, "method": name, "seed": seed, "error": repr(exc)})
                    print(f"[bench] {case.target.name} {name} seed {seed}: FAILED {exc!r}", flush=True)
                    continue
                row["method"] = name
                rows.append(row)
                if progress:
                    print(f"[bench] {case.kind:11s} {case.target.name[:28]:28s} {name:16s} seed {seed}: forget "
                          f"{100 * row['after'].get('forget_accuracy', float('nan')):5.1f} %  retain "
                          f"{100 * row['after'].get('retain_accuracy', float('nan')):5.1f} %  {row['seconds']:5.1f} s", flush=True)
                (out / "bench.json").write_text(json.dumps({"rows": rows}, indent=1))  # partial results survive a crash
    meta = {"model": model_dir, "seeds": list(seeds), "threads": torch.get_num_threads(), "methods": methods,
            "errors": errors, "device": _device_name(device)}
    return write_report(out, rows, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark every unlearning method")
    parser.add_argument("--model", required=True, help="open_clip model folder (the champion)")
    parser.add_argument("--manifest", required=True, help="the world's manifest (train/val/test)")
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--classes", nargs="*")
    parser.add_argument("--kinds", nargs="*", default=["class", "subgroup", "association"])
    parser.add_argument("--device", help="cuda, cpu, ... (default: CUDA when present)")
    parser.add_argument("--oracle", metavar="DIR", type=Path, help="retrain oracles here (cached) and report every method against them")
    parser.add_argument("--depth", action="store_true", help="measure the depth of forgetting of every result (implied by --oracle)")
    parser.add_argument("--variants", type=Path, help='JSON list of {"label", "method", "config"}: more runs with config overrides')
    args = parser.parse_args(argv)
    variants = json.loads(args.variants.read_text()) if args.variants else ()
    run_bench(args.model, args.manifest, Path(args.out), args.methods, args.seeds, args.classes, args.kinds, device=args.device,
              oracle_dir=args.oracle, depth=args.depth or None, variants=variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
