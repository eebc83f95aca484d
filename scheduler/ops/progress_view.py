"""Watching jobs finish: rich progress bars on a terminal, plain lines in logs and CI.

``JobPoller`` reads the job records (one pipelined round trip per poll, and
only for jobs not yet finished: a finished job is read once and remembered, so
watching a 10,000-job batch stays cheap). ``ProgressView`` turns its snapshots
into either a live rich display -- one bar per stage and one overall, with
throughput and ETA -- when the stream is a TTY, or one plain line whenever the
picture changes (at most every ``plain_interval`` seconds for batches) when it
is not. Progress goes to stderr so stdout stays for results.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis

from scheduler.core import jobs
from scheduler.core.errors import UserError
from scheduler.core.job_record import (
    FINISHED_STATES,
    VANISHED,
    JobState,
    StageField,
    StageState,
    kind_fields,
    kind_progress,
    kind_state,
    read_records,
    stage_fields,
)
from scheduler.core.keys import Hop, Stage

_FIELDS = ("state", *stage_fields(StageField.STATE), *kind_fields(StageField.PROGRESS, Stage.TRANSFORM))
# Throughput is measured over this window so the ETA follows the farm's current pace.
_RATE_WINDOW_SECONDS = 120.0


class WaitTimedOut(UserError, RuntimeError):
    """Waiting ran out of time; the jobs keep running. The message says how to keep watching."""

    exit_code = 3


@dataclass
class Snapshot:
    total: int
    states: dict[str, int] = field(default_factory=dict)
    stage_done: dict[str, float] = field(default_factory=dict)  # transform counts running steps as fractions
    stage_running: dict[str, int] = field(default_factory=dict)
    at: float = 0.0
    # Denoising step of a single watched job ("3/50"): the only progress inside a long stage.
    step: str = ""

    @property
    def finished(self) -> int:
        return sum(n for state, n in self.states.items() if state in FINISHED_STATES)

    @property
    def all_finished(self) -> bool:
        return self.finished >= self.total


def _parse_progress(text: str | None) -> float:
    if not text or "/" not in text:
        return 0.0
    done, _, total = text.partition("/")
    try:
        return min(1.0, int(done) / max(1, int(total)))
    except ValueError:
        return 0.0


class JobPoller:
    """The farm's view of a fixed set of jobs; finished jobs are cached after they are first seen finished."""

    def __init__(self, conn: redis.Redis, job_ids: list[str]) -> None:
        self.conn = conn
        self.job_ids = list(job_ids)
        self._finished: dict[str, dict[str, str | None]] = {}
        self.last_fields: dict[str, dict[str, str | None]] = {}

    def poll(self) -> Snapshot:
        pending = [j for j in self.job_ids if j not in self._finished]
        for job_id, record in read_records(self.conn, pending, _FIELDS):
            # Expired or never created: it can never progress, so it counts as finished.
            fields: dict[str, str | None] = record if record is not None else {"state": VANISHED}
            self.last_fields[job_id] = fields
            if fields["state"] in FINISHED_STATES or fields["state"] == VANISHED:
                self._finished[job_id] = fields
        snap = Snapshot(total=len(self.job_ids), at=time.monotonic())
        snap.stage_done = {stage.value: 0.0 for stage in Stage}
        snap.stage_running = {stage.value: 0 for stage in Stage}
        for job_id in self.job_ids:
            fields = self.last_fields.get(job_id, {})
            state = fields.get("state") or VANISHED
            snap.states[state] = snap.states.get(state, 0) + 1
            for stage in Stage:
                stage_state = kind_state(fields, stage)
                if stage_state == StageState.DONE or state == JobState.SUCCEEDED:
                    snap.stage_done[stage.value] += 1
                elif stage_state == StageState.RUNNING:
                    snap.stage_running[stage.value] += 1
                    if stage is Stage.TRANSFORM:
                        snap.stage_done[stage.value] += _parse_progress(kind_progress(fields, stage))
        if len(self.job_ids) == 1 and snap.stage_running[Stage.TRANSFORM.value]:
            snap.step = kind_progress(self.last_fields.get(self.job_ids[0], {}), Stage.TRANSFORM) or ""
        return snap


def _format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressView:
    """Shows a ``Snapshot`` stream as rich bars (TTY) or plain lines; ``close`` leaves the final picture."""

    def __init__(
        self,
        title: str,
        total: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        plain_interval: float = 5.0,
    ) -> None:
        self.title = title
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.plain_interval = plain_interval
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque()
        self._last_line = ""
        self._last_line_at = 0.0
        self._progress: Any = None
        self._live: Any = None
        self._summary_text: Any = None
        self._tasks: dict[str, Any] = {}
        if self.live:
            self._start_rich()

    # -- throughput ----------------------------------------------------------------

    def rate_per_minute(self, snap: Snapshot) -> float:
        self._samples.append((snap.at, snap.finished))
        while len(self._samples) > 2 and snap.at - self._samples[0][0] > _RATE_WINDOW_SECONDS:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        span = snap.at - t0
        return 60.0 * (snap.finished - n0) / span if span > 0 else 0.0

    def eta_seconds(self, snap: Snapshot, rate: float) -> float | None:
        remaining = snap.total - snap.finished
        if remaining <= 0:
            return 0.0
        return remaining / (rate / 60.0) if rate > 0 else None

    # -- rendering -----------------------------------------------------------------

    def _start_rich(self) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        console = Console(file=self.stream)
        self._progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(bar_width=40),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
        )
        for stage in Stage:
            self._tasks[stage.value] = self._progress.add_task(stage.value, total=self.total, note="")
        self._tasks["overall"] = self._progress.add_task("[bold]overall", total=self.total, note="")
        # The summary gets its own line: beside the bars it would squeeze them on a narrow terminal.
        self._summary_text = Text("")
        self._live = Live(
            Group(Text(self.title, style="bold"), self._progress, self._summary_text),
            console=console,
            refresh_per_second=4,
        )
        self._live.start()

    def update(self, snap: Snapshot) -> None:
        rate = self.rate_per_minute(snap)
        eta = self.eta_seconds(snap, rate)
        if self.live:
            self._update_rich(snap, rate, eta)
        else:
            self._update_plain(snap, rate, eta)

    def _summary(self, snap: Snapshot) -> str:
        order = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RUNNING, JobState.QUEUED, VANISHED]
        parts = [f"{snap.states[s]} {s}" for s in order if snap.states.get(s)]
        return ", ".join(parts)

    def _update_rich(self, snap: Snapshot, rate: float, eta: float | None) -> None:
        for stage in Stage:
            running = snap.stage_running[stage.value]
            note = f"{running} running" if running else ""
            if stage is Stage.TRANSFORM and snap.step:
                note = f"step {snap.step}"
            self._progress.update(self._tasks[stage.value], completed=snap.stage_done[stage.value], note=note)
        self._progress.update(self._tasks["overall"], completed=snap.finished, note="")
        self._summary_text.plain = (
            f"{self._summary(snap)} | {rate:.1f} jobs/min | ETA {_format_duration(eta)}"
            if snap.total > 1
            else self._summary(snap)
        )

    def _update_plain(self, snap: Snapshot, rate: float, eta: float | None) -> None:
        stages = " ".join(f"{s.value} {int(snap.stage_done[s.value])}/{snap.total}" for s in Stage)
        line = (
            f"{self.title}: {snap.finished}/{snap.total} finished ({self._summary(snap)}) | {stages} | "
            f"{rate:.1f} jobs/min | ETA {_format_duration(eta)}"
        )
        # The rate and ETA drift every poll: compare the rest, so a quiet farm prints nothing new.
        key = line.split(" | ")[0:2]
        now = time.monotonic()
        changed = key != self._last_line.split(" | ")[0:2]
        if changed and (now - self._last_line_at >= self.plain_interval or snap.all_finished or not self._last_line):
            print(line, file=self.stream, flush=True)
            self._last_line, self._last_line_at = line, now

    def close(self, snap: Snapshot | None = None) -> None:
        if snap is not None and not self.live:
            self._last_line_at = 0.0
            self._update_plain(snap, self.rate_per_minute(snap), 0.0)
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None


def watch_jobs(
    conn: redis.Redis,
    job_ids: list[str],
    *,
    title: str,
    timeout: float | None = None,
    poll_seconds: float = 0.5,
    stream: TextIO | None = None,
    live: bool | None = None,
    quiet: bool = False,
    plain_interval: float = 5.0,
) -> Snapshot:
    """Show progress until every job in ``job_ids`` finished; raises ``WaitTimedOut`` after ``timeout``."""
    poller = JobPoller(conn, job_ids)
    view = None if quiet else ProgressView(title, len(job_ids), stream, live, plain_interval)
    deadline = None if timeout is None else time.monotonic() + timeout
    snap = poller.poll()
    try:
        while True:
            if view is not None:
                view.update(snap)
            if snap.all_finished:
                return snap
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimedOut(
                    f"{title}: {snap.finished}/{snap.total} finished after {timeout:.0f}s "
                    "(the rest keep running; run the same command again to keep watching)"
                )
            time.sleep(poll_seconds)
            snap = poller.poll()
    finally:
        if view is not None:
            view.close(snap)


# --------------------------------------------------------------------------- one job


def job_line(record: dict[str, Any]) -> str:
    """One job's progress as a line: ``[running] encode done | transform step 2/4 | decode queued``."""
    parts = []
    for name, stage in record["stages"].items():
        state = stage.get("state")
        if state is None:
            continue
        text = f"{name} {state}"
        if Hop(name).kind is Stage.TRANSFORM and "progress" in stage and state == "running":
            text = f"{name} step {stage['progress']}"
        parts.append(text)
    flag = " (cancel requested)" if record.get("cancel_requested") else ""
    return f"[{record['state']}{flag}] " + " | ".join(parts)


def wait_for_job(
    conn: redis.Redis,
    job_id: str,
    timeout: float,
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
    live: bool | None = None,
    poll_seconds: float = 0.25,
) -> dict[str, Any]:
    """Wait for one job with per-stage bars (TTY) or a line per change; returns its final status record."""
    out = stream if stream is not None else sys.stderr
    use_rich = (out.isatty() if live is None else live) and not quiet
    if use_rich:
        watch_jobs(conn, [job_id], title=job_id, timeout=timeout, poll_seconds=poll_seconds, stream=out, live=True)
        return jobs.read_status(conn, job_id)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        record = jobs.read_status(conn, job_id)
        record["cancel_requested"] = jobs.cancel_requested(conn, job_id)
        line = job_line(record)
        if not quiet and line != last:
            print(line, file=out, flush=True)
            last = line
        if jobs.JobState(record["state"]).finished:
            record.pop("cancel_requested")
            return record
        if time.monotonic() > deadline:
            raise WaitTimedOut(
                f"job {job_id} still {record['state']} after {timeout:.0f}s "
                f"(it keeps running; `reelfarm status {job_id}`)"
            )
        time.sleep(poll_seconds)
