"""The queue side door is shut: a stage worker runs only the farm's signed stage entrypoint (issue 10).

Unit tests of ``vet_call`` first (no servers), then real worker processes on a
real Valkey with rq jobs planted the way any Redis writer could plant them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from scheduler.core import jobs, keys, stage_calls
from scheduler.core.keys import Stage
from scheduler.core.stage_calls import (
    SIGNATURE_META_KEY,
    STAGE_ENTRYPOINT,
    CallFields,
    CallRefused,
    RefusalReason,
    StageCall,
    sign_call,
    vet_call,
)
from scheduler.intake.submit import submit
from scheduler.ops.metrics import FarmCollector
from tests.farm_fixtures import Farm
from tests.farm_harness import wait_finished, wait_until, worker_logs

REPO = Path(__file__).resolve().parents[1]
SECRET, OLD_SECRET, STRANGER = b"current-secret", b"previous-secret", b"nobody-we-know"
JOB: dict[str, Any] = {"prompt": "a red fox in snow", "width": 64, "height": 48, "frames": 9, "steps": 2}


def signed_fields(call: StageCall, secret: bytes = SECRET, **overrides: Any) -> CallFields:
    rq_job_id = keys.stage_job_id(call.job_id, call.stage, call.attempt)
    base: dict[str, Any] = {
        "rq_job_id": rq_job_id,
        "func_name": STAGE_ENTRYPOINT,
        "kwargs": call.kwargs(),
        "meta": {SIGNATURE_META_KEY: sign_call(secret, rq_job_id, call)},
    }
    return CallFields(**{**base, **overrides})


def refused_reason(fields: CallFields, stage: Stage = Stage.TRANSFORM) -> RefusalReason:
    with pytest.raises(CallRefused) as caught:
        vet_call(fields, stage, (SECRET, OLD_SECRET))
    return caught.value.reason


# ----------------------------------------------------------------------------- unit: vet_call

CALL = StageCall("j1", Stage.TRANSFORM, 2, 1)


def test_a_signed_call_passes_with_the_current_or_the_previous_secret() -> None:
    assert vet_call(signed_fields(CALL), Stage.TRANSFORM, (SECRET, OLD_SECRET)) == CALL
    assert vet_call(signed_fields(CALL, OLD_SECRET), Stage.TRANSFORM, (SECRET, OLD_SECRET)) == CALL


def test_unsigned_and_wrongly_signed_calls_are_refused() -> None:
    assert refused_reason(signed_fields(CALL, meta={})) is RefusalReason.SIGNATURE
    assert refused_reason(signed_fields(CALL, STRANGER)) is RefusalReason.SIGNATURE
    # The signature covers the arguments and the rq job id: moving it to another call breaks it.
    other = StageCall("j1", Stage.TRANSFORM, 3, 1)
    assert refused_reason(signed_fields(other, meta=signed_fields(CALL).meta)) is RefusalReason.SIGNATURE
    assert refused_reason(signed_fields(CALL, rq_job_id="j1-transform-a9")) is RefusalReason.SIGNATURE


@pytest.mark.parametrize("func_name", ["os.system", "workers.stage_job._run_stage", "builtins.eval", None])
def test_any_other_function_is_refused(func_name: str | None) -> None:
    assert refused_reason(signed_fields(CALL, func_name=func_name)) is RefusalReason.FUNCTION


@pytest.mark.parametrize(
    "overrides",
    [
        {"callbacks": ("os.system",)},
        {"webhooks": 1},
        {"dependency_ids": ("other-job",)},
    ],
)
def test_callbacks_webhooks_and_dependencies_are_refused(overrides: dict[str, Any]) -> None:
    assert refused_reason(signed_fields(CALL, **overrides)) is RefusalReason.HOOKS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"job_id": "j1", "stage": "transform", "attempt": 2},  # missing one
        {"job_id": "j1", "stage": "transform", "attempt": 2, "upstream_attempt": 1, "extra": 1},
        {"job_id": "j1", "stage": "transform", "attempt": "2", "upstream_attempt": 1},
        {"job_id": "j1", "stage": "transform", "attempt": True, "upstream_attempt": 1},
        {"job_id": "j1", "stage": "transform", "attempt": 0, "upstream_attempt": 1},
        {"job_id": "j1", "stage": "transform", "attempt": 2, "upstream_attempt": None},
        {"job_id": "../x", "stage": "transform", "attempt": 2, "upstream_attempt": 1},
        {"job_id": "j1", "stage": "decode", "attempt": 2, "upstream_attempt": 1},
        ["j1", "transform", 2, 1],
    ],
)
def test_the_entrypoint_with_wrong_arguments_is_refused(kwargs: Any) -> None:
    assert refused_reason(signed_fields(CALL, kwargs=kwargs)) is RefusalReason.ARGUMENTS


def test_positional_arguments_or_an_instance_are_refused() -> None:
    assert refused_reason(signed_fields(CALL, args=["x"])) is RefusalReason.ARGUMENTS
    for not_a_list in (5, 0, "", {}, None):  # whatever JSON a writer puts there: refused, never a crash
        assert refused_reason(signed_fields(CALL, args=not_a_list)) is RefusalReason.ARGUMENTS
    assert refused_reason(signed_fields(CALL, instance="os")) is RefusalReason.ARGUMENTS


def test_encode_calls_carry_no_upstream_attempt() -> None:
    encode = StageCall("j1", Stage.ENCODE, 1, None)
    assert vet_call(signed_fields(encode), Stage.ENCODE, (SECRET,)) == encode
    kwargs = {**encode.kwargs(), "upstream_attempt": 1}
    assert refused_reason(signed_fields(encode, kwargs=kwargs), Stage.ENCODE) is RefusalReason.ARGUMENTS


# ----------------------------------------------------------------------------- real workers


def plant(conn: redis.Redis, queue_name: str, func: str, *args: Any, **options: Any) -> str:
    """Enqueue straight into a farm queue with rq, as any Redis writer could."""
    job = Queue(queue_name, connection=conn, serializer=JSONSerializer).enqueue(func, *args, **options)
    return str(job.id)


def plant_signed_entrypoint(
    conn: redis.Redis, call: StageCall, secret: bytes, suffix: str = "planted", **options: Any
) -> str:
    """A stage call as the farm would make it, signed with ``secret``, plus whatever ``options`` add."""
    rq_job_id = f"{keys.stage_job_id(call.job_id, call.stage, call.attempt)}-{suffix}"
    meta = {SIGNATURE_META_KEY: sign_call(secret, rq_job_id, call), **options.pop("meta", {})}
    return plant(
        conn,
        keys.queue_name(call.stage),
        STAGE_ENTRYPOINT,
        job_id=rq_job_id,
        meta=meta,
        kwargs=call.kwargs(),
        **options,
    )


def refused_metric(conn: redis.Redis) -> dict[str, float]:
    for family in FarmCollector(conn).collect():
        if family.name == "reelfarm_refused_calls":
            return {sample.labels["reason"]: sample.value for sample in family.samples}
    raise AssertionError("reelfarm_refused_calls is not exported")


def info_json(settings_env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", "from scheduler.cli import main; main()", "info", "--json"],
        env=settings_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def rotating_farm(make_farm: Callable[..., Farm]) -> Farm:
    """Workers mid-rotation: they sign with the new secret and still accept the old one.

    A farm of its own for each test: a secret pair no other farm has, and refusals counted from zero."""
    return make_farm(secret=SECRET.decode(), previous_secret=OLD_SECRET.decode())


@pytest.mark.slow
def test_planted_rq_jobs_never_run_and_the_farm_goes_on(rotating_farm: Farm, redis_url: str, tmp_path: Path) -> None:
    settings, conn = rotating_farm.settings, rotating_farm.conn
    markers = tmp_path / "markers"
    markers.mkdir()
    # PYTHONPATH: if a worker ever imported what a planted job names, tests.planted_calls would import.
    fleet = rotating_farm.fleet({"PYTHONPATH": str(REPO)})
    # A real job whose own encode call is taken away before any worker can see it (planted ones follow).
    waiting = submit(conn, settings, JOB)
    conn.delete(Queue(keys.queue_name(Stage.ENCODE), connection=conn).key)
    # As a farm that has been running on this server: its first maintenance pass must not take this Redis for
    # a new primary after a failover, whose reconcile sweep would put the removed call back (scheduler.core.reconcile).
    conn.set(keys.server_run_key(), str(conn.info("server")["run_id"]))
    fleet.start(*Stage)
    planted: dict[str, str] = {}
    # 1. Any function, on every stage's queue (and a priority queue).
    for stage in Stage:
        name = keys.queue_name(stage)
        planted[plant(conn, name, "tests.planted_calls.touch", str(markers / f"func-{stage}"))] = "function"
        planted[plant(conn, name, "os.system", f"touch {markers / f'system-{stage}'}")] = "function"
    planted[plant(conn, keys.queue_name(Stage.DECODE, "high"), "tests.planted_calls.touch", str(markers / "hi"))] = (
        "function"
    )
    # 2. The entrypoint for a real queued job: unsigned, signed by a stranger, mistyped arguments.
    real = StageCall(waiting, Stage.ENCODE, 1, None)
    planted[plant(conn, keys.queue_name(Stage.ENCODE), STAGE_ENTRYPOINT, kwargs=real.kwargs())] = "signature"
    planted[plant_signed_entrypoint(conn, real, STRANGER)] = "signature"
    bad_args = {**real.kwargs(), "attempt": "1"}
    planted[plant(conn, keys.queue_name(Stage.ENCODE), STAGE_ENTRYPOINT, kwargs=bad_args)] = "arguments"
    # 3. The real entrypoint, correctly signed, with an rq callback attached: only the hook check stops it.
    victim = StageCall("planted-victim", Stage.ENCODE, 1, None)
    for hook in ("on_success", "on_failure", "on_stopped"):
        rq_id = plant_signed_entrypoint(
            conn,
            victim,
            SECRET,
            suffix=hook,
            meta={"marker": str(markers / f"callback-{hook}")},
            **{hook: Callback("tests.planted_calls.touch_from_meta")},
        )
        planted[rq_id] = "hooks"

    wait_until(lambda: sum(stage_calls.refusal_counts(conn).values()) >= len(planted), 60, "every refusal")
    assert list(markers.iterdir()) == [], "a planted call or callback ran"
    recorded = {r.rq_job_id: r.reason for r in stage_calls.recent_refusals(conn, limit=100)}
    assert recorded == planted
    expected_counts: dict[str, float] = {}
    for reason in planted.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert refused_metric(conn) == expected_counts
    # Out of rq entirely: nothing left to requeue.
    for rq_id in planted:
        assert not conn.exists(f"rq:job:{rq_id}")
    # The job whose call was refused is failed with the fix, not left queued forever.
    failed = jobs.read_status(conn, waiting)
    assert failed["state"] == "failed" and "REELFARM_SECRET" in failed["error"], failed
    assert failed["stages"]["encode"].get("worker") is None, "the refused call must not have started"

    env = {
        **os.environ,
        "REELFARM_REDIS_URL": redis_url,
        "REELFARM_SECRET": SECRET.decode(),
        "REELFARM_HOME": str(tmp_path / "cli-home"),
    }
    shown = info_json(env)["refused_calls"]
    assert {r["rq_job_id"] for r in shown["recent"]} <= set(planted) and len(shown["recent"]) == 10
    assert shown["counts"] == {k: int(v) for k, v in expected_counts.items()}

    good = submit(conn, settings, JOB)
    assert wait_finished(conn, good, timeout=120)["state"] == "succeeded", worker_logs(settings)
    assert fleet.all_alive(), "a worker died"


@pytest.mark.slow
def test_secret_rotation_without_draining(rotating_farm: Farm) -> None:
    settings, conn = rotating_farm.settings, rotating_farm.conn
    fleet = rotating_farm.fleet()
    fleet.start(*Stage)
    new = submit(conn, settings, JOB)
    old = submit(conn, settings.model_copy(update={"secret": OLD_SECRET.decode(), "previous_secret": None}), JOB)
    stranger = submit(conn, settings.model_copy(update={"secret": STRANGER.decode(), "previous_secret": None}), JOB)
    assert wait_finished(conn, new, timeout=120)["state"] == "succeeded", worker_logs(settings)
    assert wait_finished(conn, old, timeout=120)["state"] == "succeeded", worker_logs(settings)
    refused = wait_finished(conn, stranger, timeout=60)
    assert refused["state"] == "failed" and "signature matches neither" in refused["error"]
    assert stage_calls.refusal_counts(conn) == {"signature": 1}
