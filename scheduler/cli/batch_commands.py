"""Many jobs: ``batch``, ``ls``, ``cancel``, ``retry``, ``report``, ``manifest`` and ``cron``.

Progress goes to stderr, results to stdout; errors a user can fix end the command with one
``reelfarm: ...`` line (``common.farm_command``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from scheduler.cli.common import DEFAULT_OUTPUTS, age, fail, farm_command, plural, stop_on_signals, table
from scheduler.core import job_retry
from scheduler.core.connection import connect_redis
from scheduler.core.settings import FarmSettings


@click.command("batch")
@click.argument("source")
@click.option("--name", default=None, help="batch name (default: the header's name, else the file name)")
@click.option(
    "--default", "defaults", multiple=True, metavar="KEY=VALUE", help="spec default for every line, e.g. width=832"
)
@click.option("--wait", is_flag=True, help="show progress until every job finished, then write the manifest")
@click.option("--resume", is_flag=True, help="re-submit the batch's failed/cancelled jobs as retries")
@click.option(
    "--manifest-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="where --wait writes manifests [outputs/<batch>]",
)
@click.option("--no-upload", is_flag=True, help="keep the manifest local (do not upload it to the bucket)")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True, help="seconds --wait waits")
@click.option("--json", "as_json", is_flag=True, help="print the outcome as JSON")
@farm_command
def batch_command(
    source: str,
    settings: FarmSettings,
    name: str | None,
    defaults: tuple[str, ...],
    wait: bool,
    resume: bool,
    manifest_dir: Path | None,
    no_upload: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Submit one job per line of a JSONL file (a path, s3://bucket/key, or - for stdin).

    Every line is validated first; bad lines are reported by number and not
    submitted, the valid ones are. Job ids come from the batch name and each
    line's spec, so running the same file again submits only what is missing.
    """
    from scheduler.ops import batch

    text = sys.stdin.read() if source == "-" else batch.read_source(settings, source)
    conn = connect_redis(settings)
    parsed = batch.parse_batch(
        text, settings, name=name, source=source, defaults=batch.parse_default_options(defaults), conn=conn
    )
    for error in parsed.errors:
        click.echo(f"{source}: {error}", err=True)
    outcome = batch.submit_batch(conn, settings, parsed, resume=resume, source=source)
    for error in outcome.errors:
        click.echo(f"{source}: {error}", err=True)
    ran = batch.BatchSummary(parsed, outcome)
    invalid, job_ids = ran.invalid, ran.job_ids
    summary = ran.as_json()
    if not as_json:
        click.echo(
            f"batch {parsed.name}: {plural(len(job_ids), 'job')} -- {len(outcome.created)} submitted, "
            f"{len(outcome.existing)} already there, {len(outcome.retried)} retried ({outcome.seconds:.2f}s)"
        )
        if parsed.duplicates:
            click.echo(
                f"  {plural(len(parsed.duplicates), 'duplicate line')} share a job with an earlier identical line",
                err=True,
            )
    failed_jobs = 0
    if wait and job_ids:
        from scheduler.ops.manifest import write_manifest
        from scheduler.ops.progress_view import watch_jobs

        # Each poll reads every unfinished job: poll a big batch less often so watching stays cheap for Redis.
        poll = min(5.0, max(0.5, len(job_ids) / 2000))
        snap = watch_jobs(conn, job_ids, title=f"batch {parsed.name}", timeout=timeout, poll_seconds=poll)
        failed_jobs = snap.finished - snap.states.get("succeeded", 0)
        out_dir = manifest_dir or DEFAULT_OUTPUTS / parsed.name
        files = write_manifest(conn, settings, parsed.name, out_dir, upload=not no_upload)
        summary["states"] = files.states
        summary["manifest"] = [str(files.jsonl), str(files.csv), *files.uris]
        if not as_json:
            click.echo(f"manifest: {files.jsonl} {files.csv}" + "".join(f" {u}" for u in files.uris))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    problems = []
    if invalid:
        problems.append(
            f"{len(invalid)} of {plural(parsed.lines, 'line')} invalid, not submitted "
            f"(the other {parsed.lines - len(invalid)} were); fix them and run the same command again"
        )
    if failed_jobs:
        problems.append(
            f"{plural(failed_jobs, 'job')} of batch {parsed.name} did not succeed; see the manifest, "
            f"or `reelfarm retry --batch {parsed.name}`"
        )
    for problem in problems[:-1]:
        click.echo(f"reelfarm: {problem}", err=True)
    if problems:
        fail(problems[-1], code=1)


@click.command("ls")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"])
)
@click.option("--batch", "batch_name", default=None, help="only this batch's jobs (in line order)")
@click.option("--since", default=None, help="submitted within, e.g. 30m, 1h, 2d (or an ISO time)")
@click.option("--limit", type=int, default=200, show_default=True, help="at most this many rows (0: all)")
@click.option("--batches", "list_batches", is_flag=True, help="list batches instead of jobs")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def ls_command(
    settings: FarmSettings,
    states: tuple[str, ...],
    batch_name: str | None,
    since: str | None,
    limit: int,
    list_batches: bool,
    as_json: bool,
) -> None:
    """List jobs, newest first (or a batch's jobs in line order)."""
    from scheduler.ops import batch, job_admin

    conn = connect_redis(settings)
    now = time.time()
    if list_batches:
        records = batch.list_batches(conn, limit=limit or 10_000)
        if as_json:
            click.echo(json.dumps(records, indent=2))
            return
        rows = [["BATCH", "CREATED", "JOBS", "STATES", "SOURCE"]]
        for record in records:
            states_text = ", ".join(f"{n} {s}" for s, n in sorted(record["states"].items()))
            since = age(now - float(record.get("created_at", now))) + " ago"
            rows.append([record["name"], since, record.get("jobs", "0"), states_text, record.get("source", "")])
        click.echo(table(rows) if records else "no batches")
        return
    since_ts = job_admin.parse_since(since, now) if since else None
    jobs = job_admin.list_jobs(conn, states=states, batch=batch_name, since=since_ts, limit=limit or None)
    if as_json:
        click.echo(json.dumps([asdict(j) for j in jobs], indent=2))
        return
    if not jobs:
        click.echo("no jobs match")
        return
    rows = [["JOB", "STATE", "STAGE", "AGE", "PROMPT / ERROR"]]
    for job in jobs:
        stage = job.stage + (
            f" {job.progress}" if job.state == "running" and job.stage == "transform" and job.progress else ""
        )
        state = job.state + ("*" if job.cancel_requested and job.state in ("queued", "running") else "")
        detail = job.error if job.state in ("failed", "cancelled") and job.error else job.prompt
        detail = detail if len(detail) <= 60 else detail[:57] + "..."
        rows.append([job.job_id, state, stage, age(now - job.created_at), detail])
    click.echo(table(rows))
    if any(j.cancel_requested and j.state in ("queued", "running") for j in jobs):
        click.echo("* cancel requested: stops at its next step boundary", err=True)


@click.command("cancel")
@click.argument("job_id", required=False)
@click.option("--batch", "batch_name", default=None, help="cancel every unfinished job of this batch")
@farm_command
def cancel_command(settings: FarmSettings, job_id: str | None, batch_name: str | None) -> None:
    """Cancel a job (or a batch): queued jobs leave their queue, running ones stop at the next step."""
    from scheduler.ops import batch, job_admin

    if bool(job_id) == bool(batch_name):
        fail("give a JOB id or --batch NAME (one of them)")
    conn = connect_redis(settings)
    if job_id:
        outcome = job_admin.cancel_job(conn, job_id)
        if outcome == "cancelled":
            # A running job's worker drops them itself when it stops.
            _drop_checkpoints(conn, settings, job_id)
        if outcome == "finished":
            fail(f"job {job_id} already finished; nothing to cancel (`reelfarm status {job_id}`)", code=1)
        click.echo(
            f"cancelled {job_id}"
            if outcome == "cancelled"
            else f"{job_id} is running: cancel requested; it stops at its next step boundary"
        )
        return
    assert batch_name is not None
    counts = {"cancelled": 0, "requested": 0, "finished": 0}
    for one in batch.batch_job_ids(conn, batch_name):
        outcome = job_admin.cancel_job(conn, one)
        counts[outcome] += 1
        if outcome == "cancelled":
            _drop_checkpoints(conn, settings, one)
    click.echo(
        f"batch {batch_name}: cancelled {counts['cancelled']} queued jobs, requested a stop of "
        f"{counts['requested']} running ones, {counts['finished']} had already finished"
    )


def _drop_checkpoints(conn: Any, settings: FarmSettings, job_id: str) -> None:
    from scheduler.core.object_store import ObjectStoreError
    from scheduler.ops import job_admin

    try:
        job_admin.drop_checkpoints(conn, settings, job_id)
    except ObjectStoreError as exc:
        # The cancel itself stands; only the cleanup is left to do.
        click.echo(f"reelfarm: {job_id} cancelled, but its checkpoints stay: {exc}", err=True)


@click.command("retry")
@click.argument("job_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="retry every failed job (of --batch, if given)")
@click.option("--batch", "batch_name", default=None, help="retry this batch's failed and cancelled jobs")
@farm_command
def retry_command(settings: FarmSettings, job_id: str | None, all_failed: bool, batch_name: str | None) -> None:
    """Re-submit failed (or cancelled) jobs from encode with a fresh attempt."""
    from scheduler.ops import job_admin

    if bool(job_id) == bool(all_failed or batch_name):
        fail("give a JOB id, or --failed and/or --batch NAME")
    conn = connect_redis(settings)
    if job_id:
        attempt = job_retry.resubmit(conn, job_id, secret=settings.require_secret())
        click.echo(f"{job_id} re-queued from encode (attempt {attempt})")
        return
    # A named batch retries its cancelled jobs too (that is how a cancelled batch is resumed).
    states = ["failed"] if not batch_name else ["failed", "cancelled"]
    rows = job_admin.list_jobs(conn, states=states, batch=batch_name, limit=None)
    retried = 0
    for row in rows:
        try:
            job_retry.resubmit(conn, row.job_id, secret=settings.require_secret())
            retried += 1
        except job_admin.JobAdminError:
            continue  # changed state since listed (retried elsewhere, or finished): nothing to do
    where = f" of batch {batch_name}" if batch_name else ""
    click.echo(f"re-queued {plural(retried, '/'.join(states) + ' job')}{where}")


@click.command("report")
@click.option("--batch", "batch_name", required=True, help="the batch to report on")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="PNG path [outputs/<batch>/timeline.png]")
@farm_command
def report_command(settings: FarmSettings, batch_name: str, out: Path | None) -> None:
    """Draw a batch's timeline (a bar per job and stage) and print each stage's utilisation."""
    from scheduler.ops.timeline import batch_report

    conn = connect_redis(settings)
    png = out or DEFAULT_OUTPUTS / batch_name / "timeline.png"
    report = batch_report(conn, batch_name, png)
    click.echo(report.describe())
    click.echo(f"timeline: {png}")


@click.command("manifest")
@click.option("--batch", "batch_name", required=True)
@click.option("--manifest-dir", type=click.Path(path_type=Path), default=None, help="[outputs/<batch>]")
@click.option("--no-upload", is_flag=True, help="keep the manifest local (do not upload it to the bucket)")
@farm_command
def manifest_command(settings: FarmSettings, batch_name: str, manifest_dir: Path | None, no_upload: bool) -> None:
    """Write a batch's results manifest (JSONL and CSV) locally and to the bucket."""
    from scheduler.ops.manifest import write_manifest

    conn = connect_redis(settings)
    files = write_manifest(
        conn, settings, batch_name, manifest_dir or DEFAULT_OUTPUTS / batch_name, upload=not no_upload
    )
    states = ", ".join(f"{n} {s}" for s, n in sorted(files.states.items()))
    click.echo(f"{files.rows} jobs ({states})")
    for where in (str(files.jsonl), str(files.csv), *files.uris):
        click.echo(where)


@click.command("cron")
@click.option(
    "--schedules",
    type=click.Path(path_type=Path),
    default=Path("configs/cron.yaml"),
    show_default=True,
    envvar="REELFARM_CRON",
    help="the cron file",
)
@click.option("--once-at", default=None, metavar="ISO", help="run what is due at this instant, then exit")
@click.option("--list", "list_only", is_flag=True, help="show the schedules, their next ticks and recent batches")
@click.option("--lease", type=float, default=120.0, show_default=True, help="seconds a tick's claim lasts")
@farm_command
def cron_command(settings: FarmSettings, schedules: Path, once_at: str | None, list_only: bool, lease: float) -> None:
    """Run the cron file's schedules: each tick enqueues one batch, once, however many cron processes run."""
    from scheduler.ops import cron

    config, base_dir = cron.load_cron_config(schedules)
    conn = connect_redis(settings)
    runner = cron.CronRunner(conn, settings, config, base_dir, lease_seconds=lease)
    if list_only:
        for schedule, tick in runner.next_ticks():
            state = "" if schedule.enabled else " (disabled)"
            recent = ", ".join(name for name, _ in cron.history(conn, schedule.name, limit=3)) or "none yet"
            click.echo(
                f"{schedule.name}{state}: '{schedule.cron}' {schedule.timezone}, next {tick.isoformat()}; recent: {recent}"
            )
        return
    if once_at is not None:
        outcomes = runner.run_once_at(cron.parse_when(once_at))
        for outcome in outcomes:
            click.echo(outcome.describe())
        if not outcomes:
            click.echo(f"nothing due at {once_at}")
        return
    from scheduler.core.logging_setup import configure_logging

    # A long-running process: every tick is logged (JSON lines unless stderr is a terminal).
    configure_logging("INFO")
    for problem in runner.check():
        click.echo(f"warning: {problem}", err=True)
    stop = stop_on_signals()
    click.echo(f"reelfarm cron: {len(config.schedules)} schedules from {schedules}; Ctrl-C to stop", err=True)
    runner.run_forever(stop)
