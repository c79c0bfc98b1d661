"""A hyperparameter sweep on the val split, on a CUDA machine: one process per worker, all sharing the GPU.

Each job is ``{"method", "target", "cfg"}`` (target: a shape, or "<colour> <shape>" for a subgroup);
every run starts from the champion, is scored on the val split (held-out probes included) and
appended to ``OUT/sweep.jsonl`` with the metrics before and after. Workers stop taking jobs at the
deadline, so a sweep cut short still returns what it finished.

    python infra/gpu_sweep.py --model CHAMPION_DIR --jobs jobs.json --out OUT [--seconds 400] [--workers 16]

Uses only the ``unlearning`` library (torch + open_clip + pydantic), like ``infra/gpu_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "infra"))

from gpu_bench import smoke  # noqa: E402
from unlearning.bench import Case, run_one  # noqa: E402
from unlearning.methods import ForgetTarget  # noqa: E402
from unlearning.world import WorldSpec, generate_world  # noqa: E402


def parse_case(name: str) -> Case:
    """"circle" -> a class case, "red circle" -> a colour subgroup of circle."""
    if " " in name:
        value, shape = name.split()
        return Case("subgroup", ForgetTarget(kind="subgroup", class_name=shape, attribute="colour", value=value))
    return Case("class", ForgetTarget(kind="class", class_name=name))


def worker(jobs: list[dict], model_dir: str, manifest: str, out: str, device: str, deadline: float) -> None:
    """Run ``jobs`` one after another with :func:`unlearning.bench.run_one` (each from a copy of the
    champion loaded once), scored on the val split."""
    torch.set_num_threads(1)
    from unlearning.bootstrap import world_eval_set
    from unlearning.data import read_manifest
    from unlearning.evaluation import evaluate
    from unlearning.models import load_model

    reference, eval_set = read_manifest(Path(manifest)), world_eval_set(Path(manifest), "val")
    original = load_model(f"local-dir:{model_dir}", device=device)
    before_by_target = {}
    for job in jobs:
        if time.time() > deadline:
            break
        try:
            case = parse_case(job["target"])
            if job["target"] not in before_by_target:
                before_by_target[job["target"]] = evaluate(original.model, original.tokenizer, eval_set, [case.target]).metrics
            config = {k: v for k, v in job["cfg"].items() if k != "seed"}
            row = run_one(original, reference, eval_set, case, job["method"], job["cfg"].get("seed", 0),
                          before_by_target[job["target"]], relearn=False, device=device, config=config)
            row = {**job, **{k: v for k, v in row.items() if k != "config"}}  # the job already holds it as "cfg"
        except Exception:
            row = {**job, "error": traceback.format_exc()[-2000:]}
        with open(out, "a") as f:  # one line per write: workers append to the same file
            f.write(json.dumps(row) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", required=True, type=Path, help="JSON list of {method, target, cfg}")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--world", type=Path, default=Path("/tmp/world"))
    parser.add_argument("--n-train", type=int, default=20000, help="train images to generate (forget/retain pools)")
    parser.add_argument("--seconds", type=float, default=400, help="no job starts after this many seconds")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--no-smoke", action="store_true", help="skip the two-step run of every method")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    started = time.time()
    manifest = generate_world(args.world, WorldSpec(n_train=args.n_train), progress=False)
    print(f"[world] {manifest} in {time.time() - started:.0f} s", flush=True)
    jobs = json.loads(args.jobs.read_text())
    if not args.no_smoke and not smoke(args.model, manifest, args.device, sorted({j["method"] for j in jobs})):
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "sweep.jsonl"
    deadline = started + args.seconds
    context = mp.get_context("spawn")  # CUDA cannot be forked
    procs = [context.Process(target=worker, args=(jobs[i:: args.workers], args.model, str(manifest), str(out), args.device, deadline))
             for i in range(min(args.workers, len(jobs)))]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=max(1.0, deadline + 120 - time.time()))
        if proc.is_alive():
            proc.kill()
    done = sum(1 for _ in out.open()) if out.exists() else 0
    print(f"[sweep] {done} / {len(jobs)} runs in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
