"""Depth evidence for every erasure: how deep the forgetting goes, beside the champion before it
and, where a retrain oracle is cached, beside a model that never saw the target.

The measures and their protocols are ``unlearning.depth``'s (``docs/depth.md``); this task runs
them on the champion and the candidate for each new target of the update, finds the cached oracle
for the champion's recipe and every carried target (``erasure oracle`` trains them; the pipeline
never does, it would cost a bootstrap per erasure), logs the values to the update's MLflow run
with a plot, and gives the optional depth gates their values.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.data import cache_folder
from tasks.report import metric_name, plt
from tasks.settings import ErasureSettings
from unlearning.depth import depth_measures
from unlearning.evaluation import Gate
from unlearning.image_cache import ImageCache
from unlearning.models import load_model
from unlearning.oracle import TrainingRecipe, cached_oracle

# The certificate and the relearn gate read 0 and 10 attack steps; the whole curve (5 and 20 too) is the
# bench's and the oracle's. Half the attack: relearning was half of the depth evidence's time.
CERTIFICATE_RELEARN_STEPS = (0, 10)

GATE_DESCRIPTIONS = {
    "relearn_accuracy": "target accuracy after 10 relearning steps on 8 of its images (a shallow erasure comes straight back)",
    "knn_recall": "target recall of a 10-nearest-neighbour vote in image-embedding space (the images still cluster as the target)",
    "mia_distance": "distance of the membership-inference AUC from the oracle's (0.5 without one): forgotten images must not stand out",
}


@dataclass
class DepthEvidence:
    """Per new target (by name): the measures of the champion (``before``), the candidate
    (``after``) and the oracle (``oracle``, None when none is cached)."""

    targets: dict[str, dict[str, dict[str, float] | None]] = field(default_factory=dict)
    oracle_version: str | None = None  # the oracle folder's name, when one was used
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"targets": self.targets, "oracle": self.oracle_version, "seconds": round(self.seconds, 2)}


def find_oracle(settings: ErasureSettings, recipe: TrainingRecipe | None, targets) -> Path | None:
    """The cached oracle for every target the candidate carries, trained with the champion's recipe
    on its reference data; None when the champion has no recipe (a model trained elsewhere) or no
    oracle is cached."""
    manifest = settings.reference_manifest_path
    if recipe is None or not manifest.exists():
        return None
    return cached_oracle(settings.oracle_dir, recipe, manifest, targets, settings.device)


def _digest(target, reference) -> str:
    blob = json.dumps([target.model_dump(), len(reference), [r.image_path for r in reference[:: max(1, len(reference) // 64)]]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _oracle_measures(folder: Path, target, reference, image_size: int, cache_dir: ImageCache, device) -> dict[str, float]:
    """The oracle's measures of ``target``, computed once per oracle and target (kept beside it)."""
    stored = folder / f"depth-{target.name.replace(' ', '_')[:60]}.json"
    if stored.exists():
        return json.loads(stored.read_text())
    oracle = load_model(f"local-dir:{folder}", device=device)
    measures = depth_measures(oracle.model, oracle.tokenizer, target, reference, image_size=image_size, cache_dir=cache_dir)
    stored.write_text(json.dumps(measures))
    return measures


@task(name="measure-depth", cache_policy=NO_CACHE)
def measure_depth(plan, champion, unlearned, settings: ErasureSettings) -> DepthEvidence | None:
    """Depth measures of the update's new targets on the champion, the candidate and the oracle;
    None when ``settings.depth_evidence`` is off."""
    if not settings.depth_evidence:
        return None
    logger = get_run_logger()
    started = time.perf_counter()
    new_targets = plan.all_targets[len(champion.targets):]
    reference = plan.data[plan.request_ids[0]].reference
    image_size = champion.bundle.image_size
    cache_dir = ImageCache(cache_folder(settings, "images"))  # one cache object: its decoded shards stay in memory across targets
    oracle = find_oracle(settings, champion.recipe, plan.all_targets)
    evidence = DepthEvidence(oracle_version=oracle.name if oracle else None)
    candidate = unlearned.best.bundle
    # Each model's image features, shared by every target of the batch: the test split and the probe
    # bank are the same for all of them.
    encoded: dict[int, dict] = {id(champion.bundle): {}, id(candidate): {}}
    for target in new_targets:
        def measure(bundle):
            return depth_measures(bundle.model, bundle.tokenizer, target, reference, image_size=image_size, cache_dir=cache_dir,
                                  encoded=encoded[id(bundle)], relearn_checkpoints=CERTIFICATE_RELEARN_STEPS)

        # The champion's values are the same for every update that starts from it (a batch split, a retry).
        kept = cache_folder(settings, "depth") / f"{champion.name}-v{champion.version}-{_digest(target, reference)}.json"
        if kept.exists():
            before = json.loads(kept.read_text())
        else:
            before = measure(champion.bundle)
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(before))
        evidence.targets[target.name] = {
            "before": before, "after": measure(candidate),
            "oracle": _oracle_measures(oracle, target, reference, image_size, cache_dir, settings.device) if oracle else None}
    evidence.seconds = time.perf_counter() - started
    for name, sides in evidence.targets.items():
        for side, measures in sides.items():
            if measures:
                mlflow.log_metrics({f"{side}.{metric_name(key)}/{metric_name(name)}": value for key, value in measures.items()})
    mlflow.log_dict(evidence.as_dict(), "depth/depth.json")
    figure = depth_plot(evidence)
    mlflow.log_figure(figure, "plots/depth.png")
    plt.close(figure)
    logger.info("depth measured in %.1f s (%s)", evidence.seconds, f"oracle {oracle.name}" if oracle else "no cached oracle")
    return evidence


def depth_plot(evidence: DepthEvidence):
    """Grouped bars per measure: champion before, candidate after, oracle (when cached), per target."""
    rows = list(evidence.targets.items())
    figure, axes = plt.subplots(len(rows), 1, figsize=(9, 3.2 * len(rows)), squeeze=False)
    for axis, (name, sides) in zip(axes[:, 0], rows):
        keys = sorted(sides["after"])
        for offset, (side, colour) in enumerate((("before", "tab:gray"), ("after", "tab:red"), ("oracle", "tab:green"))):
            values = sides.get(side)
            if values:
                axis.bar([i + 0.27 * (offset - 1) for i in range(len(keys))], [values.get(k, float("nan")) for k in keys],
                         width=0.27, color=colour, label={"before": "champion (before)", "after": "candidate", "oracle": "retrain oracle"}[side])
        axis.set_xticks(range(len(keys)), [k.removeprefix("depth/") for k in keys], rotation=30, ha="right")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"depth of forgetting: {name}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def depth_gates(evidence: DepthEvidence | None, thresholds: dict) -> list[Gate]:
    """The depth gates that are switched on (a threshold not None), over every new target.

    A gate whose measure no new target has (an association has no relearning) is not applied;
    a gate switched on while no evidence was measured fails (nothing proves it passed)."""
    wanted = {"relearn_accuracy": thresholds.get("max_relearn_accuracy"), "knn_recall": thresholds.get("max_knn_recall"),
              "mia_distance": thresholds.get("max_mia_distance")}
    gates = []
    for name, threshold in wanted.items():
        if threshold is None:
            continue
        values = []
        for sides in (evidence.targets.values() if evidence else []):
            after, oracle = sides["after"], sides.get("oracle") or {}
            if name == "relearn_accuracy" and "depth/relearn@10" in after:
                values.append(after["depth/relearn@10"])
            elif name == "knn_recall" and "depth/knn" in after:
                values.append(after["depth/knn"])
            elif name == "mia_distance" and "depth/mia_auc" in after:
                values.append(abs(after["depth/mia_auc"] - oracle.get("depth/mia_auc", 0.5)))
        if evidence is not None and not values:
            continue
        value = max(values) if values else float("nan")
        gate = Gate(name, value, float(threshold), "<=", value == value and value <= threshold + 1e-9)
        gate.description = GATE_DESCRIPTIONS[name] + ("" if values else " — depth evidence is off (ERASURE_DEPTH_EVIDENCE), so it cannot pass")
        gates.append(gate)
    return gates
