"""The erasure request: valid requests load, every error names the field and the fix, hashes are stable."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from tasks.request import (
    METHOD_NAMES,
    ErasureRequest,
    GateThresholds,
    RequestError,
    load_request,
    request_json_schema,
)
from unlearning.methods.base import ForgetTarget

MINIMAL = {"request_id": "req-2026-001", "requester": "privacy@example.org", "target": {"kind": "class", "class_name": "circle"}}
FULL = {
    "request_id": "req-2026-002",
    "requested_at": "2026-11-02T09:30:00+01:00",
    "requester": "privacy@example.org",
    "target": {"kind": "subgroup", "class_name": "circle", "attribute": "colour", "value": "red"},
    "forget_manifest": "s3://erasure-data/forget.jsonl",
    "retain_manifest": "data/retain.jsonl",
    "method": "cliperase",
    "model": "tiny-clip",
    "gates": {"max_forget_accuracy": 0.05, "max_retain_drop": 0.1, "max_heldout_drop": 0.02},
    "seeds": [0, 1],
    "dry_run": True,
    "time_budget_s": 120.5,
}


def _error(payload) -> str:
    with pytest.raises(RequestError) as caught:
        load_request(payload)
    return str(caught.value)


def test_full_request_round_trips_through_json_file(tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(FULL))
    request = load_request(path)
    again = load_request(request.model_dump_json())
    assert again == request
    assert request.gates == GateThresholds(max_forget_accuracy=0.05, max_retain_drop=0.1, max_heldout_drop=0.02)
    assert request.requested_at.utcoffset().total_seconds() == 3600


def test_minimal_request_gets_the_documented_defaults():
    request = load_request(json.dumps(MINIMAL))
    assert request.requested_at.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - request.requested_at).total_seconds()) < 60
    assert (request.method, request.model, request.gates, request.seeds, request.dry_run, request.time_budget_s) == (
        "auto", None, None, [0], False, 600.0)


@pytest.mark.parametrize("target, name", [
    ({"kind": "class", "class_name": "circle"}, "circle"),
    ({"kind": "subgroup", "class_name": "circle", "attribute": "colour", "value": "red"}, "red circle"),
    ({"kind": "association", "captions": ["a red circle"], "pairs_manifest": "s3://erasure-data/pairs.jsonl"},
     "association:a red circle"),
])
def test_target_converts_to_the_library_forget_target(target, name):
    forget = load_request({**MINIMAL, "target": target}).target.to_forget_target()
    assert type(forget) is ForgetTarget
    assert forget.name == name


def test_json_schema_describes_every_field():
    schema = request_json_schema()
    assert set(schema["properties"]) == set(ErasureRequest.model_fields)
    assert set(schema["required"]) == {"request_id", "requester", "target"}
    assert schema["additionalProperties"] is False
    target = schema["$defs"]["TargetSpec"]
    assert target["properties"]["kind"]["enum"] == ["class", "subgroup", "association"]
    assert "pairs_manifest" in target["properties"]
    json.dumps(schema)


@pytest.mark.parametrize("change, expected", [
    ({"colour": "red"}, 'colour: unknown field — remove it; allowed: request_id'),
    ({"target": {"kind": "class", "clas_name": "circle"}}, 'target.clas_name: unknown field — did you mean "class_name"?'),
    ({"target": {"kind": "class"}}, 'target.class_name: required for a class target — add "class_name": "circle"'),
    ({"target": {"kind": "subgroup", "class_name": "circle"}},
     'target.attribute, target.value: required for a subgroup — add "attribute"'),
    ({"target": {"kind": "klass", "class_name": "circle"}},
     "target.kind: Input should be 'class', 'subgroup' or 'association' (got \"klass\")"),
    ({"target": {"kind": "association"}}, "target.captions, target.pairs_manifest: required for an association target"),
    ({"target": {"kind": "class", "class_name": "circle", "pairs_manifest": "p.jsonl"}},
     "target.pairs_manifest: only for association targets"),
    ({"request_id": "../etc"}, 'request_id: String should match pattern'),
    ({"request_id": "x" * 129}, 'request_id: String should match pattern'),
    ({"gates": {"max_forget_accuracy": 1.5, "max_retain_drop": 0.1, "max_heldout_drop": 0.1}},
     "gates.max_forget_accuracy: Input should be less than or equal to 1 (got 1.5) — use a fraction between 0 and 1"),
    ({"gates": {"max_forget_accuracy": 0.1}}, 'gates.max_retain_drop: required — add "max_retain_drop": 0.05'),
    ({"method": "cliprase"}, 'method: unknown method "cliprase" — did you mean "cliperase"? use "auto" or one of: cliperase'),
    ({"seeds": [0, "one"]}, "seeds[1]: Input should be a valid integer"),
    ({"time_budget_s": 0}, "time_budget_s: Input should be greater than 0 (got 0) — use a positive number of seconds"),
    ({"requested_at": "2026-11-02T09:30:00"}, "requested_at: Input should have timezone info"),
    ({"forget_manifest": "https://example.org/f.jsonl"}, "forget_manifest: only local paths and s3:// URIs are supported"),
    ({"requester": " "}, "requester: String should have at least 1 character"),
])
def test_every_error_names_the_field_and_the_fix(change, expected):
    message = _error({**MINIMAL, **change})
    assert message.splitlines()[0].startswith(expected), message


def test_each_error_gets_its_own_line():
    message = _error({"request_id": "ok", "seeds": [-1], "dry_run": "maybe"})
    lines = message.splitlines()
    assert [line.split(":")[0] for line in lines] == ["requester", "target", "seeds[0]", "dry_run"]
    assert all(" — " in line for line in lines)


@pytest.mark.parametrize("text, expected", [
    ('{"request_id": "a",\n "requester": "b"\n "target": {}}', "request: malformed JSON at line 3, column 2: Expecting ',' delimiter"),
    ('{"request_id": "a", "request_id": "b"}', 'request_id: given twice'),
    ("[1, 2]", "request: expected a JSON object"),
    ("no/such/request.json", "request: no file at no/such/request.json"),
])
def test_unreadable_requests_say_where(text, expected):
    assert _error(text).startswith(expected)


def test_methods_are_checked_against_the_names_passed_in():
    assert load_request({**MINIMAL, "method": "mine"}, methods=["mine"]).method == "mine"
    with pytest.raises(RequestError, match='unknown method "cliperase" — use "auto" or one of: mine'):
        load_request({**MINIMAL, "method": "cliperase"}, methods=["mine"])


def test_method_names_cover_the_registry():
    from unlearning.methods import METHODS

    assert set(METHODS) <= set(METHOD_NAMES)


def test_content_hash_ignores_requested_at_and_key_order_but_not_content():
    first = load_request({**FULL, "requested_at": "2026-01-01T00:00:00Z"})
    later = load_request(json.dumps(dict(reversed(list({**FULL, "requested_at": "2026-06-01T00:00:00Z"}.items())))))
    assert first.content_hash() == later.content_hash()
    assert load_request({**FULL, "seeds": [0, 2]}).content_hash() != first.content_hash()


def test_content_hash_is_stable_across_versions_and_explicit_defaults():
    minimal = load_request(MINIMAL)
    explicit = load_request({**MINIMAL, "method": "auto", "seeds": [0], "dry_run": False, "time_budget_s": 600})
    assert minimal.content_hash() == explicit.content_hash()
    # An idempotency key must not change between releases; update only on a deliberate format change.
    assert minimal.content_hash() == "e4414ea9a14ee500e5202de65a5f88641e80edccf005552e6fd5798060bff0ea"
