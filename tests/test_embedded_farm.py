"""The embedded farm with several workers per stage (``reelfarm up --workers``): the plan, and a real farm."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from scheduler.core.connection import connect_redis
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings, SettingsError, load_settings, parse_worker_counts
from scheduler.core.worker_registry import live_workers
from scheduler.intake.submit import submit
from scheduler.local.embedded import farm_down, farm_up, plan_workers, read_state
from scheduler.local.processes import pid_alive
from tests.farm_harness import wait_finished


def test_worker_counts_parse_and_refuse_in_one_line() -> None:
    assert parse_worker_counts("transform=2, decode=3") == {"transform": 2, "decode": 3}
    with pytest.raises(SettingsError, match="write STAGE=COUNT"):
        parse_worker_counts("transform:2")
    with pytest.raises(SettingsError, match="unknown stage 'dit'"):
        FarmSettings().with_worker_counts({"dit": 2})
    with pytest.raises(SettingsError, match="between 1 and 16"):
        FarmSettings().with_worker_counts({"decode": 0})
    layout = FarmSettings().with_worker_counts({"transform": 2}).worker_layout()
    assert layout == {Stage.ENCODE: 1, Stage.TRANSFORM: 2, Stage.DECODE: 1}


def test_worker_counts_come_from_the_environment_too() -> None:
    settings = load_settings(env={"REELFARM_WORKERS": "transform=3"})
    assert settings.worker_layout()[Stage.TRANSFORM] == 3


def test_more_workers_than_cpus_run_one_thread_each_unpinned() -> None:
    slots = plan_workers({Stage.ENCODE: 1, Stage.TRANSFORM: 1, Stage.DECODE: 1}, [0, 1])
    assert [(s.stage, s.threads, s.cpus) for s in slots] == [(stage, 1, None) for stage in Stage]
    slots = plan_workers({Stage.ENCODE: 1, Stage.TRANSFORM: 3, Stage.DECODE: 2}, [0, 1, 2, 3])
    assert [s.threads for s in slots] == [1, 1, 1, 1, 1, 1]


def test_workers_get_disjoint_cpus_and_spare_ones_go_to_the_dit() -> None:
    layout = {Stage.ENCODE: 1, Stage.TRANSFORM: 2, Stage.DECODE: 1}
    slots = plan_workers(layout, list(range(7)))
    assert [s.name for s in slots] == ["encode-0", "transform-0", "transform-1", "decode-0"]
    assert [s.threads for s in slots] == [1, 3, 2, 1]
    cpus = [cpu for s in slots for cpu in sorted(s.cpus or ())]
    assert sorted(cpus) == list(range(7)) and len(cpus) == len(set(cpus))
    assert all(s.threads == len(s.cpus or ()) for s in slots)


@pytest.mark.slow
@pytest.mark.integration
def test_up_with_two_transform_workers_serves_jobs_and_down_stops_them_all(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Own farm: this is `reelfarm up` itself, servers and all, with two transform workers.
    settings = FarmSettings(home=tmp_path / "farm", model_dir=tiny_model_dir).with_worker_counts({"transform": 2})
    farm = farm_up(settings)
    try:
        conn = connect_redis(farm)
        by_stage: dict[str, int] = {}
        for worker in live_workers(conn):
            by_stage[worker["stage"]] = by_stage.get(worker["stage"], 0) + 1
        assert by_stage == {"encode": 1, "transform": 2, "decode": 1}
        job_ids = [submit(conn, farm, {"prompt": f"a fox {i}", "steps": 2, "frames": 9}) for i in range(3)]
        assert [wait_finished(conn, j, timeout=180)["state"] for j in job_ids] == ["succeeded"] * 3
        state = read_state(farm.home) or {}
        pids = state["pids"]
        assert sorted(pids) == ["decode-0", "encode-0", "http", "s3", "transform-0", "transform-1", "valkey"]
        # The HTTP front runs on loopback with the generated key, which only the 0600 state file holds.
        assert farm.http.host == "127.0.0.1" and state["api_key"] not in farm.model_dump_json()
        front = http.client.HTTPConnection(farm.http.host, farm.http.port, timeout=10)
        front.request("GET", "/v1/videos", headers={"Authorization": f"Bearer {state['api_key']}"})
        listed = json.loads(front.getresponse().read())
        assert sorted(v["id"] for v in listed["data"]) == sorted(job_ids)
    finally:
        stopped = farm_down(farm.home)
    assert sorted(stopped) == sorted(pids)
    assert not any(pid_alive(pid) for pid in pids.values())
