"""Cron-driven render queues: named schedules in ``configs/cron.yaml`` that enqueue batches.

rq ships a cron scheduler (``rq.cron``), but it runs one function per tick on
every scheduler process that registered it -- nothing stops two of them
enqueueing the same tick -- and rq may only be imported in ``scheduler.core.queues``.
So ticks are computed with croniter (which rq's cron uses too) and every tick
goes through the ordinary batch path.

A tick of a schedule, from any number of ``reelfarm cron`` processes:

1. claim it: ``SET <tick key> running:<owner> NX PX <lease>`` -- exactly one
   process wins; the others skip it.
2. build the batch: its name is ``<schedule>-<tick UTC, YYYYmmddTHHMMZ>``, so
   job ids (derived from batch name + spec) are unique per tick and a second
   submission of the same tick could only find the jobs already there.
3. submit it (``batch.submit_batch``) and mark the tick ``done:<batch>`` for a
   week. A process that dies mid-tick leaves a claim that expires after the
   lease; a later run within the schedule's grace window takes the tick over,
   and the idempotent job ids make the takeover safe.

Ticks missed while no cron process ran are coalesced: only the latest one, and
only if it is at most ``misfire_grace_seconds`` old.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.core import keys
from scheduler.core.errors import UserError
from scheduler.core.settings import FarmSettings, read_yaml
from scheduler.core.spec import PREFIX_PATTERN, JobSpec
from scheduler.ops import batch

log = logging.getLogger("reelfarm.cron")

DEFAULT_CRON_FILE = Path("configs/cron.yaml")
TICK_RECORD_SECONDS = 8 * 24 * 3600
# Leaves room in a batch name (64) for "-YYYYmmddTHHMMZ".
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
_PLACEHOLDER = re.compile(r"\{(schedule|date|time)\}")


class CronConfigError(UserError, ValueError):
    """A cron file that cannot work; the message says where and what to fix."""


class Schedule(BaseModel):
    """One named schedule: when (cron + time zone), what (a batch file, an s3:// URI or inline specs), how."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    cron: str
    timezone: str = "UTC"
    batch: str | None = None
    specs: list[dict[str, Any]] | None = None
    priority: Literal["high", "default", "low"] = "default"
    # May use {schedule}, {date} (YYYY-MM-DD) and {time} (HHMM) of the tick in the schedule's time zone.
    output_prefix: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    misfire_grace_seconds: int = Field(default=300, ge=0)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression (e.g. '0 2 * * *' for 02:00 daily)")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin or UTC)") from None
        return value

    @field_validator("defaults")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(JobSpec.model_fields))
        if unknown:
            raise ValueError(f"unknown spec field(s) {', '.join(map(repr, unknown))} in defaults")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Schedule:
        if (self.batch is None) == (self.specs is None):
            raise ValueError("give exactly one of 'batch' (a file path or s3:// URI) or 'specs' (inline job specs)")
        if self.output_prefix is not None:
            sample = expand_prefix(self.output_prefix, "schedule", datetime(2026, 1, 1, tzinfo=UTC))
            if not PREFIX_PATTERN.match(sample):
                raise ValueError(
                    "output_prefix must be path segments of A-Z a-z 0-9 _ - separated by '/' "
                    "(placeholders: {schedule}, {date}, {time})"
                )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def latest_tick(self, at: datetime) -> datetime:
        """The most recent tick at or before ``at`` (aware, in the schedule's zone)."""
        # croniter's get_prev excludes its start time; an exact tick must count as due, hence the microsecond.
        local = at.astimezone(self.zone) + timedelta(microseconds=1)
        return croniter(self.cron, local).get_prev(datetime)  # type: ignore[no-any-return]

    def next_tick(self, after: datetime) -> datetime:
        return croniter(self.cron, after.astimezone(self.zone)).get_next(datetime)  # type: ignore[no-any-return]


class CronConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedules: dict[str, Schedule]


def expand_prefix(template: str, schedule: str, tick: datetime) -> str:
    values = {"schedule": schedule, "date": tick.strftime("%Y-%m-%d"), "time": tick.strftime("%H%M")}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def load_cron_config(path: Path) -> tuple[CronConfig, Path]:
    """Read and validate a cron file; returns it and the folder relative batch paths are resolved against."""
    try:
        raw = read_yaml(path)
    except ValueError as exc:
        raise CronConfigError(str(exc)) from None
    try:
        config = CronConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CronConfigError(f"{path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    for name, schedule in config.schedules.items():
        if not SCHEDULE_NAME.match(name):
            raise CronConfigError(f"{path}: schedule name {name!r}: use 1-48 characters from A-Z a-z 0-9 _ -")
        schedule.name = name
    return config, path.resolve().parent


def tick_batch_name(schedule: str, tick: datetime) -> str:
    """The batch a tick enqueues: unique per schedule and tick, the same from every cron process."""
    return keys.check_batch_name(f"{schedule}-{tick.astimezone(UTC).strftime('%Y%m%dT%H%MZ')}")


@dataclass
class TickOutcome:
    schedule: str
    tick: datetime
    batch: str
    claimed: bool
    note: str = ""
    created: int = 0
    invalid: list[str] = field(default_factory=list)

    def describe(self) -> str:
        when = self.tick.isoformat()
        if not self.claimed:
            return f"{self.schedule} @ {when}: {self.note}"
        text = f"{self.schedule} @ {when}: batch {self.batch}, {self.created} jobs queued"
        if self.invalid:
            text += f", {len(self.invalid)} invalid lines skipped ({'; '.join(self.invalid[:3])})"
        return text + (f" -- {self.note}" if self.note else "")


# Marks a tick done only if we still hold its claim (the lease may have passed to another process).
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


class CronRunner:
    """Runs the schedules of one cron file against one farm; safe to run in several processes at once."""

    def __init__(
        self,
        conn: redis.Redis,
        settings: FarmSettings,
        config: CronConfig,
        base_dir: Path,
        *,
        lease_seconds: float = 120.0,
        owner: str | None = None,
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.config = config
        self.base_dir = base_dir
        self.lease_seconds = lease_seconds
        self.owner = owner or f"{socket.gethostname()}-{secrets.token_hex(4)}"

    # -- one tick ------------------------------------------------------------------

    def run_tick(self, schedule: Schedule, tick: datetime) -> TickOutcome:
        name = tick_batch_name(schedule.name, tick)
        key = keys.cron_tick_key(schedule.name, int(tick.timestamp()))
        claim = f"running:{self.owner}"
        outcome = TickOutcome(schedule.name, tick, name, claimed=False)
        if not self.conn.set(key, claim, nx=True, px=int(self.lease_seconds * 1000)):
            current = (self.conn.get(key) or b"").decode()  # type: ignore[union-attr]
            outcome.note = f"already {current.split(':', 1)[0] or 'claimed'} by another cron process"
            return outcome
        outcome.claimed = True
        try:
            parsed = self._parse(schedule, tick, name)
            submitted = batch.submit_batch(self.conn, self.settings, parsed, source=f"cron:{schedule.name}")
        except batch.BatchError as exc:
            # A broken batch source will not fix itself by retrying this tick: record and report it.
            outcome.note = f"not enqueued: {exc}"
            self.conn.eval(_FINISH, 1, key, claim, f"failed:{exc}"[:500], TICK_RECORD_SECONDS)
            log.error("cron %s tick %s: %s", schedule.name, tick.isoformat(), exc)
            return outcome
        outcome.created = len(submitted.created)
        outcome.invalid = [str(e) for e in parsed.errors]
        pipe = self.conn.pipeline(transaction=True)
        pipe.zadd(keys.cron_history_key(schedule.name), {name: tick.timestamp()})
        pipe.expire(keys.cron_history_key(schedule.name), TICK_RECORD_SECONDS)
        pipe.execute()
        if not self.conn.eval(_FINISH, 1, key, claim, f"done:{name}", TICK_RECORD_SECONDS):
            outcome.note = "the claim lease ran out during submission (the ids kept it idempotent)"
        log.info(outcome.describe())
        return outcome

    def _parse(self, schedule: Schedule, tick: datetime, name: str) -> batch.ParsedBatch:
        if schedule.specs is not None:
            text, source = batch.specs_to_text(schedule.specs), f"cron:{schedule.name}"
        else:
            assert schedule.batch is not None
            source = schedule.batch
            if not source.startswith("s3://") and not Path(source).is_absolute():
                source = str(self.base_dir / source)
            text = batch.read_source(self.settings, source)
        overrides: dict[str, Any] = {"priority": schedule.priority}
        if schedule.output_prefix:
            overrides["output_prefix"] = expand_prefix(
                schedule.output_prefix, schedule.name, tick.astimezone(schedule.zone)
            )
        return batch.parse_batch(
            text,
            self.settings,
            name=name,
            source=source,
            defaults=schedule.defaults,
            spec_overrides=overrides,
            conn=self.conn,
        )

    def check(self, now: datetime | None = None) -> list[str]:
        """Parse every schedule's batch now, so a broken file shows at start-up rather than at 2 a.m."""
        problems = []
        now = now or datetime.now(UTC)
        for schedule in self.config.schedules.values():
            if not schedule.enabled:
                continue
            try:
                parsed = self._parse(schedule, schedule.next_tick(now), tick_batch_name(schedule.name, now))
            except batch.BatchError as exc:
                problems.append(f"{schedule.name}: {exc}")
                continue
            problems += [f"{schedule.name}: {error}" for error in parsed.errors]
        return problems

    # -- when ----------------------------------------------------------------------

    def due_at(self, when: datetime, since: datetime | None = None) -> list[tuple[Schedule, datetime]]:
        """Each enabled schedule's latest tick at or before ``when``, if it is within grace (and after ``since``)."""
        due = []
        for schedule in self.config.schedules.values():
            if not schedule.enabled:
                continue
            tick = schedule.latest_tick(when)
            if since is not None and tick <= since:
                continue
            if (when - tick).total_seconds() <= schedule.misfire_grace_seconds:
                due.append((schedule, tick))
        return due

    def run_once_at(self, when: datetime) -> list[TickOutcome]:
        return [self.run_tick(schedule, tick) for schedule, tick in self.due_at(when)]

    def run_forever(self, stop: threading.Event, max_sleep: float = 30.0) -> None:
        """Run ticks as they come until ``stop`` is set; ticks missed before start are coalesced within grace."""
        since: datetime | None = None
        while not stop.is_set():
            now = datetime.now(UTC)
            for schedule, tick in self.due_at(now, since):
                try:
                    self.run_tick(schedule, tick)
                except redis.RedisError as exc:
                    # The claim (if taken) expires after its lease; the tick is retried within grace.
                    log.error("cron %s tick %s: Redis error %s", schedule.name, tick.isoformat(), exc)
            since = now
            upcoming = [s.next_tick(now) for s in self.config.schedules.values() if s.enabled]
            wait = min([(t - datetime.now(UTC)).total_seconds() for t in upcoming] + [max_sleep])
            stop.wait(max(0.05, wait + 0.01))

    def next_ticks(self, now: datetime | None = None) -> list[tuple[Schedule, datetime]]:
        now = now or datetime.now(UTC)
        return [(s, s.next_tick(now)) for s in self.config.schedules.values()]


def parse_when(text: str) -> datetime:
    """An ISO time for ``--once-at``; naive times are UTC."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CronConfigError(f"--once-at {text!r} is not an ISO time (e.g. 2026-11-24T02:00:00Z)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def history(conn: redis.Redis, schedule: str, limit: int = 20) -> list[tuple[str, float]]:
    rows: list[tuple[bytes, float]] = conn.zrevrange(keys.cron_history_key(schedule), 0, limit - 1, withscores=True)  # type: ignore[assignment]
    return [(name.decode(), score) for name, score in rows]
