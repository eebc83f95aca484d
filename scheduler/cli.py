"""The ``reelfarm`` command line: one click group; shared options come from one decorator.

Commands that need torch (``worker``, ``model``) exec a ``python -m workers``
process, so this module -- and ``reelfarm submit/status/wait`` -- run on a
machine with no GPU stack.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from scheduler import jobs
from scheduler.connection import FarmUnreachable, connect_redis
from scheduler.jobs import JobNotFound
from scheduler.settings import FarmSettings, SettingsError, load_settings
from scheduler.spec import SpecError

SPEC_OPTIONS: list[tuple[str, Any, str]] = [
    ("negative_prompt", str, "what to steer away from"),
    ("width", int, "multiple of 16"),
    ("height", int, "multiple of 16"),
    ("frames", int, "4k+1, e.g. 17, 33, 81"),
    ("steps", int, "denoising steps"),
    ("guidance_scale", float, "classifier-free guidance (<= 1 turns CFG off)"),
    ("seed", int, "noise seed (same seed, same video)"),
    ("flow_shift", float, "override the scheduler's flow shift"),
    ("fps", int, "frames per second of the MP4"),
    ("priority", click.Choice(["high", "default", "low"]), "queue priority"),
    ("output_prefix", str, "extra key prefix, e.g. nightly/2026-11-23"),
    ("image", str, "image-to-video: conditioning image (path, s3://bucket/key or http(s) URL)"),
    ("resize", click.Choice(["resize", "center_crop"]), "how the image is fitted to width x height"),
    ("model", str, "which of the farm's models renders it (default: one that does the task)"),
]


def fail(message: str, code: int = 2) -> None:
    click.echo(f"reelfarm: {message}", err=True)
    sys.exit(code)


def farm_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--config`` and turns the farm's user-facing errors into one-line exits."""

    @click.option("--config", type=click.Path(path_type=Path), envvar="REELFARM_CONFIG", help="farm settings YAML")
    @functools.wraps(func)
    def wrapper(*args: Any, config: Path | None, **kwargs: Any) -> Any:
        try:
            return func(*args, settings=load_settings(config), **kwargs)
        except (SettingsError, FarmUnreachable, SpecError, JobNotFound) as exc:
            fail(str(exc).strip("'\""))

    return wrapper


def spec_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name, kind, help_text in reversed(SPEC_OPTIONS):
        func = click.option("--" + name.replace("_", "-"), name, type=kind, default=None, help=help_text)(func)
    func = click.option(
        "--codec", type=click.Choice(["h264", "lossless"]), default=None, help="h264, or lossless RGB for masters"
    )(func)
    func = click.option("--crf", type=int, default=None, help="h264 quality (0-51, lower is better)")(func)
    return func


def spec_from_options(prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"prompt": prompt}
    raw.update({name: options.pop(name) for name, _, _ in SPEC_OPTIONS if options.get(name) is not None})
    codec = {
        k: v for k, v in (("name", options.pop("codec", None)), ("crf", options.pop("crf", None))) if v is not None
    }
    if codec:
        raw["codec"] = codec
    return raw


@click.group()
def main() -> None:
    """reelfarm: a queue-driven farm for batch text-to-video with Wan2.1-class models."""


@main.group()
def model() -> None:
    """Model directories."""


@model.command("tiny")
@click.argument("model_dir", type=click.Path(path_type=Path))
def model_tiny(model_dir: Path) -> None:
    """Write a tiny Wan2.1 text-to-video model in diffusers format (random weights, no downloads)."""
    os.execv(sys.executable, [sys.executable, "-m", "workers.models", "tiny", str(model_dir)])


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("stage", type=click.Choice(["encode", "transform", "decode"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(stage: str, args: tuple[str, ...]) -> None:
    """Run one stage worker (keeps its model loaded; serves jobs until stopped)."""
    os.execv(sys.executable, [sys.executable, "-m", "workers", stage, *args])


@main.command()
@click.argument("prompt")
@spec_options
@click.option("--job-id", default=None, help="choose the job id (re-submitting an id is a no-op)")
@click.option("--json", "as_json", is_flag=True, help="print the job id as JSON")
@farm_command
def submit(prompt: str, settings: FarmSettings, job_id: str | None, as_json: bool, **options: Any) -> None:
    """Validate and queue one job; prints its id."""
    from scheduler.submit import submit as submit_job

    conn = connect_redis(settings)
    new_id = submit_job(conn, settings, spec_from_options(prompt, options), job_id=job_id)
    click.echo(json.dumps({"job_id": new_id}) if as_json else new_id)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def status(job_id: str, settings: FarmSettings, as_json: bool) -> None:
    """Show a job's state, per-stage progress and result."""
    record = jobs.read_status(connect_redis(settings), job_id)
    click.echo(json.dumps(record, indent=2) if as_json else describe_status(record))


@main.command()
@click.argument("job_id")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="seconds to wait")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def wait(job_id: str, settings: FarmSettings, timeout: float, as_json: bool) -> None:
    """Wait for a job to finish, showing progress; exits 1 if it failed."""
    record = wait_for_job(settings, job_id, timeout, quiet=as_json)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    sys.exit(0 if record["state"] == jobs.JobState.SUCCEEDED.value else 1)


@main.command()
@farm_command
def up(settings: FarmSettings) -> None:
    """Start the embedded farm (Valkey, S3 server, one worker per stage) in the background."""
    from scheduler.embedded import EmbeddedFarmError, farm_up

    try:
        farm = farm_up(settings)
    except EmbeddedFarmError as exc:
        fail(str(exc))
    click.echo(
        f"reelfarm is up: redis 127.0.0.1 (password in {farm.state_file}), S3 {farm.s3.endpoint_url}, logs in {farm.home / 'logs'}"
    )


@main.command()
@farm_command
def down(settings: FarmSettings) -> None:
    """Stop the embedded farm started by `reelfarm up`."""
    from scheduler.embedded import farm_down

    stopped = farm_down(settings.home)
    click.echo("stopped: " + ", ".join(stopped) if stopped else "no embedded farm is running")


@main.command()
@click.argument("prompt")
@spec_options
@click.option("--outputs", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True)
@click.option("--keep-up", is_flag=True, help="leave the embedded farm running afterwards")
@farm_command
def run(prompt: str, settings: FarmSettings, outputs: Path, keep_up: bool, **options: Any) -> None:
    """Render one video end to end and download it (starts the embedded farm if nothing is configured)."""
    from scheduler.embedded import EmbeddedFarmError, farm_down, farm_up
    from scheduler.submit import submit as submit_job

    started_here = False
    if not settings.redis_url:
        click.echo("starting the embedded farm (Valkey, S3 server, tiny model, 3 workers)...")
        try:
            settings = farm_up(settings)
        except EmbeddedFarmError as exc:
            fail(str(exc))
        started_here = not keep_up
    try:
        conn = connect_redis(settings)
        job_id = submit_job(conn, settings, spec_from_options(prompt, options))
        click.echo(f"submitted {job_id}")
        record = wait_for_job(settings, job_id, timeout=3600.0, quiet=False)
        if record["state"] != jobs.JobState.SUCCEEDED.value:
            fail(f"job {job_id} failed: {record['error']}", code=1)
        local = download_result(settings, record, outputs)
        click.echo(f"video: {record['result']['video']}")
        click.echo(f"saved: {local}")
    finally:
        if started_here:
            farm_down(settings.home)


def download_result(settings: FarmSettings, record: dict[str, Any], outputs: Path) -> Path:
    from scheduler.object_store import download_to

    outputs.mkdir(parents=True, exist_ok=True)
    local = outputs / f"{record['job_id']}.mp4"
    download_to(settings.s3.client(), settings.s3.bucket, record["result"]["video_key"], local)
    return local


def describe_status(record: dict[str, Any]) -> str:
    lines = [f"{record['job_id']}: {record['state']}"]
    for name, stage in record["stages"].items():
        bits = [stage.get("state", "?")]
        if "progress" in stage:
            bits.append(f"step {stage['progress']}")
        if "attempt" in stage:
            bits.append(f"attempt {stage['attempt']}")
        if "worker" in stage:
            bits.append(f"on {stage['worker']}")
        if "seconds" in stage:
            bits.append(f"{float(stage['seconds']):.1f}s")
        lines.append(f"  {name:<9} " + ", ".join(bits))
    for failure in record.get("failures") or []:
        lines.append(
            f"  failed {failure['stage']} attempt {failure['attempt']} on {failure['worker'] or '?'}: {failure['reason']}"
        )
    if record.get("note"):
        lines.append(f"  {record['note']}")
    if record.get("error"):
        lines.append(f"  error: {record['error']}")
    if record.get("result"):
        lines.append(f"  video: {record['result']['video']}")
    return "\n".join(lines)


def wait_for_job(settings: FarmSettings, job_id: str, timeout: float, quiet: bool) -> dict[str, Any]:
    from scheduler.progress_view import WaitTimedOut
    from scheduler.progress_view import wait_for_job as watch_job

    try:
        return watch_job(connect_redis(settings), job_id, timeout, quiet=quiet)
    except WaitTimedOut as exc:
        fail(str(exc), code=3)
        raise  # unreachable: fail exits


# Operator commands (batch, ls, cancel, retry, info, report, manifest, cron, metrics) live in cli_ops.
from scheduler import cli_ops  # noqa: E402

cli_ops.register(main)
