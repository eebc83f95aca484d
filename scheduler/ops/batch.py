"""Batches: many job specs from one JSONL file, validated together and submitted in pipelined chunks.

A batch file has one JSON object per line (a job spec). Blank lines and lines
starting with ``#`` are skipped; an optional first line ``{"batch": {...}}``
holds defaults for every line (and may name the batch with ``"name"``).

Lifecycle of ``reelfarm batch FILE``:

1. ``parse_batch``: parse and validate EVERY line before anything is written;
   bad lines are collected with their line numbers and one-line reasons, and
   are never submitted. Defaults layer as: farm ``spec_defaults`` < file
   header < ``--default key=value`` < the line itself.
2. Each valid line gets a deterministic job id, ``b-<batch>-<sha256[:16]>`` of
   its canonical spec, so running the same file again finds the same ids.
3. ``submit_batch``, per chunk of ``CHUNK_SIZE`` lines: WATCH the chunk's job
   keys, read which exist in one pipelined round trip, then in one MULTI write
   the new job records, enqueue their encode stage and add them to the batch
   record. A concurrent run of the same file trips the WATCH and the chunk is
   read again, so no job is ever enqueued twice.
4. With ``resume``, existing failed/cancelled jobs are re-submitted as retries
   (a fresh, higher attempt); succeeded and in-flight jobs are left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from scheduler.core import durability, job_retry, jobs, keys
from scheduler.core.errors import UserError
from scheduler.core.job_record import StageField, count_states, stage_fields
from scheduler.core.model_catalog import ModelChooser
from scheduler.core.route import ROUTE_FIELD, Route
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError
from scheduler.intake.tenancy import tag_owned_jobs
from scheduler.ops.batch_file import (  # noqa: E402 - the batch API is one module to its callers
    BatchEntry,
    BatchError,
    LineError,
    ParsedBatch,
    batch_name_from_path,
    job_id_for,
    parse_batch,
    parse_default_options,
    read_source,
    specs_to_text,
)

__all__ = [
    "BatchEntry",
    "BatchError",
    "BatchNotFound",
    "BatchSummary",
    "LineError",
    "ParsedBatch",
    "SubmitOutcome",
    "batch_job_ids",
    "batch_lines",
    "batch_name_from_path",
    "job_id_for",
    "list_batches",
    "parse_batch",
    "parse_default_options",
    "read_batch",
    "read_source",
    "specs_to_text",
    "submit_batch",
]

CHUNK_SIZE = 500


@dataclass
class SubmitOutcome:
    created: list[str] = field(default_factory=list)
    # Lines refused at submission: an i2v line whose image could not be read, checked or stored.
    errors: list[LineError] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)  # present already and left alone
    retried: list[str] = field(default_factory=list)  # failed/cancelled, re-submitted (resume)
    seconds: float = 0.0


@dataclass(frozen=True)
class BatchSummary:
    """What one run of a batch file did: every refused line (at parse or at submission) and the jobs it names."""

    parsed: ParsedBatch
    outcome: SubmitOutcome

    @property
    def invalid(self) -> list[LineError]:
        return sorted(self.parsed.errors + self.outcome.errors, key=lambda e: e.line_no)

    @property
    def job_ids(self) -> list[str]:
        """The batch's jobs, in line order: every valid line except those refused at submission."""
        refused = {e.line_no for e in self.outcome.errors}
        return [e.job_id for e in self.parsed.entries if e.line_no not in refused]

    def as_json(self) -> dict[str, Any]:
        return {
            "batch": self.parsed.name,
            "lines": self.parsed.lines,
            "invalid": [{"line": e.line_no, "reason": e.reason} for e in self.invalid],
            "duplicates": [{"line": line, "same_as": first} for line, first in self.parsed.duplicates],
            "jobs": len(self.job_ids),
            "created": len(self.outcome.created),
            "existing": len(self.outcome.existing),
            "retried": len(self.outcome.retried),
            "seconds": round(self.outcome.seconds, 3),
        }


# --------------------------------------------------------------------------- names and ids


# --------------------------------------------------------------------------- defaults


# --------------------------------------------------------------------------- parsing


# --------------------------------------------------------------------------- submission


_STATE_FIELDS = ("state", "spec", ROUTE_FIELD, *stage_fields(StageField.ATTEMPT))
# One command for a whole chunk: the state of each job key, or false where there is no job.
_STATES = "local out = {} for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'state') end return out"


def submit_batch(
    conn: redis.Redis,
    settings: FarmSettings,
    parsed: ParsedBatch,
    *,
    resume: bool = False,
    source: str = "",
    chunk_size: int = CHUNK_SIZE,
    owner: str | None = None,
) -> SubmitOutcome:
    """Submit the valid entries of ``parsed``; existing jobs are skipped (or retried with ``resume``).

    ``owner``: the API key name whose batch it is (``intake.tenancy``), written on each new job.
    """
    started = time.perf_counter()
    outcome = SubmitOutcome()
    name = parsed.name
    _write_batch_record(conn, parsed, source)
    images = _ImageStager(settings)
    secret = settings.require_secret()
    # Each job's route follows its model (a two-expert model's experts split over two hops).
    routes = ModelChooser(settings, conn)
    for offset in range(0, len(parsed.entries), chunk_size):
        _submit_chunk(
            conn,
            name,
            parsed.entries[offset : offset + chunk_size],
            resume,
            outcome,
            images,
            secret,
            routes.route,
            owner,
        )
    # One wait covers every chunk before the batch is acknowledged (see scheduler.core.durability).
    durability.confirm(conn, settings, "batch submit")
    conn.hset(
        keys.batch_key(name),
        mapping={
            "updated_at": repr(time.time()),
            "jobs": str(conn.zcard(keys.batch_jobs_key(name))),
            "last_created": str(len(outcome.created)),
            "last_retried": str(len(outcome.retried)),
        },
    )
    outcome.seconds = time.perf_counter() - started
    return outcome


def _write_batch_record(conn: redis.Redis, parsed: ParsedBatch, source: str) -> None:
    now = time.time()
    key = keys.batch_key(parsed.name)
    pipe = conn.pipeline(transaction=True)
    pipe.hsetnx(key, "created_at", repr(now))
    pipe.hset(
        key,
        mapping={
            "name": parsed.name,
            "source": source,
            "updated_at": repr(now),
            "lines": str(parsed.lines),
            "valid": str(len(parsed.entries)),
            "invalid": str(len(parsed.errors)),
        },
    )
    pipe.expire(key, jobs.JOB_RETENTION_SECONDS)
    pipe.zadd(keys.batches_index_key(), {parsed.name: now}, nx=True)
    pipe.execute()


def _submit_chunk(
    conn: redis.Redis,
    name: str,
    chunk: list[BatchEntry],
    resume: bool,
    outcome: SubmitOutcome,
    images: _ImageStager,
    secret: bytes,
    routes: Callable[[JobSpec], Route] | None = None,
    owner: str | None = None,
) -> None:
    job_keys = [keys.job_key(e.job_id) for e in chunk]
    with conn.pipeline(transaction=True) as pipe:
        while True:
            try:
                # WATCH first, then read: a concurrent run of the same batch that creates any of
                # these jobs in between makes EXEC fail, and the chunk is read again.
                pipe.watch(*job_keys)
                states = conn.eval(_STATES, len(job_keys), *job_keys)
                current: list[dict[str, str | None]] = [{"state": _text(state)} for state in states]  # type: ignore[union-attr]
                if resume:
                    _read_retry_fields(conn, job_keys, current)
                # New i2v jobs: their images are checked and stored before anything is enqueued
                # (object storage only, so the WATCH stays valid; a retried chunk reuses the result).
                new = [e for e, f in zip(chunk, current, strict=True) if f["state"] is None]
                images.stage([e for e in new if e.spec.image is not None])
                created, existing, retried = [], [], []
                new_jobs: list[tuple[str, JobSpec]] = []
                pipe.multi()
                for entry, fields in zip(chunk, current, strict=True):
                    if fields["state"] is None:
                        spec = images.staged_spec(entry)
                        if spec is None:
                            continue  # its image was refused: reported in outcome.errors
                        new_jobs.append((entry.job_id, spec))
                        created.append(entry.job_id)
                    elif resume and fields["state"] in job_retry.RETRYABLE_STATES:
                        job_retry.queue_retry(pipe, conn, entry.job_id, fields, secret=secret)
                        retried.append(entry.job_id)
                    else:
                        existing.append(entry.job_id)
                jobs.create_jobs(pipe, conn, new_jobs, secret=secret, routes=routes)
                if owner is not None:
                    tag_owned_jobs(pipe, owner, [job_id for job_id, _ in new_jobs], time.time())
                batch_jobs = keys.batch_jobs_key(name)
                members = {e.job_id: e.line_no for e in chunk if e.job_id not in images.refused}
                if members:
                    pipe.zadd(batch_jobs, members)
                pipe.expire(batch_jobs, jobs.JOB_RETENTION_SECONDS)
                pipe.execute()
            except redis.WatchError:
                continue
            break
    outcome.created.extend(created)
    outcome.existing.extend(existing)
    outcome.retried.extend(retried)
    outcome.errors.extend(images.take_new_errors())


class _ImageStager:
    """Stores each new i2v job's conditioning image once (``input_images.stage_input_image``)."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self._client: Any = None
        self._staged: dict[str, JobSpec] = {}
        self.refused: dict[str, LineError] = {}
        self._reported = 0

    def stage(self, entries: list[BatchEntry]) -> None:
        for entry in entries:
            if entry.job_id in self._staged or entry.job_id in self.refused:
                continue
            from scheduler.intake.image_staging import stage_input_image

            if self._client is None:
                self._client = self.settings.s3.client()
            try:
                self._staged[entry.job_id] = stage_input_image(self.settings, entry.spec, entry.job_id, self._client)
            except SpecError as exc:
                self.refused[entry.job_id] = LineError(entry.line_no, str(exc).removeprefix("invalid job spec: "))

    def staged_spec(self, entry: BatchEntry) -> JobSpec | None:
        if entry.spec.image is None:
            return entry.spec
        return self._staged.get(entry.job_id)

    def take_new_errors(self) -> list[LineError]:
        errors = list(self.refused.values())[self._reported :]
        self._reported += len(errors)
        return errors


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _read_retry_fields(conn: redis.Redis, job_keys: list[str], current: list[dict[str, str | None]]) -> None:
    """Fill in spec and attempts of the jobs ``resume`` will retry (few, so read only those)."""
    wanted = [i for i, fields in enumerate(current) if fields["state"] in job_retry.RETRYABLE_STATES]
    reader = conn.pipeline(transaction=False)
    for i in wanted:
        reader.hmget(job_keys[i], _STATE_FIELDS)
    for i, row in zip(wanted, reader.execute(), strict=True):
        current[i] = dict(zip(_STATE_FIELDS, [_text(v) for v in row], strict=True))


# --------------------------------------------------------------------------- reading batches back


class BatchNotFound(UserError, LookupError):
    pass


def batch_job_ids(conn: redis.Redis, name: str) -> list[str]:
    """A batch's job ids in line order; raises ``BatchNotFound`` for an unknown batch."""
    ids = [m.decode() for m in conn.zrange(keys.batch_jobs_key(name), 0, -1)]  # type: ignore[union-attr]
    if not ids and not conn.exists(keys.batch_key(name)):
        raise BatchNotFound(f"batch {name!r} not found (list batches with `reelfarm ls --batches`)")
    return ids


def batch_lines(conn: redis.Redis, name: str) -> dict[str, int]:
    """Job id -> line number in the batch file."""
    rows: list[tuple[bytes, float]] = conn.zrange(keys.batch_jobs_key(name), 0, -1, withscores=True)  # type: ignore[assignment]
    return {member.decode(): int(score) for member, score in rows}


def read_batch(conn: redis.Redis, name: str) -> dict[str, Any]:
    """The batch record plus live job counts by state."""
    raw: dict[bytes, bytes] = conn.hgetall(keys.batch_key(name))  # type: ignore[assignment]
    if not raw:
        raise BatchNotFound(f"batch {name!r} not found (list batches with `reelfarm ls --batches`)")
    record: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    ids = batch_job_ids(conn, name)
    record["states"] = count_states(conn, ids)
    return record


def list_batches(conn: redis.Redis, limit: int = 100) -> list[dict[str, Any]]:
    names = [m.decode() for m in conn.zrevrange(keys.batches_index_key(), 0, limit - 1)]  # type: ignore[union-attr]
    out = []
    for name in names:
        try:
            out.append(read_batch(conn, name))
        except BatchNotFound:
            # Expired with its jobs: forget it so the index does not grow without bound.
            conn.zrem(keys.batches_index_key(), name)
    return out
