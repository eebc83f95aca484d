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

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from scheduler.core import jobs, keys
from scheduler.core.errors import UserError
from scheduler.core.job_record import Routing, StageField, count_states, stage_fields
from scheduler.core.keys import Stage
from scheduler.core.model_catalog import ModelChooser
from scheduler.core.settings import FarmSettings, deep_merge
from scheduler.core.spec import JobSpec, SpecError, parse_spec
from scheduler.core.stage_calls import StageCall

CHUNK_SIZE = 500
# Priority only orders the queue; it does not change the video, so it is not part of a job's identity.
_NOT_IDENTITY: set[str] = {"priority"}


class BatchError(UserError, ValueError):
    """A batch that cannot be read or submitted at all; the message is one line saying what to do."""


@dataclass(frozen=True)
class LineError:
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


@dataclass(frozen=True)
class BatchEntry:
    line_no: int
    job_id: str
    spec: JobSpec


@dataclass
class ParsedBatch:
    name: str
    entries: list[BatchEntry]
    errors: list[LineError]
    # (line, first line with the same spec): identical lines render identical videos, so they share a job.
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    lines: int = 0

    @property
    def job_ids(self) -> list[str]:
        return [e.job_id for e in self.entries]


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


def batch_name_from_path(path: str) -> str:
    """A batch name from a file name: ``prompts/Nightly Run.jsonl`` -> ``Nightly_Run``."""
    stem = Path(path.rstrip("/").rsplit("/", 1)[-1]).name.split(".", 1)[0]
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64]
    return cleaned or "batch"


def job_id_for(batch_name: str, spec: JobSpec) -> str:
    """The job id of ``spec`` in ``batch_name``: the same spec in the same batch always gets the same id."""
    # pydantic writes fields in declaration order with defaults filled in, so equal specs give equal bytes
    # however the line spelled them (key order, defaults written out or left implicit).
    digest = hashlib.sha256(spec.model_dump_json(exclude=_NOT_IDENTITY).encode()).hexdigest()
    return keys.check_id(f"b-{keys.check_batch_name(batch_name)}-{digest[:16]}", "job id")


# --------------------------------------------------------------------------- defaults


def parse_default_options(options: Iterable[str]) -> dict[str, Any]:
    """``["width=64", "codec.name=lossless", "prompt=a cat"]`` -> spec defaults.

    Values are JSON when they parse as JSON (numbers, booleans, objects), else plain strings.
    """
    out: dict[str, Any] = {}
    for option in options:
        name, sep, text = option.partition("=")
        if not sep or not name.strip():
            raise BatchError(f"--default {option!r} must look like key=value, e.g. --default width=64")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        path = name.strip().split(".")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BatchError(f"--default {option!r} sets a field inside {part!r}, which is not an object")
        node[path[-1]] = value
    return out


def _check_default_fields(defaults: dict[str, Any], where: str) -> None:
    # An unknown field in the defaults would fail every line with the same message: say it once.
    unknown = sorted(set(defaults) - set(JobSpec.model_fields))
    if unknown:
        raise BatchError(f"{where} has unknown spec field(s) {', '.join(map(repr, unknown))}: check the spelling")


# --------------------------------------------------------------------------- parsing


def _numbered_lines(text: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def parse_batch(
    text: str,
    settings: FarmSettings,
    *,
    name: str | None = None,
    source: str = "batch",
    defaults: dict[str, Any] | None = None,
    spec_overrides: dict[str, Any] | None = None,
) -> ParsedBatch:
    """Parse and validate every line of a batch file; nothing is written anywhere.

    ``defaults`` are ``--default`` options (below each line); ``spec_overrides``
    are forced onto every line (cron's priority and output prefix).
    """
    lines = list(_numbered_lines(text))
    header: dict[str, Any] = {}
    if lines:
        first_no, first = lines[0]
        try:
            first_obj = json.loads(first)
        except ValueError:
            first_obj = None
        if isinstance(first_obj, dict) and set(first_obj) == {"batch"}:
            if not isinstance(first_obj["batch"], dict):
                raise BatchError(f'line {first_no}: the batch header must be {{"batch": {{...defaults}}}}')
            header = dict(first_obj["batch"])
            lines = lines[1:]
    header_name = header.pop("name", None)
    batch_name = name or (str(header_name) if header_name else batch_name_from_path(source))
    try:
        keys.check_batch_name(batch_name)
    except ValueError as exc:
        raise BatchError(f"{exc} (choose one with --name)") from None
    _check_default_fields(header, "the batch header")
    _check_default_fields(defaults or {}, "--default")
    layered = deep_merge(deep_merge(dict(settings.spec_defaults), header), defaults or {})

    parsed = ParsedBatch(name=batch_name, entries=[], errors=[], lines=len(lines))
    models = ModelChooser(settings)
    first_line_of: dict[str, int] = {}
    for line_no, line in lines:
        try:
            raw = json.loads(line)
        except ValueError as exc:
            parsed.errors.append(LineError(line_no, f"not valid JSON ({_json_reason(exc)})"))
            continue
        if not isinstance(raw, dict):
            parsed.errors.append(LineError(line_no, f"must be a JSON object (a job spec), not {type(raw).__name__}"))
            continue
        if spec_overrides:
            raw = {**raw, **spec_overrides}
        try:
            spec = models.resolve(parse_spec(raw, settings.limits, layered), named="model" in raw or "model" in layered)
        except SpecError as exc:
            parsed.errors.append(LineError(line_no, str(exc).removeprefix("invalid job spec: ")))
            continue
        job_id = job_id_for(batch_name, spec)
        if job_id in first_line_of:
            parsed.duplicates.append((line_no, first_line_of[job_id]))
            continue
        first_line_of[job_id] = line_no
        parsed.entries.append(BatchEntry(line_no, job_id, spec))
    return parsed


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return str(exc).splitlines()[0]


def specs_to_text(specs: list[dict[str, Any]]) -> str:
    """Inline specs (cron.yaml) as batch-file text, so they take the same validation path as a file."""
    return "\n".join(json.dumps(spec) for spec in specs)


def read_source(settings: FarmSettings, source: str) -> str:
    """The text of a batch file at a local path or an ``s3://bucket/key`` URI."""
    if source.startswith("s3://"):
        from scheduler.core.object_store import ObjectStoreError, get_bytes

        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise BatchError(f"{source!r} is not an s3://bucket/key URI")
        try:
            data = get_bytes(settings.s3.client(), bucket, key)
        except ObjectStoreError as exc:
            raise BatchError(f"cannot read batch file {source}: {exc}") from None
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BatchError(f"cannot read batch file {source}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchError(f"batch file {source} is not UTF-8 text (expected JSON lines)") from None


# --------------------------------------------------------------------------- submission


_STATE_FIELDS = ("state", "spec", *stage_fields(StageField.ATTEMPT))
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
) -> SubmitOutcome:
    """Submit the valid entries of ``parsed``; existing jobs are skipped (or retried with ``resume``)."""
    started = time.perf_counter()
    outcome = SubmitOutcome()
    name = parsed.name
    _write_batch_record(conn, parsed, source)
    images = _ImageStager(settings)
    secret = settings.require_secret()
    for offset in range(0, len(parsed.entries), chunk_size):
        _submit_chunk(conn, name, parsed.entries[offset : offset + chunk_size], resume, outcome, images, secret)
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
                enqueues: list[tuple[StageCall, Routing]] = []
                pipe.multi()
                for entry, fields in zip(chunk, current, strict=True):
                    if fields["state"] is None:
                        spec = images.staged_spec(entry)
                        if spec is None:
                            continue  # its image was refused: reported in outcome.errors
                        jobs.create_job(pipe, entry.job_id, spec, index=False)
                        enqueues.append(
                            (StageCall(entry.job_id, Stage.ENCODE, 1, None), Routing(spec.priority, spec.model))
                        )
                        created.append(entry.job_id)
                    elif resume and fields["state"] in jobs.RETRYABLE_STATES:
                        jobs.queue_retry(pipe, conn, entry.job_id, fields, secret=secret)
                        retried.append(entry.job_id)
                    else:
                        existing.append(entry.job_id)
                jobs.index_jobs(pipe, created)
                jobs.queue_stages(pipe, conn, enqueues, secret=secret)
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
    wanted = [i for i, fields in enumerate(current) if fields["state"] in jobs.RETRYABLE_STATES]
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
