"""Seconds the data & validation stage (``tasks.data.prepare_data``) spends per request, cold and warm.

Runs each case in a fresh process (as ``erasure run`` would), so only the on-disk caches under
``<home>/cache`` carry over, and times the stage itself (MLflow logging included, imports not):

- ``first``: class circle on a cold cache (the cache folder is emptied first);
- ``repeat``: the same request again;
- ``other-target``: class square, circle erased earlier;
- ``subgroup``: the red triangles, circle and square erased earlier;
- ``other-target-again``: ``other-target`` once more.

The reference data is ``<home>/world/manifest.jsonl``, the embedded world (generated when absent,
the demo's 60k-image spec), unless ``--manifest`` names another.

Machines shared with other work time noisily: ``--repeat N`` runs the whole sequence N times
(each from an empty cache) and reports each case's median and range.

    python -m infra.data_bench --home /tmp/cachebench [--repeat 3] [--profile DIR] [--keep-cache] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CIRCLE = {"kind": "class", "class_name": "circle"}
SQUARE = {"kind": "class", "class_name": "square"}
RED_TRIANGLES = {"kind": "subgroup", "class_name": "triangle", "attribute": "colour", "value": "red"}
CASES = {  # name: (target, earlier targets)
    "first": (CIRCLE, []),
    "repeat": (CIRCLE, []),
    "other-target": (SQUARE, [CIRCLE]),
    "subgroup": (RED_TRIANGLES, [CIRCLE, SQUARE]),
    "other-target-again": (SQUARE, [CIRCLE]),
}
IMAGE_SIZE = 32  # the embedded TinyCLIP-RN32's input size


def run_case(name: str, home: Path, manifest: Path, profile_dir: Path | None) -> dict:
    """Prepare one case's data in this process; its seconds and the cache outcomes."""
    os.environ.update({"ERASURE_HOME": str(home), "ERASURE_REFERENCE_MANIFEST": str(manifest)})
    for key in ("ERASURE_TRACKING_URI", "ERASURE_ARTIFACT_LOCATION", "MLFLOW_TRACKING_URI"):
        os.environ.pop(key, None)
    import mlflow
    from prefect.logging import disable_run_logger

    from tasks.data import prepare_data
    from tasks.registry import configure_mlflow
    from tasks.request import ErasureRequest
    from tasks.settings import get_settings
    from unlearning.methods.base import ForgetTarget

    settings = get_settings()
    configure_mlflow(settings)
    target, earlier = CASES[name]
    request = ErasureRequest(request_id=f"data-bench-{name}", requester="bench@clip-erasure", target=target)
    erased = [ForgetTarget(**t) for t in earlier]
    profiler = None
    if profile_dir is not None:
        import cProfile

        profiler = cProfile.Profile()
    with disable_run_logger(), mlflow.start_run(run_name=f"data-bench-{name}"):
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        data = prepare_data.fn(request, settings, IMAGE_SIZE, erased)
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - started
    if profiler:
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(profile_dir / f"{name}.prof"))
    return {"case": name, "seconds": round(seconds, 3), "cache": data.summary["cache"],
            "forget": data.summary["forget_images"], "retain": data.summary["retain_images"], "eval": data.summary["eval_images"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="ERASURE_HOME of the benchmark (its cache folder is emptied first)")
    parser.add_argument("--manifest", type=Path, help="reference manifest (default: <home>/world/manifest.jsonl, generated if absent)")
    parser.add_argument("--profile", type=Path, help="write a cProfile file per case into this folder")
    parser.add_argument("--keep-cache", action="store_true", help="do not empty <home>/cache first (the first case is then warm)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole sequence this many times (default 1)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in this process: the child's job
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    home = args.home.expanduser().resolve()
    manifest = (args.manifest or home / "world" / "manifest.jsonl").expanduser().resolve()

    if args.case:
        print(json.dumps(run_case(args.case, home, manifest, args.profile)))
        return 0

    if args.manifest is None and not manifest.exists():
        from unlearning.world import WorldSpec, generate_world

        print(f"generating the embedded world in {manifest.parent} ...", file=sys.stderr)
        generate_world(manifest.parent, WorldSpec(), progress=False)
    if not manifest.is_file():
        parser.error(f"--manifest {manifest} does not exist: give a reference manifest, or omit it to use the embedded world")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give 1 or more")
    runs = []
    for _ in range(args.repeat):
        if not args.keep_cache:
            shutil.rmtree(home / "cache", ignore_errors=True)
        rows = []
        for name in CASES:
            command = [sys.executable, "-m", "infra.data_bench", "--home", str(home), "--manifest", str(manifest), "--case", name]
            if args.profile:
                command += ["--profile", str(args.profile)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if done.returncode:
                print(done.stdout + done.stderr, file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        runs.append(rows)

    cpu = _cpu_name()
    print(f"data & validation per request ({manifest}, {os.cpu_count()} cores, {cpu}; median of {args.repeat})")
    print(f"{'case':<20} {'seconds':>8} {'range':>13}  {'images':<8} {'validation':<10} forget/retain/eval")
    table = []
    for i, name in enumerate(CASES):
        seconds = [rows[i]["seconds"] for rows in runs]
        row = {**runs[-1][i], "seconds": round(statistics.median(seconds), 3), "all_seconds": seconds}
        table.append(row)
        print(f"{name:<20} {row['seconds']:>8.2f} {min(seconds):>6.2f}-{max(seconds):<6.2f}  {row['cache']['images']:<8} "
              f"{row['cache']['validation']:<10} {row['forget']}/{row['retain']}/{row['eval']}")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "manifest": str(manifest), "repeat": args.repeat,
                                        "rows": table}, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
