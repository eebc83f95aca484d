"""The CLI against a real Valkey: bad input is refused in one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from scheduler.core.queues import queue_depths


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from scheduler.cli import main; main()", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def farm_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {"REELFARM_REDIS_URL": redis_url, "REELFARM_SECRET": "s", "REELFARM_HOME": str(tmp_path / "home")}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--width", "100"], "width: must be a multiple of 16"),
        (["--width", "4096"], "is over this farm's maximum"),
        (["--frames", "20"], "frames: must be 4k+1"),
        (["--frames", "401"], "frames: 401 is over"),
        (["--steps", "0"], "steps"),
        (["--steps", "1000"], "steps: 1000 is over"),
        (["--cache", "teacache"], "cache.method: Input should be 'first_block'"),
        (["--cache", "first_block:lots"], "cache.threshold: Input should be a valid number"),
        (["--cache", "first_block:2"], "cache.threshold: Input should be less than or equal to 1"),
    ],
)
def test_bad_submit_is_one_line_and_enqueues_nothing(
    farm_env: dict[str, str], redis_url: str, args: list[str], fragment: str
) -> None:
    done = run_cli(["submit", "a fox", *args], farm_env)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    conn = redis.Redis.from_url(redis_url)
    assert list(conn.scan_iter("reelfarm:*")) == []
    assert sum(queue_depths(conn).values()) == 0


def test_empty_and_overlong_prompts_are_refused(farm_env: dict[str, str], redis_url: str) -> None:
    assert "prompt" in run_cli(["submit", "   "], farm_env).stderr
    assert "characters is over" in run_cli(["submit", "x" * 5000], farm_env).stderr
    assert list(redis.Redis.from_url(redis_url).scan_iter("reelfarm:*")) == []


def test_submit_json_then_status(farm_env: dict[str, str], redis_url: str) -> None:
    done = run_cli(
        [
            "submit",
            "a fox",
            "--width",
            "64",
            "--height",
            "64",
            "--frames",
            "17",
            "--cache",
            "first_block:0.1",
            "--json",
        ],
        farm_env,
    )
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    status = run_cli(["status", job_id, "--json"], farm_env)
    record = json.loads(status.stdout)
    assert record["state"] == "queued"
    assert record["spec"]["width"] == 64
    assert record["spec"]["cache"] == {"method": "first_block", "threshold": 0.1}
    assert queue_depths(redis.Redis.from_url(redis_url))["encode"] == 1


def test_status_of_unknown_job(farm_env: dict[str, str]) -> None:
    done = run_cli(["status", "nope"], farm_env)
    assert done.returncode == 2
    assert "job nope not found" in done.stderr


def test_unreachable_redis_is_a_clear_message(tmp_path: Path) -> None:
    env = {"REELFARM_REDIS_URL": "redis://127.0.0.1:1/0", "REELFARM_HOME": str(tmp_path)}
    done = run_cli(["submit", "a fox"], env)
    assert done.returncode == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in done.stderr
    assert "Traceback" not in done.stderr


def run_worker(stage: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", stage],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_exits_clearly_without_redis(tmp_path: Path) -> None:
    done = run_worker(
        "encode",
        {"REELFARM_REDIS_URL": "redis://127.0.0.1:1/0", "REELFARM_SECRET": "s", "REELFARM_HOME": str(tmp_path)},
    )
    assert done.returncode == 2
    assert "cannot reach Redis" in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_exits_clearly_without_model_dir(farm_env: dict[str, str], tmp_path: Path) -> None:
    done = run_worker("transform", {**farm_env, "REELFARM_MODEL_DIR": str(tmp_path / "missing")})
    assert done.returncode == 2
    assert str(tmp_path / "missing") in done.stderr
    assert "Traceback" not in done.stderr


def test_decode_worker_exits_clearly_without_s3(farm_env: dict[str, str], tiny_model_dir: Path) -> None:
    env = {
        **farm_env,
        "REELFARM_MODEL_DIR": str(tiny_model_dir),
        "REELFARM_S3_ENDPOINT": "http://127.0.0.1:1",
        "REELFARM_S3_ACCESS_KEY": "a",
        "REELFARM_S3_SECRET_KEY": "b",
    }
    done = run_worker("decode", env)
    assert done.returncode == 2
    assert "127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr
