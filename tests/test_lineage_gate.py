"""The lineage gate: retain accuracy lost since the first champion, summed over its erasures, is
recorded on every version and bounds what the next erasure may still lose."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from flows.erasure import erasure_flow
from tasks import registry
from tasks.champion import LINEAGE_RETAIN_DROP
from tests.test_lifecycle import QUICK, request

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _quick(request_id: str, shape: str, limit: float) -> dict:
    return request(request_id, shape, **{**QUICK, "gates": {**QUICK["gates"], "max_lineage_retain_drop": limit}})


def test_the_lineage_drop_adds_up_over_erasures_and_its_gate_rejects_past_the_limit(store):
    settings = store
    first = erasure_flow(_quick("req-lineage-1", "square", 1.0))
    assert first.status == "promoted"
    update = json.load(open(MlflowClient().download_artifacts(
        registry.get_version_by_alias(settings.model_name, registry.CHAMPION).run_id, "gates/gate_report.json")))
    (gate,) = [g for g in update["gates"] if g["name"] == "lineage_retain_drop"]
    retain = {g["name"]: g["value"] for g in update["gates"]}["retain_accuracy_drop"]
    assert gate["value"] == pytest.approx(retain, abs=1e-9)  # the first champion's lineage is 0
    champion = registry.get_version_by_alias(settings.model_name, registry.CHAMPION)
    assert float(champion.tags[LINEAGE_RETAIN_DROP]) == pytest.approx(retain, abs=1e-6)

    # Earlier erasures (here: written on the champion) used up the budget: the next one is rejected.
    MlflowClient().set_model_version_tag(settings.model_name, champion.version, LINEAGE_RETAIN_DROP, "0.08")
    second = erasure_flow(_quick("req-lineage-2", "circle", 0.05))
    assert second.status == "rejected"
    candidate = MlflowClient().get_model_version(settings.model_name, second.model_version)
    assert "lineage_retain_drop" in candidate.tags["reason"]
    assert float(candidate.tags[LINEAGE_RETAIN_DROP]) > 0.05
    assert registry.get_version_by_alias(settings.model_name, registry.CHAMPION).version == champion.version  # nothing moved
