"""One job at a time: ``submit``, ``status``, ``wait`` and ``run`` (up, submit, wait, download, down)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from scheduler.cli.common import fail, farm_command, spec_from_options, spec_options
from scheduler.core import jobs
from scheduler.core.connection import connect_redis
from scheduler.core.settings import FarmSettings


@click.command()
@click.argument("prompt")
@spec_options
@click.option("--job-id", default=None, help="choose the job id (re-submitting an id is a no-op)")
@click.option("--json", "as_json", is_flag=True, help="print the job id as JSON")
@farm_command
def submit(prompt: str, settings: FarmSettings, job_id: str | None, as_json: bool, **options: Any) -> None:
    """Validate and queue one job; prints its id."""
    from scheduler.intake.submit import submit as submit_job

    conn = connect_redis(settings)
    new_id = submit_job(conn, settings, spec_from_options(prompt, options), job_id=job_id)
    click.echo(json.dumps({"job_id": new_id}) if as_json else new_id)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def status(job_id: str, settings: FarmSettings, as_json: bool) -> None:
    """Show a job's state, per-stage progress and result."""
    record = jobs.read_status(connect_redis(settings), job_id)
    click.echo(json.dumps(record, indent=2) if as_json else describe_status(record))


@click.command()
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


@click.command("decode-from")
@click.argument("job_id")
@click.option("--codec", type=click.Choice(["h264", "lossless"]), default=None, help="render with this codec instead")
@click.option("--crf", type=int, default=None, help="h264 quality (0-51, lower is better)")
@click.option("--wait", "wait_", is_flag=True, help="wait for the new video, showing progress")
@click.option(
    "--allow-recompute",
    is_flag=True,
    help="when the latents checkpoint is gone, run the whole job again (encode and the DiT) instead of refusing",
)
@farm_command
def decode_from(
    job_id: str, settings: FarmSettings, codec: str | None, crf: int | None, wait_: bool, allow_recompute: bool
) -> None:
    """Re-render a finished job's video from its latents checkpoint (a new decode only, no DiT)."""
    from scheduler.core.keys import Stage
    from scheduler.core.object_store import object_exists
    from scheduler.ops.rerender import decode_from as queue_decode

    options = {k: v for k, v in (("name", codec), ("crf", crf)) if v is not None}
    s3, bucket = settings.s3.client(), settings.s3.bucket
    queued = queue_decode(
        connect_redis(settings),
        job_id,
        options or None,
        secret=settings.require_secret(),
        checkpoint_exists=lambda key: object_exists(s3, bucket, key),
        allow_recompute=allow_recompute,
    )
    if queued.stage is Stage.DECODE:
        click.echo(f"{job_id}: decode attempt {queued.attempt} queued from the latents checkpoint")
    else:
        click.echo(f"{job_id}: latents checkpoint gone; the whole job is queued again (attempt {queued.attempt})")
    if wait_:
        record = wait_for_job(settings, job_id, 3600.0, quiet=False)
        if record["state"] != jobs.JobState.SUCCEEDED.value:
            fail(f"job {job_id}: decode-from failed: {record['error']}", code=1)
        click.echo(f"video: {record['result']['video']}")


@click.command()
@click.argument("prompt")
@spec_options
@click.option("--outputs", type=click.Path(path_type=Path), default=Path("outputs"), show_default=True)
@click.option("--keep-up", is_flag=True, help="leave the embedded farm running afterwards")
@farm_command
def run(prompt: str, settings: FarmSettings, outputs: Path, keep_up: bool, **options: Any) -> None:
    """Render one video end to end and download it (starts the embedded farm if nothing is configured)."""
    from scheduler.intake.submit import submit as submit_job
    from scheduler.local.embedded import farm_down, farm_up

    started_here = False
    if not settings.redis_url:
        click.echo("starting the embedded farm (Valkey, S3 server, tiny model, 3 workers)...")
        settings = farm_up(settings)
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
    from scheduler.core.object_store import download_to

    outputs.mkdir(parents=True, exist_ok=True)
    local = outputs / f"{record['job_id']}.mp4"
    download_to(settings.s3.client(), settings.s3.bucket, record["result"]["video_key"], local)
    return local


def describe_status(record: dict[str, Any]) -> str:
    lines = [f"{record['job_id']}: {record['state']}"]
    spec: dict[str, Any] = record["spec"] if isinstance(record.get("spec"), dict) else {}
    if spec.get("loras"):
        lines.append("  loras     " + ", ".join(f"{c['name']}@{c['scale']:g}" for c in spec["loras"]))
    route = record.get("route") or []
    if route and len(route) != 3:  # the common three-hop route goes without saying
        lines.append(f"  route: {' -> '.join(route)}")
    width = max([9, *(len(name) for name in record["stages"])])
    for name, stage in record["stages"].items():
        bits = [stage.get("state", "?")]
        if "steps" in stage:
            bits.append(f"steps {stage['steps'][0]}-{stage['steps'][1]}")
        if "progress" in stage:
            bits.append(f"step {stage['progress']}")
        if "attempt" in stage:
            bits.append(f"attempt {stage['attempt']}")
        if "worker" in stage:
            bits.append(f"on {stage['worker']}")
        if "recovery" in stage:
            bits.append(f"input {stage['recovery']}")
        if "steps_computed" in stage:
            bits.append(f"DiT steps computed {stage['steps_computed']}")
        if "checkpoint" in stage:
            bits.append("latents checkpointed")
        if "seconds" in stage:
            bits.append(f"{float(stage['seconds']):.1f}s")
        lines.append(f"  {name:<{width}} " + ", ".join(bits))
    if record.get("preemptions"):
        lines.append(f"  preempted {record['preemptions']} times (handed back by stopping workers; not failures)")
    if record.get("recovery"):
        lines.append(f"  recovery: {record['recovery']}")
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
    from scheduler.ops.progress_view import wait_for_job as watch_job

    # A timeout is a WaitTimedOut (exit code 3), reported by farm_command like any user error.
    return watch_job(connect_redis(settings), job_id, timeout, quiet=quiet)
