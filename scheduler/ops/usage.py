"""Usage per API key and day, computed from the job records: what a shared render farm bills by.

Per key (the ``owner`` the HTTP front writes on a job; ``(cli)`` for jobs submitted by the CLI or cron) and
per UTC day of the job's creation:

- ``jobs``: jobs created; ``videos``: those that succeeded;
- ``video_seconds``: frames / fps of the succeeded ones;
- ``dit_seconds`` / ``decode_seconds``: the model's share of the transform and decode stages
  (``<stage>.compute_seconds``, or the stage's seconds where a record has no split), of every job that
  ran them, finished or not -- a failed render still used the GPU.

The record keeps its latest attempt's timings, so a stage retried after a worker died counts its last
attempt only. Only jobs still on record count (they expire after ``JOB_RETENTION_SECONDS``), so the
Prometheus counters below can fall when old records go; Prometheus reads a fall as a counter reset.

``reelfarm usage``, ``GET /v1/usage`` (admin keys) and ``reelfarm_key_*`` all read ``usage_rows``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler.core import keys
from scheduler.core.errors import UserError
from scheduler.core.job_record import JobState, read_records
from scheduler.intake.tenancy import OWNER_FIELD

CLI_KEY = "(cli)"
_FIELDS = (
    "spec",
    "state",
    "created_at",
    OWNER_FIELD,
    # Every transform hop's: a split loop's DiT time is its two hops' together.
    *(f"{hop}.{name}" for hop in keys.ALL_HOPS if hop.startswith("transform") for name in ("compute_seconds", "seconds")),
    "decode.compute_seconds",
    "decode.seconds",
)
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(UserError, ValueError):
    pass


@dataclass
class UsageRow:
    key: str
    day: str
    jobs: int = 0
    videos: int = 0
    video_seconds: float = 0.0
    dit_seconds: float = 0.0
    decode_seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_since(text: str) -> float:
    """``"7d"`` -> seconds (units s, m, h, d, w)."""
    match = _SINCE.match(text)
    if not match:
        raise UsageError(f"since {text!r}: write a duration like 7d, 24h or 30m")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _model_seconds(fields: dict[str, str | None], stage: str) -> float:
    value = fields.get(f"{stage}.compute_seconds") or fields.get(f"{stage}.seconds")
    return float(value) if value else 0.0


def _video_seconds(spec_json: str | None) -> float:
    spec = json.loads(spec_json or "{}")
    frames, fps = spec.get("frames"), spec.get("fps")
    return float(frames) / float(fps) if frames and fps else 0.0


def usage_rows(conn: redis.Redis, since_seconds: float, key: str | None = None) -> list[UsageRow]:
    """One row per (key, UTC day) with jobs created in the last ``since_seconds``, sorted by day then key."""
    if key is not None and key != CLI_KEY and not keys.ID_PATTERN.match(key):
        raise UsageError(f"key {key!r}: give an API key name (A-Z a-z 0-9 _ -) or {CLI_KEY}")
    low = time.time() - since_seconds
    # A named key's jobs are in its own index; everyone's (the CLI's included) in the farm-wide one.
    index = keys.jobs_index_key() if key in (None, CLI_KEY) else keys.api_owner_index_key(key, "videos")
    ids = [m.decode() for m in conn.zrangebyscore(index, low, "+inf")]  # type: ignore[union-attr]
    rows: dict[tuple[str, str], UsageRow] = {}
    for _, fields in read_records(conn, ids, _FIELDS):
        if fields is None or not fields.get("created_at"):
            continue
        owner = fields.get(OWNER_FIELD) or CLI_KEY
        if key is not None and owner != key:
            continue
        day = time.strftime("%Y-%m-%d", time.gmtime(float(fields["created_at"] or 0)))
        row = rows.setdefault((owner, day), UsageRow(owner, day))
        row.jobs += 1
        if fields.get("state") == JobState.SUCCEEDED.value:
            row.videos += 1
            row.video_seconds += _video_seconds(fields.get("spec"))
        row.dit_seconds += sum(_model_seconds(fields, hop) for hop in keys.ALL_HOPS if hop.startswith("transform"))
        row.decode_seconds += _model_seconds(fields, "decode")
    return sorted(rows.values(), key=lambda r: (r.day, r.key))


def totals_by_key(rows: list[UsageRow]) -> dict[str, UsageRow]:
    out: dict[str, UsageRow] = {}
    for row in rows:
        total = out.setdefault(row.key, UsageRow(row.key, "all"))
        total.jobs += row.jobs
        total.videos += row.videos
        total.video_seconds += row.video_seconds
        total.dit_seconds += row.dit_seconds
        total.decode_seconds += row.decode_seconds
    return out


_COUNTERS = (
    ("jobs", "Jobs created by the key"),
    ("videos", "Videos the key's jobs rendered"),
    ("video_seconds", "Seconds of video the key's jobs rendered"),
    ("dit_seconds", "Seconds of DiT (transform) compute the key's jobs used"),
    ("decode_seconds", "Seconds of VAE decode compute the key's jobs used"),
)


class UsageCollector(Collector):
    """``reelfarm_key_<jobs|videos|video_seconds|dit_seconds|decode_seconds>_total{key}`` over the jobs on
    record, read at scrape time (the whole retention window, so one scrape reads every record)."""

    def __init__(self, conn: redis.Redis, window_seconds: float) -> None:
        self.conn = conn
        self.window_seconds = window_seconds

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            totals = totals_by_key(usage_rows(self.conn, self.window_seconds))
        except redis.RedisError:
            return  # the farm collector's reelfarm_up says Redis did not answer

        for name, help_text in _COUNTERS:
            family = CounterMetricFamily(f"reelfarm_key_{name}", help_text, labels=["key"])
            for key, row in sorted(totals.items()):
                family.add_metric([key], getattr(row, name))
            yield family
