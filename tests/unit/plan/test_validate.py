"""Plan contract: JSON round trip in the documented shape, and the validator on broken plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import TOY_GPU, make_cluster, make_model, make_plan
from thunderserve.errors import PlanError
from thunderserve.plan import load_plan, plan_from_dict, validate_plan

CLUSTER = make_cluster((("a", "TOY", 2), ("b", "TOY", 2)), default_gbps=10)
MODEL = make_model()


def good_plan(**kw):  # type: ignore[no-untyped-def]
    return make_plan([("p0", "prefill", [["a:0"], ["a:1"]], [0, 1, 2]),
                      ("d0", "decode", [["b:0", "b:1"]], [0, 2])],
                     entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}}, **kw)


def test_issue_example_round_trips_byte_for_byte() -> None:
    """Written as v2 (the current format); a v1 document (no kv_transfer.gate) reads as the same plan."""
    doc = {"format": "thunderserve.plan/v2", "model": "llama-30b", "cluster": "paper-cloud-32",
           "kv_transfer": {"compression": "int4"},
           "groups": [
               {"id": "p0", "phase": "prefill", "stages": [{"gpus": ["n0:0", "n0:1"], "layers": [0, 30]},
                                                           {"gpus": ["n1:0", "n1:1"], "layers": [30, 60]}]},
               {"id": "d0", "phase": "decode", "stages": [{"gpus": ["n2:0", "n2:1", "n2:2", "n2:3"],
                                                           "layers": [0, 60]}]},
               {"id": "c0", "phase": "colocated", "stages": [{"gpus": ["n3:0", "n3:1"], "layers": [0, 60]}]}],
           "routing": {"entry": {"p0": 0.7, "c0": 0.3}, "kv": {"p0": {"d0": 1.0}}},
           "estimate": {}}
    assert json.loads(plan_from_dict(doc).to_json()) == doc
    assert plan_from_dict({**doc, "format": "thunderserve.plan/v1"}) == plan_from_dict(doc)


def test_good_plan_validates() -> None:
    validate_plan(good_plan(), CLUSTER, MODEL)


@pytest.mark.parametrize(("groups", "routing", "message"), [
    ([("p0", "prefill", [["a:9"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"p0": 1.0}, {"p0": {"d0": 1.0}}), "GPU 'a:9' is not in cluster"),
    ([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["a:0"]], [0, 2])],
     ({"p0": 1.0}, {"p0": {"d0": 1.0}}), "GPU 'a:0' is already used by group 'p0'"),
    ([("p0", "prefill", [["a:0"]], [0, 1]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"p0": 1.0}, {"p0": {"d0": 1.0}}), "groups.p0: stages cover layers [0, 1), model toy has 2"),
    ([("p0", "prefill", [["a:0"], ["a:1"]], [0, 1, 1]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"p0": 1.0}, {"p0": {"d0": 1.0}}), "groups.p0.stages.1.layers"),
    ([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"p0": 0.6}, {"p0": {"d0": 1.0}}), "routing.entry: shares sum to 0.600000, not 1"),
    ([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"d0": 1.0}, {"p0": {"d0": 1.0}}), "routing.entry.d0: a decode group cannot take arriving requests"),
    ([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"p0": 1.0}, {"p0": {"p0": 1.0}}), "routing.kv.p0.p0: not a decode group"),
    ([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
     ({"p0": 1.0}, {}), "prefill group 'p0' has no KV destination"),
    ([("p0", "prefill", [["a:0"]], [0, 2])], ({"p0": 1.0}, {}), "prefill groups need at least one decode group"),
])
def test_broken_plans_are_rejected(groups, routing, message) -> None:  # type: ignore[no-untyped-def]
    plan = make_plan(groups, entry=routing[0], kv=routing[1])
    with pytest.raises(PlanError) as info:
        validate_plan(plan, CLUSTER, MODEL)
    assert message in str(info.value)


def test_memory_that_does_not_fit_is_rejected() -> None:
    tiny = dict(TOY_GPU, name="TINY", memory_gb=1)
    cluster = make_cluster((("a", "TINY", 1),), gpu_types=[tiny])
    plan = make_plan([("c0", "colocated", [["a:0"]], [0, 2])], entry={"c0": 1.0})
    with pytest.raises(PlanError, match=r"groups.c0.stages.0: does not fit in memory"):
        validate_plan(plan, cluster, MODEL)


def test_zero_bandwidth_kv_link_is_rejected_not_simulated() -> None:
    cluster = make_cluster((("a", "TOY", 1), ("b", "TOY", 1)), links=[{"between": ["a", "b"], "gbps": 0}])
    plan = make_plan([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
                     entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})
    with pytest.raises(PlanError, match="routing.kv.p0.d0: zero-bandwidth link"):
        validate_plan(plan, cluster, MODEL)


def test_plan_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match=r"p.json: malformed JSON at line 1"):
        load_plan(bad)
    bad.write_text(json.dumps({"format": "thunderserve.plan/v9", "model": "x", "cluster": "y", "groups": []}))
    with pytest.raises(PlanError, match="unsupported plan format"):
        load_plan(bad)
    bad.write_text(json.dumps({"model": "x", "cluster": "y", "groups": [{"id": "g", "phase": "both",
                                                                          "stages": []}]}))
    with pytest.raises(PlanError, match=r"groups.0.phase"):
        load_plan(bad)
