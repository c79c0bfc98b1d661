"""three_stage's restoring stage, looked at from outside: every soup α scored on a split's unseen images.

For each seed, three_stage runs once with ``soup_alphas=[1.0]`` (so the model comes back unsouped),
then every α of the default grid is souped with the original and scored twice: on the calibration
split the method sees (the rows its α rule reads, plus each forget image's cosine margin over its
best other class, so that other ``subgroup_soup_margin`` values can be replayed offline), and on
the ``--split`` images with the benchmark's evaluation (forget, sibling and retain accuracy, as
drops from the original). The α the method's rule would pick is marked.

On ``--split val`` the method must not calibrate on the val images it is scored on, so its stop /
calibration forget images are the last ``--calibration`` forget images of train (held out of the
forgetting stage); on ``--split test`` it calibrates on val, as in the benchmark.

    python infra/soup_curve.py --model .erasure/seeded-champion --manifest .erasure/world/manifest.jsonl \\
        --target "red circle" --split val --seeds 0 1 2 3 --out soup-val.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearning.bootstrap import world_eval_set  # noqa: E402
from unlearning.data import read_manifest  # noqa: E402
from unlearning.erasure import erase  # noqa: E402
from unlearning.erasure_data import build_unlearning_data  # noqa: E402
from unlearning.evaluation import evaluate  # noqa: E402
from unlearning.methods import ForgetTarget  # noqa: E402
from unlearning.methods.three_stage import ThreeStageConfig, calibration_row, choose_alpha, soup  # noqa: E402
from unlearning.models import ClipBundle, load_model, state_copy  # noqa: E402


def curve(model: ClipBundle, reference, eval_set, target: ForgetTarget, seed: int, split: str, calibration: int,
          before: dict, config: dict) -> dict:
    """Every soup α of one three_stage run (seed ``seed``) from ``model`` (copied, left unchanged)."""
    data = build_unlearning_data(target, reference, model.image_size, seed=seed)
    if split == "val":
        forget = data.forget
        data.forget_val = forget.subset(torch.arange(len(forget) - calibration, len(forget)))
        data.forget = forget.subset(torch.arange(len(forget) - calibration))
    # Each α is scored below: the unsouped model itself needs no evaluation.
    outcome = erase(model, reference, target, "three_stage", seed=seed, config={**config, "soup_alphas": [1.0]}, data=data,
                    evaluate_after=False)
    bundle = outcome.bundle
    unlearned, original_state = state_copy(bundle.model), state_copy(outcome.original)
    settings = ThreeStageConfig(**config)
    rows = []
    for alpha in settings.soup_alphas:
        bundle.model.load_state_dict(soup(original_state, unlearned, alpha))
        after = evaluate(bundle.model, bundle.tokenizer, eval_set, [target]).metrics
        calibration, margins = calibration_row(bundle.model, bundle.tokenizer, data, settings.for_kind("soup_margin", target.kind))
        rows.append({"alpha": alpha, **calibration,
                     "calibration_margins": [round(m, 4) for m in margins.tolist()],
                     f"{split}_forget": after["forget_accuracy"],
                     f"{split}_sibling_drop": before["sibling_accuracy"] - after["sibling_accuracy"],
                     f"{split}_retain_drop": before["retain_accuracy"] - after["retain_accuracy"]})
    chosen = choose_alpha(rows, settings.stop_forget_accuracy)["alpha"]
    return {"target": target.name, "seed": seed, "split": split, "chosen_alpha": chosen, "config": config, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="champion directory (local-dir)")
    parser.add_argument("--manifest", required=True, help="the world's manifest.jsonl")
    parser.add_argument("--target", default="red circle", help='"<colour> <shape>"')
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--calibration", type=int, default=32, help="train forget images held out for calibration (val)")
    parser.add_argument("--config", default="{}", help="three_stage overrides as JSON")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    value, shape = args.target.split()
    target = ForgetTarget(kind="subgroup", class_name=shape, attribute="colour", value=value)
    manifest = Path(args.manifest)
    reference, eval_set = read_manifest(manifest), world_eval_set(manifest, args.split)
    original = load_model(f"local-dir:{args.model}", device="cpu")
    before = evaluate(original.model, original.tokenizer, eval_set, [target]).metrics
    results = []
    for seed in args.seeds:
        results.append(curve(original, reference, eval_set, target, seed, args.split, args.calibration, before,
                             json.loads(args.config)))
        for row in results[-1]["rows"]:
            mark = "  <- chosen" if row["alpha"] == results[-1]["chosen_alpha"] else ""
            print(f"seed {seed} α {row['alpha']:.2f}  calibration forget {100 * row['forget_accuracy']:5.1f} % "
                  f"retain {100 * row['retain_accuracy']:5.1f} % margin max {max(row['calibration_margins']):+.3f}  |  "
                  f"{args.split} forget {100 * row[f'{args.split}_forget']:5.1f} % siblings {-100 * row[f'{args.split}_sibling_drop']:+5.1f} "
                  f"retain {-100 * row[f'{args.split}_retain_drop']:+5.1f} pt{mark}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
