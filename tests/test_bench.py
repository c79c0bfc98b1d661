"""The benchmark's report: harmonic mean, per-method summary, shard merge (no model needed)."""

import json

import pytest

from unlearning.bench import Case, harmonic, merge, run_one
from unlearning.evaluation import EvalSet
from unlearning.methods import ForgetTarget


def _row(kind, method, seed, forget, retained, before_retained=0.9, seconds=10.0):
    key = "sibling_accuracy" if kind == "subgroup" else "retain_accuracy"
    after = {"forget_accuracy": forget, key: retained, "retain_accuracy": retained, "heldout_accuracy": 0.95}
    before = {"forget_accuracy": 0.95, key: before_retained, "retain_accuracy": before_retained, "heldout_accuracy": 0.96}
    return {"kind": kind, "target": "circle", "method": method, "seed": seed, "seconds": seconds, "steps": 20,
            "before": before, "after": after, "relearn": {"unlearned": [0.0, 0.5], "original": [0.95, 1.0]}}


def test_harmonic_mean_of_forgetting_and_retention():
    assert harmonic(0.0, 1.0) == 1.0
    assert harmonic(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic(0.2, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic(1.0, 0.9) == 0.0 and harmonic(0.0, 0.0) == 0.0  # nothing forgotten / nothing kept


def test_merge_joins_shards_and_summarises_per_kind_and_method(tmp_path):
    shard_a, shard_b = tmp_path / "a.json", tmp_path / "b.json"
    shard_a.write_text(json.dumps({"meta": {"model": "m", "device": "cpu"}, "rows": [
        _row("class", "cliperase", 0, 0.0, 0.92), _row("class", "cliperase", 1, 0.02, 0.88)]}))
    shard_b.write_text(json.dumps({"rows": [_row("subgroup", "lipschitz", 0, 0.1, 0.8, seconds=30.0)]}))  # cut off: no meta

    report = merge([shard_a, shard_b], tmp_path / "out")

    assert report["meta"]["n_runs"] == 3 and report["meta"]["shards"] == 2 and report["meta"]["complete_shards"] == 1
    assert report["meta"]["methods"] == ["cliperase", "lipschitz"] and report["meta"]["seeds"] == [0, 1]
    by_method = {(e["kind"], e["method"]): e for e in report["summary"]}
    cliperase = by_method[("class", "cliperase")]
    assert cliperase["forget"]["mean"] == pytest.approx(0.01) and cliperase["forget"]["n"] == 2
    assert cliperase["retain_drop"]["mean"] == pytest.approx(0.9 - 0.90)
    assert cliperase["harmonic"]["mean"] == pytest.approx((harmonic(0.0, 0.92) + harmonic(0.02, 0.88)) / 2)
    assert cliperase["relearn"]["mean"] == 0.5 and cliperase["relearn_original"]["mean"] == 1.0
    assert cliperase["sibling_drop"] is None
    assert by_method[("subgroup", "lipschitz")]["sibling_drop"]["mean"] == pytest.approx(0.1)

    written = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(written["rows"]) == 3
    table = (tmp_path / "out" / "bench.md").read_text().splitlines()
    assert sum(line.startswith("| class | cliperase |") for line in table) == 1
    assert any(line.startswith("| subgroup | lipschitz | 10.0 ± 0.0 |") for line in table)


def test_every_result_is_measured_against_the_oracle_of_its_target_and_seed():
    def with_depth(row, **depth):
        return {**row, "depth": {f"depth/{k}": v for k, v in depth.items()}}

    rows = [with_depth(_row("class", "original", 0, 0.95, 0.9), knn=0.95, mia_auc=0.55),
            with_depth(_row("class", "oracle", 0, 0.0, 0.9), knn=0.80, mia_auc=0.50),
            with_depth(_row("class", "oracle", 1, 0.0, 0.9), knn=0.60, mia_auc=0.50),
            with_depth(_row("class", "cliperase", 0, 0.0, 0.9), knn=0.90, mia_auc=0.30),
            with_depth(_row("class", "cliperase", 1, 0.0, 0.9), knn=0.70, mia_auc=0.40)]
    summary = {e["method"]: e for e in __import__("unlearning.bench", fromlist=["summarise"]).summarise(rows)}
    gap = summary["cliperase"]["depth/knn:oracle_gap"]
    assert gap["mean"] == pytest.approx((0.10 + 0.10) / 2) and gap["n"] == 2  # each seed against its own oracle
    assert summary["cliperase"]["depth/mia_auc:oracle_gap"]["mean"] == pytest.approx((0.20 + 0.10) / 2)
    assert summary["original"]["depth/knn:oracle_gap"]["n"] == 1  # only seed 0 has an original
    assert summary["oracle"]["depth/knn:oracle_gap"]["mean"] == 0.0


def test_run_one_applies_and_records_config_overrides(trained_model_dir, small_records, test_images):
    case = Case("class", ForgetTarget(kind="class", class_name="circle"))
    reference = [r for split in ("train", "val", "test") for r in small_records[split]]
    eval_set = EvalSet(small_records["test"], test_images)

    row = run_one(str(trained_model_dir), reference, eval_set, case, "gradient_ascent", 0, before={}, relearn=False,
                  config={"max_steps": 2, "stop_forget_accuracy": -1.0})

    assert row["config"] == {"max_steps": 2, "stop_forget_accuracy": -1.0}
    assert row["steps"] == 2 and row["method"] == "gradient_ascent" and "relearn" not in row  # the override ran
