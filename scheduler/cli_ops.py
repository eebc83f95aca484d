"""Operator commands of the ``reelfarm`` CLI: batch, ls, cancel, retry, info, report, manifest, cron, metrics.

They are registered on ``scheduler.cli.main`` by ``register`` (called at the end
of ``scheduler/cli.py``); import them through ``scheduler.cli``. Like the rest of
the CLI they need no GPU stack. Progress goes to stderr, results to stdout;
errors a user can fix end the command with one ``reelfarm: ...`` line.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from scheduler.cli import fail, farm_command
from scheduler.connection import connect_redis
from scheduler.settings import FarmSettings

DEFAULT_OUTPUTS = Path("outputs")


def ops_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turns the errors of this module's building blocks into one-line exits (``farm_command`` handles the rest)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Imported per call: the CLI must start fast, and boto3 is only needed by some commands.
        from scheduler.batch import BatchError, BatchNotFound
        from scheduler.cron import CronConfigError
        from scheduler.job_admin import JobAdminError
        from scheduler.object_store import ObjectStoreError
        from scheduler.progress_view import WaitTimedOut
        from scheduler.report import ReportError

        try:
            return func(*args, **kwargs)
        except WaitTimedOut as exc:
            fail(str(exc), code=3)
        except (BatchError, BatchNotFound, CronConfigError, JobAdminError, ObjectStoreError, ReportError) as exc:
            fail(str(exc).strip("'\""))

    return wrapper


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# --------------------------------------------------------------------------- batch


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
@ops_errors
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
    from scheduler import batch

    text = sys.stdin.read() if source == "-" else batch.read_source(settings, source)
    parsed = batch.parse_batch(text, settings, name=name, source=source, defaults=batch.parse_default_options(defaults))
    for error in parsed.errors:
        click.echo(f"{source}: {error}", err=True)
    conn = connect_redis(settings)
    outcome = batch.submit_batch(conn, settings, parsed, resume=resume, source=source)
    for error in outcome.errors:
        click.echo(f"{source}: {error}", err=True)
    invalid = sorted(parsed.errors + outcome.errors, key=lambda e: e.line_no)
    refused = {e.line_no for e in outcome.errors}
    job_ids = [e.job_id for e in parsed.entries if e.line_no not in refused]
    summary = {
        "batch": parsed.name,
        "lines": parsed.lines,
        "invalid": [{"line": e.line_no, "reason": e.reason} for e in invalid],
        "duplicates": [{"line": line, "same_as": first} for line, first in parsed.duplicates],
        "jobs": len(job_ids),
        "created": len(outcome.created),
        "existing": len(outcome.existing),
        "retried": len(outcome.retried),
        "seconds": round(outcome.seconds, 3),
    }
    if not as_json:
        click.echo(
            f"batch {parsed.name}: {_n(len(job_ids), 'job')} -- {len(outcome.created)} submitted, "
            f"{len(outcome.existing)} already there, {len(outcome.retried)} retried ({outcome.seconds:.2f}s)"
        )
        if parsed.duplicates:
            click.echo(
                f"  {_n(len(parsed.duplicates), 'duplicate line')} share a job with an earlier identical line", err=True
            )
    failed_jobs = 0
    if wait and job_ids:
        from scheduler.progress_view import watch_jobs
        from scheduler.report import write_manifest

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
            f"{len(invalid)} of {_n(parsed.lines, 'line')} invalid, not submitted "
            f"(the other {parsed.lines - len(invalid)} were); fix them and run the same command again"
        )
    if failed_jobs:
        problems.append(
            f"{_n(failed_jobs, 'job')} of batch {parsed.name} did not succeed; see the manifest, "
            f"or `reelfarm retry --batch {parsed.name}`"
        )
    for problem in problems[:-1]:
        click.echo(f"reelfarm: {problem}", err=True)
    if problems:
        fail(problems[-1], code=1)


# --------------------------------------------------------------------------- ls / cancel / retry / info


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
@ops_errors
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
    from scheduler import batch, job_admin

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
            age = _age(now - float(record.get("created_at", now))) + " ago"
            rows.append([record["name"], age, record.get("jobs", "0"), states_text, record.get("source", "")])
        click.echo(_table(rows) if records else "no batches")
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
        rows.append([job.job_id, state, stage, _age(now - job.created_at), detail])
    click.echo(_table(rows))
    if any(j.cancel_requested and j.state in ("queued", "running") for j in jobs):
        click.echo("* cancel requested: stops at its next step boundary", err=True)


@click.command("cancel")
@click.argument("job_id", required=False)
@click.option("--batch", "batch_name", default=None, help="cancel every unfinished job of this batch")
@farm_command
@ops_errors
def cancel_command(settings: FarmSettings, job_id: str | None, batch_name: str | None) -> None:
    """Cancel a job (or a batch): queued jobs leave their queue, running ones stop at the next step."""
    from scheduler import batch, job_admin

    if bool(job_id) == bool(batch_name):
        fail("give a JOB id or --batch NAME (one of them)")
    conn = connect_redis(settings)
    if job_id:
        outcome = job_admin.cancel_job(conn, job_id)
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
        counts[job_admin.cancel_job(conn, one)] += 1
    click.echo(
        f"batch {batch_name}: cancelled {counts['cancelled']} queued jobs, requested a stop of "
        f"{counts['requested']} running ones, {counts['finished']} had already finished"
    )


@click.command("retry")
@click.argument("job_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="retry every failed job (of --batch, if given)")
@click.option("--batch", "batch_name", default=None, help="retry this batch's failed and cancelled jobs")
@farm_command
@ops_errors
def retry_command(settings: FarmSettings, job_id: str | None, all_failed: bool, batch_name: str | None) -> None:
    """Re-submit failed (or cancelled) jobs from encode with a fresh attempt."""
    from scheduler import job_admin, jobs

    if bool(job_id) == bool(all_failed or batch_name):
        fail("give a JOB id, or --failed and/or --batch NAME")
    conn = connect_redis(settings)
    if job_id:
        attempt = jobs.resubmit(conn, job_id, secret=settings.require_secret())
        click.echo(f"{job_id} re-queued from encode (attempt {attempt})")
        return
    # A named batch retries its cancelled jobs too (that is how a cancelled batch is resumed).
    states = ["failed"] if not batch_name else ["failed", "cancelled"]
    rows = job_admin.list_jobs(conn, states=states, batch=batch_name, limit=None)
    retried = 0
    for row in rows:
        try:
            jobs.resubmit(conn, row.job_id, secret=settings.require_secret())
            retried += 1
        except job_admin.JobAdminError:
            continue  # changed state since listed (retried elsewhere, or finished): nothing to do
    where = f" of batch {batch_name}" if batch_name else ""
    click.echo(f"re-queued {_n(retried, '/'.join(states) + ' job')}{where}")


@click.command("info")
@click.option("--json", "as_json", is_flag=True)
@farm_command
@ops_errors
def info_command(settings: FarmSettings, as_json: bool) -> None:
    """Queue depths per stage and priority; live workers with model, device, heartbeat, state and job; refused calls."""
    from scheduler import job_admin, keys, stage_calls

    conn = connect_redis(settings)
    queue_rows = job_admin.queue_rows(conn, list(settings.model_dirs()))
    workers = job_admin.worker_rows(conn)
    inflight = int(conn.zcard(keys.inflight_key()))  # type: ignore[arg-type]
    delayed = int(conn.zcard(keys.delayed_key()))  # type: ignore[arg-type]
    refused_counts = stage_calls.refusal_counts(conn)
    refused = stage_calls.recent_refusals(conn, limit=10)
    if as_json:
        queues_json: dict[str, dict[str, dict[str, int]]] = {}
        for row in queue_rows:
            queues_json.setdefault(row.stage, {})[row.model] = row.depths
        body = {
            "queues": queues_json,
            "workers": [asdict(w) for w in workers],
            "inflight": inflight,
            "delayed_retries": delayed,
            "refused_calls": {"counts": refused_counts, "recent": [asdict(r) for r in refused]},
        }
        click.echo(json.dumps(body, indent=2))
        return
    several = len(settings.model_dirs()) > 1
    rows = [["QUEUE", *(["MODEL"] if several else []), *[p.upper() for p in keys.PRIORITIES], "TOTAL"]]
    for row in queue_rows:
        label = [row.stage, *([row.model] if several else [])]
        rows.append([*label, *[str(row.depths[p]) for p in keys.PRIORITIES], str(row.total)])
    click.echo(_table(rows))
    click.echo(f"in flight: {inflight} stage executions; waiting out a retry backoff: {delayed}")
    click.echo("")
    if refused_counts:
        by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(refused_counts.items()))
        click.echo(f"REFUSED rq jobs (not run; someone who can write to Redis queued them): {by_reason}")
        rows = [["WHEN", "QUEUE", "RQ JOB", "FUNCTION", "REASON", "DETAIL"]]
        for r in refused:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at))
            rows.append([when, r.queue, r.rq_job_id, r.function, r.reason, r.detail])
        click.echo(_table(rows))
        click.echo("")
    if not workers:
        click.echo("no live workers (start them with `reelfarm worker STAGE` or `reelfarm up`)")
        return
    rows = [["WORKER", "STAGE", "STATE", "JOB", "MODEL", "DEVICE", "HEARTBEAT", "DONE", "FREE SLOTS", "RECEIVE"]]
    for w in workers:
        rows.append(
            [
                w.worker_id,
                w.stage,
                w.state,
                w.current_job or "-",
                w.model,
                w.device,
                f"{w.heartbeat_age:.1f}s ago",
                str(w.jobs_done),
                w.free_slots,
                w.receive,
            ]
        )
    click.echo(_table(rows))


# --------------------------------------------------------------------------- report / manifest


@click.command("report")
@click.option("--batch", "batch_name", required=True, help="the batch to report on")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="PNG path [outputs/<batch>/timeline.png]")
@farm_command
@ops_errors
def report_command(settings: FarmSettings, batch_name: str, out: Path | None) -> None:
    """Draw a batch's timeline (a bar per job and stage) and print each stage's utilisation."""
    from scheduler.report import batch_report

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
@ops_errors
def manifest_command(settings: FarmSettings, batch_name: str, manifest_dir: Path | None, no_upload: bool) -> None:
    """Write a batch's results manifest (JSONL and CSV) locally and to the bucket."""
    from scheduler.report import write_manifest

    conn = connect_redis(settings)
    files = write_manifest(
        conn, settings, batch_name, manifest_dir or DEFAULT_OUTPUTS / batch_name, upload=not no_upload
    )
    states = ", ".join(f"{n} {s}" for s, n in sorted(files.states.items()))
    click.echo(f"{files.rows} jobs ({states})")
    for where in (str(files.jsonl), str(files.csv), *files.uris):
        click.echo(where)


# --------------------------------------------------------------------------- cron / metrics


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


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
@ops_errors
def cron_command(settings: FarmSettings, schedules: Path, once_at: str | None, list_only: bool, lease: float) -> None:
    """Run the cron file's schedules: each tick enqueues one batch, once, however many cron processes run."""
    from scheduler import cron

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
    from scheduler.logging_setup import configure_logging

    # A long-running process: every tick is logged (JSON lines unless stderr is a terminal).
    configure_logging("INFO")
    for problem in runner.check():
        click.echo(f"warning: {problem}", err=True)
    stop = _stop_on_signals()
    click.echo(f"reelfarm cron: {len(config.schedules)} schedules from {schedules}; Ctrl-C to stop", err=True)
    runner.run_forever(stop)


@click.command("metrics")
@click.option("--port", type=int, default=9464, show_default=True)
@click.option("--addr", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0 to expose)")
@farm_command
@ops_errors
def metrics_command(settings: FarmSettings, port: int, addr: str) -> None:
    """Serve the farm's Prometheus metrics (queues, jobs, workers), read from Redis at each scrape."""
    from scheduler.metrics import serve_farm_metrics

    conn = connect_redis(settings)
    bound = serve_farm_metrics(conn, port, addr, models=list(settings.model_dirs()))
    click.echo(
        f"serving farm metrics at http://{addr}:{bound}/metrics (started {datetime.now(UTC):%H:%M:%SZ})", err=True
    )
    stop = _stop_on_signals()
    stop.wait()


OPS_COMMANDS = [
    batch_command,
    ls_command,
    cancel_command,
    retry_command,
    info_command,
    report_command,
    manifest_command,
    cron_command,
    metrics_command,
]


def register(group: click.Group) -> None:
    for command in OPS_COMMANDS:
        group.add_command(command)
