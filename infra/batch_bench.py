"""Batches against single requests, and drift over sequential erasures, on the embedded champion.

Each scenario gets a fresh store (its own ERASURE_HOME) whose champion v1 is the given model
folder, with the given world as reference data, and runs the batch flow as `erasure batch` does:

- ``batch-<kind>-<n>``: n requests filed together, erased by one batch run (default gates);
- ``sequential-<n>``: n requests, one batch run each, every one from the champion the last left;
  after each, retain accuracy against the first champion and every earlier target's forget accuracy.

    python -m infra.batch_bench --model .erasure/bench-champion --manifest .erasure/world/manifest.jsonl \\
        --batches class:1 class:2 class:5 subgroup:1 subgroup:10 --sequential 10 --out docs/results/batch-bench.json

The embedded world has 8 shapes; ``--world DIR --extra-shapes diamond pentagon ring bar`` generates
a 12-shape world there and bootstraps its champion (the embedded recipe, cached in DIR/champion),
so that 10 class requests still leave classes to keep:

    python -m infra.batch_bench --world .erasure/world12 --extra-shapes diamond pentagon ring bar \\
        --batches class:1 class:10 --sequential 0 --out docs/results/batch-bench-class10.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from unlearning.world import COLOURS, EXTRA_SHAPES, SHAPES, WorldSpec


def target(kind: str, n: int, shapes: tuple[str, ...] = SHAPES) -> dict:
    if kind == "class":
        return {"kind": "class", "class_name": shapes[n % len(shapes)]}
    subgroups = [(colour, shapes[i % len(shapes)]) for i, colour in enumerate([c for c in COLOURS for _ in range(2)])]
    colour, shape = subgroups[n % len(subgroups)]
    return {"kind": "subgroup", "class_name": shape, "attribute": "colour", "value": colour}


def requests(kind: str, n: int, tag: str, method: str, shapes: tuple[str, ...] = SHAPES) -> list[dict]:
    if kind == "class" and n >= len(shapes):
        raise SystemExit(f"--batches class:{n}: the world has {len(shapes)} shapes, so nothing would be kept — "
                         f"use --world DIR --extra-shapes {' '.join(EXTRA_SHAPES)}")
    return [{"request_id": f"{tag}-{i:02d}", "requester": "bench@clip-erasure", "target": target(kind, i, shapes), "method": method}
            for i in range(n)]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bootstrap_world(world: Path, extra_shapes: list[str]) -> tuple[Path, Path]:
    """The world in ``world`` and its champion (embedded recipe, precision by the hardware), built once."""
    from unlearning.bootstrap import bootstrap_world_model
    from unlearning.models import save_model
    from unlearning.train import TrainConfig

    champion = world / "champion"
    spec = WorldSpec(extra_shapes=tuple(extra_shapes))
    if not (champion / "open_clip_model.safetensors").exists():
        started = time.perf_counter()
        result = bootstrap_world_model(world, spec, config=TrainConfig(precision="auto"))
        save_model(result.bundle, champion)
        (world / "champion-bootstrap.json").write_text(json.dumps({
            "seconds": {**result.seconds, "total": time.perf_counter() - started},
            "test_accuracy": result.evaluation.metrics.get("retain_accuracy"),
            "cpu": cpu_name()}, indent=2))
    return champion, world / "manifest.jsonl"


def fresh_store(model: Path, manifest: Path, home: Path):
    """Point the pipeline at a new store whose champion v1 is ``model``."""
    os.environ.update({"ERASURE_HOME": str(home), "ERASURE_REFERENCE_MANIFEST": str(manifest), "ERASURE_LOCKS": "file"})
    for key in ("ERASURE_TRACKING_URI", "ERASURE_ARTIFACT_LOCATION", "MLFLOW_TRACKING_URI"):
        os.environ.pop(key, None)
    from tasks import registry
    from tasks.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    registry.configure_mlflow(settings)
    version = registry.register_model_folder(model, settings, tags={"erasure.targets": "[]", "erasure.request_ids": "[]"})
    registry.set_alias(settings.model_name, "champion", version.version)
    return settings


def summarise(report) -> dict:
    return {"wall_s": report.wall_s, "champion": [report.champion_before, report.champion_after],
            "outcomes": {o.request_id: o.status for o in report.requests},
            "updates": [{"requests": u.request_ids, "decision": u.decision, "method": u.method, "unlearn_s": u.timings.unlearn_s,
                         "evaluate_s": u.timings.evaluate_s, "data_s": u.timings.data_and_validation_s,
                         "forget_accuracy": {k.split("/", 1)[1]: v for k, v in u.after.items() if k.startswith("forget_accuracy/")},
                         "gates": {g.name: [g.value, g.passed] for g in u.gates}, "retain_before": u.before.get("retain_accuracy"),
                         "retain_after": u.after.get("retain_accuracy"), "heldout_before": u.before.get("heldout_accuracy"),
                         "heldout_after": u.after.get("heldout_accuracy")} for u in report.updates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="open_clip model folder of the first champion")
    parser.add_argument("--manifest", type=Path, help="reference manifest (the world's)")
    parser.add_argument("--world", type=Path, help="instead of --model/--manifest: generate a world here and bootstrap its champion")
    parser.add_argument("--extra-shapes", nargs="*", default=[], help=f"with --world: shapes beyond the 8 ({' '.join(EXTRA_SHAPES)})")
    parser.add_argument("--batches", nargs="*", default=["class:1", "class:2", "class:5", "subgroup:1", "subgroup:10"])
    parser.add_argument("--sequential", type=int, default=10, help="requests erased one batch run each (0: skip)")
    parser.add_argument("--sequential-kind", default="subgroup")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--keep-store", type=Path, help="keep the sequential scenario's store here (a new folder), to rerun a step from it")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.world:
        args.model, args.manifest = bootstrap_world(args.world, args.extra_shapes)
    elif not (args.model and args.manifest):
        parser.error("give --model and --manifest, or --world (to generate a world and bootstrap its champion)")
    shapes = WorldSpec(extra_shapes=tuple(args.extra_shapes)).shapes

    from flows.batch import batch_flow

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["meta"] = {"cpu": cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS"),
                       "model": str(args.model), "method": args.method}
    for spec in args.batches:
        kind, n = spec.split(":")
        with tempfile.TemporaryDirectory(prefix="batch-bench-") as home:
            fresh_store(args.model, args.manifest, Path(home))
            started = time.perf_counter()
            report = batch_flow(submit=requests(kind, int(n), f"{kind}{n}", args.method, shapes))
            results[f"batch-{kind}-{n}"] = {**summarise(report), "measured_s": time.perf_counter() - started}
        args.out.write_text(json.dumps(results, indent=2))
        print(spec, json.dumps(results[f"batch-{kind}-{n}"]["updates"][-1:], default=str)[:600], flush=True)
    if args.sequential:
        if args.keep_store and args.keep_store.exists():
            raise SystemExit(f"--keep-store {args.keep_store}: exists — name a new folder")
        with (nullcontext(str(args.keep_store)) if args.keep_store else tempfile.TemporaryDirectory(prefix="batch-bench-seq-")) as home:
            fresh_store(args.model, args.manifest, Path(home).resolve())
            rows = []
            for i, body in enumerate(requests(args.sequential_kind, args.sequential, "seq", args.method, shapes)):
                started = time.perf_counter()
                report = batch_flow(submit=[body])
                rows.append({"step": i + 1, **summarise(report), "measured_s": time.perf_counter() - started})
                results[f"sequential-{args.sequential_kind}-{args.sequential}"] = rows
                args.out.write_text(json.dumps(results, indent=2))
                print("sequential", i + 1, json.dumps(rows[-1]["outcomes"]), flush=True)


if __name__ == "__main__":
    main()
