"""The method benchmark on a CUDA machine, sharded into parallel processes, within a time limit.

The tiny CLIP leaves a GPU mostly idle (its steps are launch-bound), so one process per
(method, case group) shares the GPU well. Each shard writes ``bench.json`` after every run, so a
shard cut off at the time limit still contributes what it finished. The shards are merged into one
``bench.json`` / ``bench.md``.

    python infra/gpu_bench.py --model CHAMPION_DIR --out OUT [--seconds 420] [--world /tmp/world]

Uses only the ``unlearning`` library (torch + open_clip): no Prefect, MLflow or S3 on the GPU box.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unlearning.bench import BASELINES, PAPER_METHODS, merge  # noqa: E402
from unlearning.world import WorldSpec, generate_world  # noqa: E402

# Shard name -> the case arguments of its `python -m unlearning.bench` process.
GROUPS = {"classes": ["--kinds", "class"], "others": ["--kinds", "subgroup", "association"]}


def smoke(model_dir: str, manifest: Path, device: str, methods) -> bool:
    """Two steps of every method on ``device``: a device bug shows here in seconds, not after the budget."""
    from unlearning.data import read_manifest
    from unlearning.erasure import erase
    from unlearning.erasure_data import build_unlearning_data
    from unlearning.methods import ForgetTarget
    from unlearning.models import load_model

    reference = read_manifest(manifest)
    bundle = load_model(f"local-dir:{model_dir}", device=device)  # erase() copies it: every run starts from these weights
    ok = True
    for method in methods:
        for target in (ForgetTarget(kind="class", class_name="circle"),
                       ForgetTarget(kind="subgroup", class_name="circle", attribute="colour", value="red")):
            config = {"max_steps": 2}
            if method == "lipschitz":
                config.update(n_stop_images=4, synthesis={"n_images": 8, "min_steps": 4, "max_steps": 6})
            if method == "three_stage":
                config.update(remind_steps=2, align_steps=2, align_pool=32)
            try:
                data = build_unlearning_data(target, reference, bundle.image_size, max_retain=256)
                erase(bundle, reference, target, method, config=config, data=data, evaluate_after=False)
                print(f"[smoke] {method:16s} {target.name:12s} ok on {device}", flush=True)
            except Exception:
                ok = False
                print(f"[smoke] {method:16s} {target.name:12s} FAILED on {device}\n{traceback.format_exc()}", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--world", type=Path, default=Path("/tmp/world"))
    parser.add_argument("--n-train", type=int, default=20000, help="train images to generate (forget/retain pools)")
    parser.add_argument("--seconds", type=float, default=420, help="time limit for the benchmark shards")
    parser.add_argument("--seeds", nargs="*", default=["0", "1"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="*", default=[*PAPER_METHODS, *BASELINES])
    parser.add_argument("--per-class", action="store_true", help="one shard per class instead of one for all classes")
    args = parser.parse_args()

    started = time.perf_counter()
    manifest = generate_world(args.world, WorldSpec(n_train=args.n_train), progress=False)
    print(f"[world] {manifest} in {time.perf_counter() - started:.0f} s", flush=True)
    if not smoke(args.model, manifest, args.device, args.methods):
        return 1

    shards, procs = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "shards.log", "w")
    workdir = Path(tempfile.mkdtemp(prefix="bench-shards-"))  # fresh: never merge an earlier run's shards
    groups = dict(GROUPS)
    if args.per_class:  # one shard per class: more parallel processes for a short method list
        from unlearning.world import SHAPES

        groups = {**{shape: ["--kinds", "class", "--classes", shape] for shape in SHAPES}, "others": GROUPS["others"]}
    for method in args.methods:
        for group, case_args in groups.items():
            shard = workdir / f"{method}-{group}"
            shards.append(shard)
            cmd = [sys.executable, "-m", "unlearning.bench", "--model", args.model, "--manifest", str(manifest), "--out", str(shard),
                   "--methods", method, "--seeds", *args.seeds, "--device", args.device, *case_args]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.perf_counter() + args.seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
    done = [s / "bench.json" for s in shards if (s / "bench.json").exists()]
    result = merge(done, args.out)
    print(f"[bench] {len(result['rows'])} runs from {len(done)} shards ({result['meta']['complete_shards']} complete) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
