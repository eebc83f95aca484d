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

from scheduler.core import jobs, keys, recovery
from scheduler.core.job_record import (
    FINISHED_STATES,
    VANISHED,
    CheckpointRef,
    JobState,
    StageField,
    StageState,
    checkpoint_ref,
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


# --- checkpoints in the record (issue 15) ------------------------------------------------------------


def test_a_checkpoint_is_named_only_for_the_current_attempt_of_an_unfinished_job(conn: redis.Redis) -> None:
    ref = CheckpointRef("checkpoints/j/transform-a2.latents", "xxh3_128:00", 10, 2, 8)
    current = plant(conn, JobState.RUNNING, **{stage_field(Stage.TRANSFORM, StageField.ATTEMPT): "2"})
    assert jobs.record_checkpoint(conn, current, Stage.TRANSFORM, 2, StageField.CHECKPOINT, ref.to_json())
    assert checkpoint_ref(jobs.job_fields(conn, current), Stage.TRANSFORM, StageField.CHECKPOINT) == ref
    assert not jobs.record_checkpoint(conn, current, Stage.TRANSFORM, 1, StageField.CHECKPOINT, ref.to_json())
    for state in FINISHED_STATES:
        done = plant(conn, state, **{stage_field(Stage.TRANSFORM, StageField.ATTEMPT): "2"})
        assert not jobs.record_checkpoint(conn, done, Stage.TRANSFORM, 2, StageField.CHECKPOINT, ref.to_json())
        # Kept for retention: a succeeded job still takes its latents (the decode may win the race); nothing else.
        kept = jobs.record_checkpoint(conn, done, Stage.TRANSFORM, 2, StageField.CHECKPOINT, ref.to_json(), kept=True)
        assert kept is (state is JobState.SUCCEEDED)
    # A value planted by hand is no checkpoint.
    for planted in (
        "{not json",
        "[]",
        '{"key": "k"}',
        '{"key": "k", "checksum": "c", "bytes": "x", "attempt": 1, "step": 1}',
    ):
        assert checkpoint_ref({"transform.checkpoint": planted}, Stage.TRANSFORM, StageField.CHECKPOINT) is None


def test_a_failed_decode_restarts_at_decode_when_the_latents_are_checkpointed(conn: redis.Redis) -> None:
    ref = CheckpointRef("checkpoints/j/transform-a1.latents", "xxh3_128:00", 10, 1, 8)
    done = {stage_field(Stage.TRANSFORM, StageField.STATE): StageState.DONE.value}
    attempts = {stage_field(stage, StageField.ATTEMPT): "1" for stage in Stage}
    without = plant(conn, JobState.RUNNING, **done, **attempts)
    assert recovery.plan_restart(conn, without, Stage.DECODE, jobs.job_fields(conn, without)).stage is Stage.ENCODE
    with_ref = plant(conn, JobState.RUNNING, **done, **attempts, **{"transform.checkpoint": ref.to_json()})
    plan = recovery.plan_restart(conn, with_ref, Stage.DECODE, jobs.job_fields(conn, with_ref))
    assert (plan.stage, plan.upstream_attempt) == (Stage.DECODE, 1), "no DiT re-run: decode reads the checkpoint"
    jobs.forget_checkpoint(conn, with_ref, Stage.TRANSFORM, StageField.CHECKPOINT)
    assert recovery.plan_restart(conn, with_ref, Stage.DECODE, jobs.job_fields(conn, with_ref)).stage is Stage.ENCODE


def test_status_shows_the_recovery_path_and_the_dit_steps_computed() -> None:
    from scheduler.cli.job_commands import describe_status

    record = {
        "job_id": "j1",
        "state": "succeeded",
        "stages": {
            "transform": {
                "state": "done",
                "attempt": "2",
                "recovery": "pulled; resumed at step 6",
                "steps_computed": "8",
            },
            "decode": {"state": "done", "attempt": "1", "recovery": "from checkpoint (transform attempt 2)"},
        },
    }
    text = describe_status(record)
    assert "input pulled; resumed at step 6, DiT steps computed 8" in text
    assert "input from checkpoint (transform attempt 2)" in text


def test_progress_writes_count_each_step_and_a_cancel_stops_the_very_next_step(conn: redis.Redis) -> None:
    job_id = "jprogress0000000000001"
    key = keys.job_key(job_id)
    conn.hset(key, "state", "running")
    progress = jobs.ProgressWrites(conn, job_id, Stage.TRANSFORM)
    assert not progress.should_stop()
    progress.on_step(1, 3)
    assert not progress.should_stop()
    # A cancel that lands after a step's write (during a save or a pause) stops the next step.
    conn.hset(key, "cancel_requested", "1")
    assert progress.should_stop()
    progress.on_step(2, 3)
    progress.on_step(3, 3)
    fields = jobs.job_fields(conn, job_id)
    assert fields["transform.progress"] == "3/3" and fields["transform.steps_computed"] == "3"
