"""How the farm spent a batch's time: each job's stage spans, each stage's utilisation, and the timeline PNG.

``batch_report`` draws a PNG timeline (one row per job, a bar per stage from the
record's ``<stage>.started_at``/``<stage>.finished_at``, with the queue wait
drawn thin and grey) above a plot of busy workers per stage, and reports each
stage's utilisation: busy seconds over (batch wall time x that stage's
workers). matplotlib is imported only here, only when a PNG is drawn.
``load_timelines`` is also what the results manifest (``manifest``) reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from scheduler.core import keys
from scheduler.core.errors import UserError
from scheduler.core.job_record import (
    FINISHED_STATES,
    VANISHED,
    JobState,
    StageField,
    attempt_of,
    read_records,
    stage_field,
)
from scheduler.core.settings import MAX_WORKERS_PER_STAGE
from scheduler.ops import batch

STAGE_COLOURS = {
    "encode": "#4C72B0",
    "transform": "#DD8452",
    "transform@high": "#C44E52",
    "transform@low": "#DD8452",
    "decode": "#55A868",
}

# A job that stopped before it finished: its last stage span ends at its last update.
_STOPPED = frozenset({JobState.FAILED, JobState.CANCELLED})


class ReportError(UserError, RuntimeError):
    """A report that cannot be drawn; the message says what to install or fix."""


# --------------------------------------------------------------------------- reading the batch


@dataclass(frozen=True)
class StageSpan:
    stage: str
    start: float
    end: float | None  # None while the stage is still running
    worker: str
    attempt: int
    # An attempt that stopped without finishing (the job failed or was cancelled there) ends at the
    # job's last update; its worker was busy all the same, so utilisation counts it.
    interrupted: bool = False


@dataclass
class JobTimeline:
    job_id: str
    line: int
    fields: dict[str, str]
    spans: list[StageSpan] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.fields.get("state", VANISHED)

    @property
    def created_at(self) -> float:
        return float(self.fields.get("created_at", "0") or 0)

    @property
    def queued_at(self) -> float:
        """When the current run entered the queue: the last retry, else submission."""
        return float(self.fields.get("retried_at") or self.created_at)

    @property
    def finished_at(self) -> float | None:
        ends = [s.end for s in self.spans if s.end is not None]
        return max(ends) if ends else None


def _spans(fields: dict[str, str]) -> list[StageSpan]:
    stopped = fields.get("state") in _STOPPED
    spans = []
    for stage in keys.all_hops():  # one span per hop the job ran (a split loop's transform hops apart)
        start = fields.get(stage_field(stage, StageField.STARTED_AT))
        if start is None:
            continue
        end = fields.get(stage_field(stage, StageField.FINISHED_AT))
        interrupted = end is None and stopped
        if interrupted:
            end = fields.get("updated_at", start)
        spans.append(
            StageSpan(
                stage=stage.value,
                start=float(start),
                end=float(end) if end is not None else None,
                worker=fields.get(stage_field(stage, StageField.WORKER), ""),
                attempt=attempt_of(fields, stage) or 1,
                interrupted=interrupted,
            )
        )
    return spans


def load_timelines(conn: redis.Redis, name: str) -> list[JobTimeline]:
    """Every job of batch ``name`` in line order, with its full record (one pipelined read per chunk)."""
    lines = batch.batch_lines(conn, name)
    if not lines:
        batch.batch_job_ids(conn, name)  # raises BatchNotFound for an unknown batch
    ids = sorted(lines, key=lambda j: lines[j])
    timelines = []
    for job_id, record in read_records(conn, ids):
        fields = {k: v for k, v in (record or {}).items() if v is not None}
        timelines.append(JobTimeline(job_id, lines[job_id], fields, _spans(fields)))
    return timelines


# --------------------------------------------------------------------------- utilisation


@dataclass(frozen=True)
class StageUtilisation:
    stage: str
    busy_seconds: float
    workers: int
    window_seconds: float

    @property
    def fraction(self) -> float:
        """Busy share of the stage's capacity: its workers x the batch's processing window."""
        capacity = self.window_seconds * max(1, self.workers)
        return self.busy_seconds / capacity if capacity > 0 else 0.0

    def describe(self) -> str:
        plural = "s" if self.workers != 1 else ""
        return (
            f"{self.stage:<9} {100 * self.fraction:5.1f}% busy "
            f"({self.busy_seconds:.1f}s of {self.window_seconds:.1f}s on {self.workers} worker{plural})"
        )


def batch_window(timelines: list[JobTimeline]) -> tuple[float, float]:
    """The batch's wall time: first job created to last stage finished (or last stage started)."""
    starts = [j.created_at for j in timelines if j.created_at]
    ends = [s.end if s.end is not None else s.start for j in timelines for s in j.spans]
    if not starts:
        return 0.0, 0.0
    return min(starts), max(ends, default=min(starts))


def processing_window(timelines: list[JobTimeline]) -> tuple[float, float]:
    """From the first stage start to the last stage end: the time the farm worked on the batch.

    Utilisation is measured over this window, not from submission: a batch queued
    before its workers came up (or behind another batch) would otherwise read as
    an idle farm.
    """
    starts = [s.start for j in timelines for s in j.spans]
    ends = [s.end if s.end is not None else s.start for j in timelines for s in j.spans]
    if not starts:
        return 0.0, 0.0
    return min(starts), max(ends)


def utilisation(timelines: list[JobTimeline]) -> dict[str, StageUtilisation]:
    t0, t1 = processing_window(timelines)
    wall = max(0.0, t1 - t0)
    out = {}
    ran = {s.stage for j in timelines for s in j.spans}
    for stage in (hop for hop in keys.all_hops() if hop.part is None or hop in ran):
        spans = [s for j in timelines for s in j.spans if s.stage == stage.value and s.end is not None]
        out[stage.value] = StageUtilisation(
            stage=stage.value,
            busy_seconds=sum(s.end - s.start for s in spans if s.end is not None),
            workers=len({s.worker for s in spans if s.worker}),
            window_seconds=wall,
        )
    return out


# --------------------------------------------------------------------------- the PNG


@dataclass(frozen=True)
class BatchReport:
    png: Path | None
    jobs: int
    wall_seconds: float  # first submission to last stage end
    processing_seconds: float  # first stage start to last stage end: utilisation's denominator
    states: dict[str, int]
    stages: dict[str, StageUtilisation]

    def describe(self) -> str:
        finished = sum(n for s, n in self.states.items() if s in FINISHED_STATES)
        rate = 60.0 * finished / self.processing_seconds if self.processing_seconds > 0 else 0.0
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.states.items()))
        lines = [
            f"{self.jobs} jobs ({states}): {self.wall_seconds:.1f}s from submission, "
            f"{self.processing_seconds:.1f}s processing, {rate:.1f} jobs/min",
            f"stage utilisation over the {self.processing_seconds:.1f}s of processing:",
        ]
        lines += ["  " + u.describe() for u in self.stages.values()]
        bound = self.bounding_stage()
        if bound is not None:
            layout = self.balanced_workers()
            counts = ",".join(f"{stage}={n}" for stage, n in layout.items() if n > 1) or "none"
            lines.append(
                f"bound by {bound}: it has the most busy time per worker. Workers in proportion to each stage's "
                f"busy time balance the farm: {':'.join(str(n) for n in layout.values())} "
                f"({'/'.join(layout)}), e.g. `reelfarm up --workers {counts}`"
            )
        return "\n".join(lines)

    def bounding_stage(self) -> str | None:
        """The stage with the most busy seconds per worker: the one that sets the farm's pace."""
        loads = {name: u.busy_seconds / max(1, u.workers) for name, u in self.stages.items() if u.busy_seconds > 0}
        return max(loads, key=lambda name: loads[name]) if loads else None

    def balanced_workers(self, most: int = MAX_WORKERS_PER_STAGE) -> dict[str, int]:
        """Workers per stage in proportion to each stage's busy seconds (the cheapest gets one, none more
        than ``most``): the layout under which no stage waits on another."""
        busy = {name: u.busy_seconds for name, u in self.stages.items()}
        least = min((b for b in busy.values() if b > 0), default=0.0)
        if least <= 0:
            return dict.fromkeys(busy, 1)
        scale = min(1.0, most / (max(busy.values()) / least))
        return {name: max(1, min(most, round(b / least * scale))) for name, b in busy.items()}


def batch_report(conn: redis.Redis, name: str, out_png: Path | None) -> BatchReport:
    timelines = load_timelines(conn, name)
    t0, t1 = batch_window(timelines)
    stages = utilisation(timelines)
    states: dict[str, int] = {}
    for job in timelines:
        states[job.state] = states.get(job.state, 0) + 1
    p0, p1 = processing_window(timelines)
    report = BatchReport(out_png, len(timelines), max(0.0, t1 - t0), max(0.0, p1 - p0), states, stages)
    if out_png is not None:
        render_timeline(timelines, report, name, out_png)
    return report


def _worker_lanes(timelines: list[JobTimeline]) -> list[tuple[str, str, list[StageSpan]]]:
    """(stage, worker, its finished spans) per worker, in stage order: one lane each in the PNG."""
    lanes: dict[tuple[str, str], list[StageSpan]] = {}
    for job in timelines:
        for span in job.spans:
            if span.end is not None:
                lanes.setdefault((span.stage, span.worker or "?"), []).append(span)
    order = {hop: i for i, hop in enumerate(keys.ALL_HOPS)}
    return [
        (stage, worker, spans)
        for (stage, worker), spans in sorted(lanes.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
    ]


def render_timeline(timelines: list[JobTimeline], report: BatchReport, name: str, out_png: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("drawing the timeline needs matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")  # files only: never try to open a window
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0, t1 = batch_window(timelines)
    rows = len(timelines)
    # Readable rows up to a few hundred jobs; past that each row is a hairline but the shape still shows.
    height = min(40.0, 2.8 + 0.22 * max(rows, 4))
    lanes_height = 0.9 + 0.3 * max(3, len({(s.stage, s.worker) for j in timelines for s in j.spans}))
    fig, (ax, busy_ax) = plt.subplots(
        2, 1, figsize=(12, height + lanes_height), sharex=True, gridspec_kw={"height_ratios": [height, lanes_height]}
    )
    bar_height = 0.7
    for row, job in enumerate(timelines):
        first = min((s.start for s in job.spans), default=None)
        if first is not None and job.created_at:
            # Time in the queue before the first stage ran (of the last retry, for a retried job).
            ax.plot([job.queued_at - t0, first - t0], [row, row], color="#BBBBBB", linewidth=1, zorder=1)
        previous_end = None
        for span in job.spans:
            if previous_end is not None and span.start > previous_end:
                ax.plot([previous_end - t0, span.start - t0], [row, row], color="#BBBBBB", linewidth=1, zorder=1)
            end = span.end if span.end is not None else t1
            ax.barh(
                row,
                max(end - span.start, (t1 - t0) / 2000),  # a zero-length stage still shows as a sliver
                left=span.start - t0,
                height=bar_height,
                color=STAGE_COLOURS[span.stage],
                # Hatched: still running (//) or stopped there by a failure or a cancel (xx).
                hatch="//" if span.end is None else ("xx" if span.interrupted else None),
                alpha=0.55 if span.interrupted else 1.0,
                edgecolor="white" if span.end is None or span.interrupted else "none",
                linewidth=0,
                zorder=2,
            )
            previous_end = end
        if job.state in _STOPPED:
            where = (job.finished_at or previous_end or t1) - t0
            ax.plot([where], [row], marker="x", color="#C44E52", markersize=7, mew=2, zorder=3)
    labels = [f"line {j.line}" if j.line else j.job_id[-10:] for j in timelines]
    step = max(1, rows // 60)
    ax.set_yticks(range(0, rows, step))
    ax.set_yticklabels(labels[::step], fontsize=8)
    for tick, job in zip(ax.get_yticklabels(), timelines[::step], strict=False):
        if job.state in _STOPPED:
            tick.set_color("#C44E52")
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_ylabel("job (batch file line)")
    ax.grid(axis="x", color="#EEEEEE", zorder=0)
    ran = {span.stage for j in timelines for span in j.spans}
    legend: list[Any] = [Patch(color=c, label=s) for s, c in STAGE_COLOURS.items() if "@" not in s or s in ran]
    legend.append(Patch(color="#BBBBBB", label="waiting in queue"))
    if any(j.state in _STOPPED for j in timelines):
        legend.append(
            plt.Line2D([], [], marker="x", color="#C44E52", linestyle="none", mew=2, label="failed / cancelled")
        )
    # Jobs run top-left to bottom-right, so the upper right corner is where the legend hides nothing.
    ax.legend(handles=legend, loc="upper right", fontsize=8, framealpha=0.9)

    # One lane per worker: gaps in a lane are that worker idle, so a bottleneck stage is the solid lane.
    lanes = _worker_lanes(timelines)
    wall = max(1e-9, t1 - t0)
    window = max(1e-9, report.processing_seconds)
    lane_labels = []
    for lane, (stage, worker, spans) in enumerate(lanes):
        widths = [max((s.end or s.start) - s.start, wall / 1000) for s in spans]
        busy_ax.broken_barh(
            [(s.start - t0, w) for s, w in zip(spans, widths, strict=True)],
            (lane - 0.35, 0.7),
            facecolors=STAGE_COLOURS[stage],
            # A white edge keeps back-to-back jobs apart, but would swallow a bar only a few pixels wide.
            edgecolors=["white" if w > wall / 150 else "none" for w in widths],
            linewidth=0.5,
        )
        busy = sum((s.end or s.start) - s.start for s in spans)
        lane_labels.append(f"{stage} {worker.rsplit('-', 1)[-1]} ({100 * busy / window:.0f}%)")
    busy_ax.set_yticks(range(len(lanes)))
    busy_ax.set_yticklabels(lane_labels, fontsize=8)
    busy_ax.set_ylim(len(lanes) - 0.5, -0.5)
    busy_ax.set_title("workers: busy spans (busy share of the processing time)", fontsize=9, loc="left")
    busy_ax.set_xlabel("seconds since the batch was submitted")
    busy_ax.grid(axis="x", color="#EEEEEE")
    busy_ax.set_xlim(0, max(1e-3, (t1 - t0) * 1.01))

    utils = " · ".join(f"{u.stage} {100 * u.fraction:.0f}%" for u in report.stages.values())
    states = ", ".join(f"{n} {s}" for s, n in sorted(report.states.items()))
    fig.suptitle(
        f"batch {name}: {report.jobs} jobs ({states}), {report.wall_seconds:.1f}s from submission\n"
        f"stage utilisation over {report.processing_seconds:.1f}s of processing: {utils}",
        fontsize=12,
    )
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
