"""Version `status` tags derived from aliases and recorded events, on a real MLflow store."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.transactions import transaction
from test_registry import model_dirs  # noqa: F401  (fixture)

from tasks import champion, registry
from tasks.registry import ChampionMoved, derive_status, promote, promote_if_parent, register_model_folder, rollback_to, sync_status_tags


def _register(settings, folder, request_ids: list[str], **tags) -> str:
    version = register_model_folder(folder, settings, {"erasure.request_ids": json.dumps(request_ids), **tags})
    return str(version.version)


def _tags(name: str, version: str) -> dict:
    return MlflowClient().get_model_version(name, version).tags


def _status_tags(name: str) -> dict[str, str]:
    return {str(v.version): v.tags.get("status") for v in registry.list_versions(name)}


def _aliases(name: str) -> dict[str, str | None]:
    found = {a: registry.get_version_by_alias(name, a) for a in ("champion", "previous")}
    return {a: None if v is None else str(v.version) for a, v in found.items()}


@pytest.mark.parametrize("tags, aliases, expected", [
    ({}, [], "candidate"),
    ({"erasure.promoted_at": "2026-01-01T00:00:00+00:00"}, ["champion"], "champion"),
    ({"erasure.promoted_at": "2026-01-01T00:00:00+00:00"}, ["previous"], "previous"),
    ({"erasure.promoted_at": "2026-01-01T00:00:00+00:00"}, [], "superseded"),
    ({"erasure.promoted_at": "2026-01-01T00:00:00+00:00", "erasure.rolled_back_at": "2026-01-02T00:00:00+00:00"}, [], "rolled_back"),
    # rolled back, promoted again later, then replaced by a newer champion
    ({"erasure.promoted_at": "2026-01-03T00:00:00+00:00", "erasure.rolled_back_at": "2026-01-02T00:00:00+00:00"}, [], "superseded"),
    ({"status": "rolled_back", "rollback_reason": "guard"}, [], "rolled_back"),  # before erasure.rolled_back_at existed
    ({"erasure.decision": "rejected"}, [], "rejected"),
    ({"status": "rejected"}, [], "rejected"),  # written by the flow with tag_version
    ({"status": "rejected"}, ["champion"], "champion"),
    ({"erasure.promotion_undone_at": "2026-01-01T00:00:00+00:00"}, [], "undone"),
    ({"erasure.purged_at": "2026-01-09T00:00:00+00:00", "erasure.promoted_at": "2026-01-01T00:00:00+00:00"}, ["previous"], "purged"),
    ({"status": "champion"}, [], "candidate"),  # a stale status tag is not an event
])
def test_derive_status(tags, aliases, expected):
    assert derive_status(tags, aliases) == expected


def test_status_tags_follow_promotions_and_rollbacks(mlflow_store, model_dirs):  # noqa: F811
    name = mlflow_store.model_name
    v1, v2, v3 = (_register(mlflow_store, model_dirs[n % 2], ids) for n, ids in enumerate(([], ["req-a"], ["req-a", "req-b"])))
    rejected = _register(mlflow_store, model_dirs[0], ["req-c"], status="rejected")
    decided = _register(mlflow_store, model_dirs[0], ["req-d"], **{"erasure.decision": "rejected"})

    promote(name, v1)
    assert _status_tags(name) == {v1: "champion", v2: "candidate", v3: "candidate", rejected: "rejected", decided: "rejected"}
    promote(name, v2)
    assert (_status_tags(name)[v1], _status_tags(name)[v2]) == ("previous", "champion")
    promote(name, v3)
    assert {v: _status_tags(name)[v] for v in (v1, v2, v3)} == {v1: "superseded", v2: "previous", v3: "champion"}
    assert "erasure.promoted_at" in _tags(name, v1)

    restored, rolled_back = rollback_to(name, v2, reason="retain fell")
    assert (str(restored.version), str(rolled_back.version)) == (v2, v3)
    # registry.rollback_to alone leaves `previous` on the rolled-back version; its events are recorded
    assert rolled_back.tags["rollback_reason"] == "retain fell" and "erasure.rolled_back_at" in rolled_back.tags
    assert sync_status_tags(name) == _status_tags(name) == {
        v1: "superseded", v2: "champion", v3: "previous", rejected: "rejected", decided: "rejected"}


def test_promote_if_parent_refuses_a_moved_champion(mlflow_store, model_dirs):  # noqa: F811
    name = mlflow_store.model_name
    v1, v2, v3 = (_register(mlflow_store, model_dirs[0], []) for _ in range(3))
    promote(name, v1)
    promote_if_parent(name, v2, expected_parent=v1)
    assert _aliases(name) == {"champion": v2, "previous": v1}

    moved = f"champion of '{name}' is now v{v2}, the candidate v{v3} was made from v{v1}: it must be redone"
    with pytest.raises(ChampionMoved, match=moved):
        promote_if_parent(name, v3, expected_parent=v1)
    assert _aliases(name) == {"champion": v2, "previous": v1}
    assert _status_tags(name)[v3] == "candidate"
    with pytest.raises(ChampionMoved, match="made from none"):
        promote_if_parent(name, v3, expected_parent=None)


@pytest.mark.usefixtures("prefect_harness")
def test_undone_promotion_and_guarded_rollback(mlflow_store, model_dirs):  # noqa: F811
    name = mlflow_store.model_name
    v1, v2, v3 = (_register(mlflow_store, model_dirs[n % 2], ids) for n, ids in enumerate(([], ["req-a"], ["req-a", "req-b"])))
    registry.promote(name, v1)
    registry.tag_version(name, v2, **{"erasure.parent_version": v1})

    @flow(name="promote-then-fail")
    def promote_then_fail(version: str) -> None:
        with transaction():
            champion.promote(name, version)
            raise RuntimeError("injected failure after the promotion")

    with pytest.raises(RuntimeError, match="injected"):
        promote_then_fail(v3)
    assert _aliases(name) == {"champion": v1, "previous": None}
    tags = _tags(name, v3)
    assert tags["status"] == "undone" and "erasure.promotion_undone_at" in tags and "erasure.promoted_at" not in tags

    @flow(name="promote-then-roll-back")
    def promote_then_roll_back() -> dict:
        with transaction():
            champion.promote(name, v2)
        return champion.rollback_champion(mlflow_store, name, None, "guard: retain fell")

    event = promote_then_roll_back()
    assert (event["champion"], event["rolled_back"], event["reopened_requests"]) == (v1, v2, ["req-a"])
    assert _aliases(name) == {"champion": v1, "previous": None}
    assert _status_tags(name) == {v1: "champion", v2: "rolled_back", v3: "undone"}
    assert _tags(name, v2)["rollback_reason"] == "guard: retain fell"
