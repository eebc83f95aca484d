"""A job's route as data (``scheduler.core.route``) and the hops it is made of (``keys.Hop``): unit tests."""

from __future__ import annotations

import json

import pytest

from scheduler.core import keys
from scheduler.core.job_record import StageField, kind_progress, kind_state, stage_field
from scheduler.core.keys import Hop, Stage
from scheduler.core.route import THREE_HOPS, RouteUnreadable, parse_route, route_for, route_of

HIGH, LOW = Hop("transform@high"), Hop("transform@low")


def test_a_stage_is_the_hop_of_its_kind_without_a_part() -> None:
    assert Hop("transform") == Stage.TRANSFORM and Stage.TRANSFORM.kind is Stage.TRANSFORM
    assert HIGH.kind is Stage.TRANSFORM and HIGH.part == "high" and Stage.DECODE.part is None
    assert {Stage.TRANSFORM: 1}[Hop("transform")] == 1, "a hop finds a dict keyed by its stage"
    assert stage_field(LOW, StageField.ATTEMPT) == "transform@low.attempt"
    for bad in ("decode@high", "transform@middle", "upscale", "transform@", "@high"):
        with pytest.raises(ValueError, match="unknown hop"):
            Hop(bad)


def test_hops_name_their_own_queues_rq_ids_and_demand_keys() -> None:
    assert keys.queue_name(HIGH) == "reelfarm-transform_high"
    assert keys.queue_name(LOW, "high", "wan22") == "reelfarm-transform_low@wan22-high"
    assert keys.hop_of_queue("reelfarm-transform_low@wan22-high") == LOW
    assert keys.hop_of_queue("reelfarm-transform-low") == Stage.TRANSFORM, "a priority suffix, not a part"
    assert keys.stage_of_queue("reelfarm-transform_high") is Stage.TRANSFORM
    rq_id = keys.stage_job_id("job-1", HIGH, 2)
    assert keys.ID_PATTERN.match(rq_id), "rq ids allow only [A-Za-z0-9_-]"
    assert keys.job_id_of_stage_job(rq_id, HIGH) == "job-1"
    assert keys.job_id_of_stage_job(rq_id, Stage.TRANSFORM) is None, "each hop's ids are its own"
    assert keys.demand_key(HIGH) == "reelfarm:demand:transform@high"
    assert keys.parse_inflight_member(keys.inflight_member("j", LOW, 3)) == ("j", LOW, 3)


def test_the_three_hop_route_and_what_comes_next() -> None:
    assert THREE_HOPS.names == (Stage.ENCODE, Stage.TRANSFORM, Stage.DECODE)
    assert THREE_HOPS.next(Stage.ENCODE) == Stage.TRANSFORM and THREE_HOPS.next(Stage.DECODE) is None
    assert THREE_HOPS.previous(Stage.ENCODE) is None and THREE_HOPS.previous(Stage.DECODE) == Stage.TRANSFORM
    with pytest.raises(ValueError, match="not on this job's route"):
        THREE_HOPS.next(HIGH)


def test_split_at_step_makes_two_transform_hops_covering_the_loop() -> None:
    route = route_for(6, 3)
    assert route.names == (Stage.ENCODE, HIGH, LOW, Stage.DECODE)
    assert route.steps_of(HIGH) == (0, 3) and route.steps_of(LOW) == (3, 6) and route.steps_of(Stage.ENCODE) is None
    assert route.next(HIGH) == LOW and route.previous(LOW) == HIGH and route.previous(Stage.DECODE) == LOW
    assert route.describe() == "encode -> transform@high [0,3) -> transform@low [3,6) -> decode"
    assert parse_route(route.to_json()) == route, "the record's field reads back as the same route"


@pytest.mark.parametrize(("steps", "split", "cached"), [(3, 3, False), (2, 3, False), (6, None, False), (6, 3, True)])
def test_jobs_the_split_cannot_serve_run_unsplit(steps: int, split: int | None, cached: bool) -> None:
    assert route_for(steps, split, step_cached=cached) == THREE_HOPS


def test_a_record_without_a_route_reads_as_the_three_hops() -> None:
    assert route_of({"state": "queued"}) == THREE_HOPS
    assert route_of({"route": route_for(8, 2).to_json()}).steps_of(LOW) == (2, 8)


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        json.dumps([{"hop": "encode"}, {"hop": "transform"}]),  # no decode at the end
        json.dumps([{"hop": "encode"}, {"hop": "transform"}, {"hop": "transform"}, {"hop": "decode"}]),
        json.dumps([{"hop": "encode"}, {"hop": "upscale"}, {"hop": "decode"}]),
        json.dumps([{"hop": "encode"}, {"hop": "transform@high", "steps": [0, 3]}, {"hop": "decode", "x": 1}]),
        json.dumps(
            [
                {"hop": "encode"},
                {"hop": "transform@high", "steps": [0, 3]},
                {"hop": "transform@low", "steps": [4, 6]},  # a gap: step 3 would never run
                {"hop": "decode"},
            ]
        ),
        json.dumps([{"hop": "encode"}, {"hop": "transform", "steps": [3, 1]}, {"hop": "decode"}]),
        json.dumps([{"hop": "encode"}, {"hop": "transform", "steps": [0, True]}, {"hop": "decode"}]),
    ],
)
def test_an_unreadable_route_is_refused_with_the_reason(raw: str) -> None:
    with pytest.raises(RouteUnreadable):
        parse_route(raw)


def test_stage_views_combine_a_kinds_hops() -> None:
    between = {"transform@high.state": "done", "transform@low.state": "queued", "transform@high.progress": "3/6"}
    assert kind_state(between, Stage.TRANSFORM) == "running", "between two hops the stage is still running"
    assert kind_progress(between, Stage.TRANSFORM) == "3/6"
    later = {**between, "transform@low.state": "running", "transform@low.progress": "5/6"}
    assert kind_progress(later, Stage.TRANSFORM) == "5/6"
    assert kind_state({"transform.state": "done"}, Stage.TRANSFORM) == "done"
    assert kind_state({}, Stage.DECODE) is None
