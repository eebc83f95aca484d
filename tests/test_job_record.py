"""The job record's vocabulary: field names from one function, and Lua scripts that agree with the enums.

The scripts in ``jobs`` and ``job_admin`` get their state values injected from
``JobState``/``StageState``; these tests run each of them, on a real Valkey,
against a record in every job state, so a script that drifted from
``JobState.finished`` fails here.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import redis

from scheduler.core import jobs, keys
from scheduler.core.job_record import (
    FINISHED_STATES,
    VANISHED,
    JobState,
    StageField,
    StageState,
    count_states,
    lua_finished,
    read_records,
    routing_of,
    stage_field,
)
from scheduler.core.keys import Stage
from scheduler.core.spec import JobSpec
from scheduler.ops import job_admin


def test_stage_fields_are_named_in_one_place() -> None:
    assert stage_field(Stage.TRANSFORM, StageField.ATTEMPT) == "transform.attempt"
    assert stage_field("decode", StageField.PROGRESS) == "decode.progress"


def test_lua_finished_names_exactly_the_finished_states() -> None:
    condition = lua_finished("s")
    for state in JobState:
        assert (f"'{state.value}'" in condition) == state.finished
    assert {JobState(s) for s in ("succeeded", "failed", "cancelled")} == FINISHED_STATES


def test_routing_parses_the_spec_and_survives_an_unreadable_one() -> None:
    spec = JobSpec(prompt="a cat", priority="high", model="i2v")
    assert routing_of(spec.to_json()) == routing_of(spec.model_dump_json())
    assert (routing_of(spec.to_json()).priority, routing_of(spec.to_json()).model) == ("high", "i2v")
    assert (routing_of("{not json").priority, routing_of(None).model) == ("default", "default")


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def plant(conn: redis.Redis, state: JobState, **extra: str) -> str:
    job_id = "j" + secrets.token_hex(6)
    fields: dict[str, Any] = {
        "spec": JobSpec(prompt="a cat").to_json(),
        "state": state.value,
        "stage": Stage.ENCODE.value,
        stage_field(Stage.ENCODE, StageField.STATE): StageState.QUEUED.value,
        stage_field(Stage.ENCODE, StageField.ATTEMPT): "1",
        **extra,
    }
    conn.hset(keys.job_key(job_id), mapping=fields)
    return job_id


@pytest.mark.parametrize("state", list(JobState))
def test_every_script_treats_finished_states_as_the_enum_does(conn: redis.Redis, state: JobState) -> None:
    started = plant(conn, state)
    assert jobs.mark_stage_started(conn, started, Stage.ENCODE, "w1", 1) is (not state.finished)
    assert jobs.fail_if_waiting(conn, plant(conn, state), Stage.ENCODE, 1, "x") is (not state.finished)
    assert job_admin.request_cancel(conn, plant(conn, state)) is (not state.finished)
    outcome = job_admin.cancel_job(conn, plant(conn, state))
    assert (outcome == "finished") is state.finished


def test_a_started_stage_is_running_in_the_record(conn: redis.Redis) -> None:
    job_id = plant(conn, JobState.QUEUED)
    assert jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "w1", 1)
    fields = jobs.job_fields(conn, job_id)
    assert fields["state"] == JobState.RUNNING and fields["encode.state"] == StageState.RUNNING
    assert fields["encode.worker"] == "w1"
    assert not jobs.mark_stage_started(conn, job_id, Stage.ENCODE, "w2", 1), "one attempt starts once"


def test_records_are_read_in_chunks_and_vanished_ones_are_none(conn: redis.Redis) -> None:
    ids = [plant(conn, JobState.QUEUED) for _ in range(3)]
    ids.insert(1, "jgone")
    read = list(read_records(conn, ids, ("state", "spec")))
    assert [job_id for job_id, _ in read] == ids
    assert [record is None for _, record in read] == [False, True, False, False]
    assert dict(read_records(conn, ids))["jgone"] is None
    assert count_states(conn, ids) == {"queued": 3, VANISHED: 1}
