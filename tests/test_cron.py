"""Cron schedules: tick arithmetic in time zones, config errors, and exactly-once ticks across processes (real Valkey)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from scheduler.core import jobs, keys, queues
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from scheduler.local.embedded import write_settings_file
from scheduler.ops import batch
from scheduler.ops.cron import CronConfigError, CronRunner, load_cron_config, parse_when, tick_batch_name

REPO = Path(__file__).resolve().parents[1]
TINY = {"width": 64, "height": 48, "frames": 17, "steps": 2}


def write_cron(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cron.yaml"
    path.write_text(body)
    return path


def runner(redis_url: str, cron_file: Path, **options: float) -> CronRunner:
    config, base = load_cron_config(cron_file)
    settings = FarmSettings(redis_url=redis_url, secret="s")
    return CronRunner(redis.Redis.from_url(redis_url), settings, config, base, **options)  # type: ignore[arg-type]


NIGHTLY = """
schedules:
  nightly:
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    batch: prompts.jsonl
    priority: low
    output_prefix: nightly/{date}
    defaults: {steps: 2}
"""


def test_shipped_cron_file_is_valid() -> None:
    config, _ = load_cron_config(REPO / "configs" / "cron.yaml")
    assert config.schedules, "configs/cron.yaml defines no schedules"


def test_ticks_follow_the_schedules_time_zone(redis_url: str, tmp_path: Path) -> None:
    run = runner(redis_url, write_cron(tmp_path, NIGHTLY))
    (schedule,) = run.config.schedules.values()
    # 02:00 in Berlin is 00:00 UTC in summer (CEST) and 01:00 UTC in winter (CET).
    assert [s.name for s, _ in run.due_at(parse_when("2026-07-01T00:00:00Z"))] == ["nightly"]
    assert [s.name for s, _ in run.due_at(parse_when("2026-07-01T00:04:59Z"))] == ["nightly"]
    assert run.due_at(parse_when("2026-07-01T00:05:01Z")) == []  # past the 300 s grace
    assert run.due_at(parse_when("2026-12-01T00:00:00Z")) == []
    winter = run.due_at(parse_when("2026-12-01T01:00:30Z"))
    assert [t.astimezone(UTC) for _, t in winter] == [datetime(2026, 12, 1, 1, 0, tzinfo=UTC)]
    assert tick_batch_name("nightly", winter[0][1]) == "nightly-20261201T0100Z"
    assert schedule.next_tick(parse_when("2026-07-01T00:00:00Z")).astimezone(UTC) == datetime(
        2026, 7, 2, 0, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("schedules:\n  a:\n    cron: '61 * * * *'\n    specs: [{prompt: x}]\n", "not a cron expression"),
        ("schedules:\n  a:\n    cron: '0 * * * *'\n    timezone: Mars/Olympus\n    specs: []\n", "unknown time zone"),
        ("schedules:\n  a:\n    cron: '0 * * * *'\n", "exactly one of 'batch'"),
        ("schedules:\n  a:\n    cron: '0 * * * *'\n    specs: []\n    output_prefix: '../x'\n", "output_prefix"),
        ("schedules:\n  a:\n    cron: '0 * * * *'\n    specs: []\n    defaults: {stpes: 2}\n", "stpes"),
        ("schedules:\n  a b:\n    cron: '0 * * * *'\n    specs: []\n", "schedule name"),
    ],
)
def test_config_errors_are_one_line(redis_url: str, tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(CronConfigError, match=message) as info:
        load_cron_config(write_cron(tmp_path, body))
    assert "\n" not in str(info.value)


def test_tick_submits_the_batch_file_with_overrides(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"p{i}", **TINY, "priority": "high"}) for i in range(3)) + '\n{"prompt": ""}\n'
    )
    run = runner(redis_url, write_cron(tmp_path, NIGHTLY))
    (outcome,) = run.run_once_at(parse_when("2026-07-01T00:00:10Z"))
    assert outcome.claimed and outcome.batch == "nightly-20260701T0000Z" and outcome.created == 3
    assert outcome.invalid == ["line 4: prompt: String should have at least 1 character"]
    conn = run.conn
    ids = batch.batch_job_ids(conn, outcome.batch)
    spec = jobs.load_spec(conn, ids[0])
    # The schedule's priority wins over the line's; the prefix has the tick's date in Berlin.
    assert (spec.priority, spec.output_prefix, spec.steps) == ("low", "nightly/2026-07-01", 2)
    assert queues.stage_queue(conn, Stage.ENCODE, "low").count == 3
    assert conn.get(keys.cron_tick_key("nightly", int(outcome.tick.timestamp()))) == b"done:nightly-20260701T0000Z"

    # The same tick again (a restarted cron process) enqueues nothing.
    (again,) = run.run_once_at(parse_when("2026-07-01T00:01:00Z"))
    assert not again.claimed and "already done" in again.describe()


def test_concurrent_runners_enqueue_a_tick_once(redis_url: str, tmp_path: Path) -> None:
    body = "schedules:\n  burst:\n    cron: '*/5 * * * *'\n    specs:\n" + "".join(
        f"      - {{prompt: shot {i}, seed: {i}, steps: 2, width: 64, height: 48, frames: 17}}\n" for i in range(20)
    )
    cron_file = write_cron(tmp_path, body)
    runners = [runner(redis_url, cron_file) for _ in range(6)]
    barrier = threading.Barrier(len(runners))
    outcomes = []

    def go(r: CronRunner) -> None:
        barrier.wait()
        outcomes.extend(r.run_once_at(parse_when("2026-03-01T12:10:03Z")))

    threads = [threading.Thread(target=go, args=(r,)) for r in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(o.claimed for o in outcomes) == 1
    conn = redis.Redis.from_url(redis_url)
    assert conn.zcard(keys.batches_index_key()) == 1
    assert queues.stage_queue(conn, Stage.ENCODE).count == 20


def test_two_cron_processes_same_tick_one_batch(redis_url: str, tmp_path: Path) -> None:
    cron_file = write_cron(
        tmp_path,
        "schedules:\n  twice:\n    cron: '0 * * * *'\n    specs:\n"
        + "".join(f"      - {{prompt: take {i}, steps: 2, width: 64, height: 48, frames: 17}}\n" for i in range(10)),
    )
    settings = FarmSettings(redis_url=redis_url, secret=secrets.token_hex(8))
    config = write_settings_file(settings, tmp_path / "farm.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REELFARM_")}
    command = [sys.executable, "-c", "from scheduler.cli import main; main()", "cron", "--config", str(config)]
    command += ["--schedules", str(cron_file), "--once-at", "2026-05-05T10:00:30Z"]
    procs = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    claimed = [o for o in outputs if "jobs queued" in o]
    skipped = [o for o in outputs if "by another cron process" in o]
    assert len(claimed) == 1 and len(skipped) == 1, outputs
    conn = redis.Redis.from_url(redis_url)
    names: list[bytes] = conn.zrange(keys.batches_index_key(), 0, -1)  # type: ignore[assignment]
    assert [m.decode() for m in names] == ["twice-20260505T1000Z"]
    assert queues.stage_queue(conn, Stage.ENCODE).count == 10


def test_a_dead_claim_is_taken_over_after_its_lease(redis_url: str, tmp_path: Path) -> None:
    cron_file = write_cron(
        tmp_path, "schedules:\n  lease:\n    cron: '0 * * * *'\n    specs: [{prompt: x, steps: 2}]\n"
    )
    run = runner(redis_url, cron_file)
    when = parse_when("2026-05-05T10:00:30Z")
    ((schedule, tick),) = run.due_at(when)
    # Another process claimed the tick and died before submitting.
    run.conn.set(keys.cron_tick_key("lease", int(tick.timestamp())), "running:dead-host", px=150)
    (blocked,) = run.run_once_at(when)
    assert not blocked.claimed and "already running" in blocked.describe()
    threading.Event().wait(0.3)
    (taken,) = run.run_once_at(when)
    assert taken.claimed and taken.created == 1


def test_run_forever_fires_due_ticks_and_stops(redis_url: str, tmp_path: Path) -> None:
    # Every minute, with a grace wide enough that the tick just before start-up counts.
    cron_file = write_cron(
        tmp_path,
        "schedules:\n  live:\n    cron: '* * * * *'\n    misfire_grace_seconds: 120\n    specs: [{prompt: x}]\n",
    )
    run = runner(redis_url, cron_file)
    stop = threading.Event()
    thread = threading.Thread(target=run.run_forever, args=(stop,), kwargs={"max_sleep": 0.2})
    thread.start()
    try:
        deadline = datetime.now(UTC).timestamp() + 10
        while not run.conn.zcard(keys.batches_index_key()) and datetime.now(UTC).timestamp() < deadline:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert run.conn.zcard(keys.batches_index_key()) >= 1
