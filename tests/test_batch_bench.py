"""The batch benchmark's request builder: distinct targets, and a refusal where none would be kept."""

import pytest

from infra.batch_bench import requests
from unlearning.world import EXTRA_SHAPES, SHAPES


def test_ten_class_requests_need_a_world_with_more_than_ten_shapes():
    with pytest.raises(SystemExit, match="--extra-shapes"):
        requests("class", 10, "c", "auto")
    bodies = requests("class", 10, "c", "auto", SHAPES + EXTRA_SHAPES)
    names = [b["target"]["class_name"] for b in bodies]
    assert len(set(names)) == 10 and set(SHAPES + EXTRA_SHAPES) - set(names) == {"ring", "bar"}
    assert len({b["request_id"] for b in bodies}) == 10


def test_subgroup_requests_are_distinct_colour_shape_pairs():
    bodies = requests("subgroup", 12, "s", "auto", SHAPES + EXTRA_SHAPES)
    pairs = {(b["target"]["value"], b["target"]["class_name"]) for b in bodies}
    assert len(pairs) == 12
