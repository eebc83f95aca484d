"""The job record's vocabulary: its field names, its states, and how many records are read at once.

One Redis hash per job (``keys.job_key``); all values are strings::

    spec, state, stage, created_at, updated_at, error, result (JSON), failures (JSON),
    cancel_requested, retries, attempt_base, ...
    preemptions (hand-backs of a stopping worker, not charged to max_attempts),
    recovery ("recomputed transform (checkpoint missing)": finished DiT work was redone),
    decode_only ("1" while a ``decode-from`` re-render must not recompute the DiT)
    route (JSON: the hops in order, ``scheduler.core.route``; absent = encode, transform, decode)
    <hop>.state  <hop>.worker  <stage>.attempt  <stage>.started_at
    <hop>.finished_at  <hop>.seconds  <hop>.progress ("done/total")
    <hop>.recovery ("pulled", "from checkpoint ...", "pulled; resumed at step n")
    <transform hop>.steps_computed (DiT steps run, over every attempt of this run)
    <transform hop>.checkpoint / .resume (JSON ``CheckpointRef``: latents / mid-denoise save)
    <hop>.preempted (attempts of the hop queued by a preemption: free of its attempt budget)

A hop is ``encode``, ``transform``, ``transform@high``... (``keys.Hop``): per-stage fields are per hop.

Nothing else in the project spells a per-stage field or a state: code names a
field with ``stage_field(stage, StageField.ATTEMPT)`` and a state with the
enums below, and Lua scripts get state values injected from the same enums
(``lua_finished``), so a renamed state cannot leave a script behind. Many
records are read through ``read_records`` (pipelined, in chunks); a record
that expired after it was indexed is ``None`` there and ``VANISHED`` in counts.
``scheduler.core.jobs`` owns the writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from scheduler.core import keys
from scheduler.core.keys import Hop, Stage, all_hops, hops_of_kind
from scheduler.core.spec import JobSpec

# Reads of many records go in pipelined chunks of this many: one round trip each, bounded memory.
READ_CHUNK = 1000
# What counts and reports call a record that expired (retention) after its id was indexed.
VANISHED = "expired"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class StageState(StrEnum):
    """One stage of one job: queued, then running, then done -- or failed/cancelled with the job."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StageField(StrEnum):
    STATE = "state"
    WORKER = "worker"
    ATTEMPT = "attempt"
    STARTED_AT = "started_at"
    FINISHED_AT = "finished_at"
    SECONDS = "seconds"
    # The model's share of SECONDS (the decode stage's upload included); the rest is the farm's own
    # work inside the stage: pulling the input, publishing the output, record writes.
    COMPUTE_SECONDS = "compute_seconds"
    # The hand-off into this stage: payload bytes pulled from the upstream worker and the pull's seconds
    # (claim, transfer, checksum, ack). Absent for encode, which has no upstream stage.
    INPUT_BYTES = "input_bytes"
    PULL_SECONDS = "pull_seconds"
    PROGRESS = "progress"
    # Transform only: how the DiT ran (speed options, DiT calls, calls a step cache skipped), as JSON.
    DIT = "dit"
    # How this attempt got its input or starting point (pulled, from a checkpoint, resumed at a step).
    RECOVERY = "recovery"
    # DiT steps actually computed, summed over the attempts of this run (a resumed attempt adds only its own).
    STEPS_COMPUTED = "steps_computed"
    # The object-store checkpoint of the finished latents, and the latest mid-denoise save (``CheckpointRef``).
    CHECKPOINT = "checkpoint"
    RESUME = "resume"
    # Attempts of this stage queued because a stopping worker handed the job back (not charged to max_attempts).
    PREEMPTED = "preempted"


def stage_field(stage: Hop | str, name: StageField) -> str:
    """The record field holding ``name`` for hop ``stage``, e.g. ``transform.attempt``, ``transform@low.attempt``."""
    return f"{Hop(stage).value}.{name.value}"


def stage_fields(name: StageField) -> tuple[str, ...]:
    """``name`` for every hop a route may have, in pipeline order (``encode.attempt``, ``transform.attempt``,
    ``transform@high.attempt``, ...): reads that must not first read the route use it."""
    return tuple(stage_field(hop, name) for hop in all_hops())


def lua_finished(var: str) -> str:
    """A Lua condition true when ``var`` holds a finished job state (injected, never spelled in a script)."""
    return "(" + " or ".join(f"{var} == '{state.value}'" for state in sorted(FINISHED_STATES)) + ")"


def attempt_of(fields: Mapping[str, Any], stage: Hop) -> int:
    """The stage's current attempt number (0 when it never ran)."""
    return int(fields.get(stage_field(stage, StageField.ATTEMPT)) or 0)


def stage_state_of(fields: Mapping[str, Any], stage: Hop) -> str | None:
    value = fields.get(stage_field(stage, StageField.STATE))
    return str(value) if value is not None else None


def kind_state(fields: Mapping[str, Any], kind: Stage) -> str | None:
    """One stage kind's state over its hops (a split loop's ``transform@high`` and ``transform@low``), for views
    that show stages, not hops: the latest hop's state that has one -- "running" while a job sits between two
    hops of the kind (the first done, the next queued)."""
    states = [stage_state_of(fields, hop) for hop in hops_of_kind(kind)]
    present = [state for state in states if state is not None]
    if not present:
        return None
    if present[-1] == StageState.QUEUED and StageState.DONE in present[:-1]:
        return StageState.RUNNING.value
    return present[-1]


def kind_progress(fields: Mapping[str, Any], kind: Stage) -> str | None:
    """The latest ``done/total`` progress of ``kind``'s hops (transform hops count steps over the whole loop)."""
    for hop in reversed(hops_of_kind(kind)):
        value = fields.get(stage_field(hop, StageField.PROGRESS))
        if value:
            return str(value)
    return None


def kind_fields(name: StageField, kind: Stage) -> tuple[str, ...]:
    """``name`` for each hop of ``kind`` (what ``kind_state`` / ``kind_progress`` read)."""
    return tuple(stage_field(hop, name) for hop in hops_of_kind(kind))


def is_finished(fields: Mapping[str, Any]) -> bool:
    """True for a finished job -- and for a record whose state this farm does not know (planted by hand)."""
    try:
        return JobState(str(fields.get("state"))).finished
    except ValueError:
        return True


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint object lies and what its bytes must hash to (the record is trusted; the bucket is not)."""

    key: str
    checksum: str
    nbytes: int
    attempt: int
    step: int  # steps the saved state covers (the total for finished latents)

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": self.key,
                "checksum": self.checksum,
                "bytes": self.nbytes,
                "attempt": self.attempt,
                "step": self.step,
            }
        )


def checkpoint_ref(fields: Mapping[str, Any], stage: Hop, name: StageField) -> CheckpointRef | None:
    """The checkpoint the record names in ``<stage>.<name>``, or None (absent or unreadable)."""
    raw = fields.get(stage_field(stage, name))
    try:
        entry = json.loads(raw) if raw else None
        if not isinstance(entry, dict):
            return None
        return CheckpointRef(
            str(entry["key"]), str(entry["checksum"]), int(entry["bytes"]), int(entry["attempt"]), int(entry["step"])
        )
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Routing:
    """Which queues a job's stages go to."""

    priority: str = "default"
    model: str = keys.DEFAULT_MODEL


def routing_of(raw_spec: str | None) -> Routing:
    """The priority and model of a stored spec, parsed through ``JobSpec``; an unreadable spec routes to the
    defaults (the stage that takes it fails the job with the reason)."""
    try:
        spec = JobSpec.model_validate_json(raw_spec or "")
    except ValueError:
        return Routing()
    return Routing(spec.priority, spec.model)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def read_records(
    conn: Any, job_ids: Sequence[str], fields: Sequence[str] | None = None
) -> Iterator[tuple[str, dict[str, str | None] | None]]:
    """``(job_id, fields)`` for each id, in order; ``None`` for a record that vanished.

    ``fields=None`` reads whole records (HGETALL); otherwise just those fields
    (HMGET, missing ones ``None``). One pipelined round trip per ``READ_CHUNK`` ids.
    """
    for offset in range(0, len(job_ids), READ_CHUNK):
        chunk = job_ids[offset : offset + READ_CHUNK]
        pipe = conn.pipeline(transaction=False)
        for job_id in chunk:
            if fields is None:
                pipe.hgetall(keys.job_key(job_id))
            else:
                pipe.hmget(keys.job_key(job_id), list(fields))
        for job_id, raw in zip(chunk, pipe.execute(), strict=True):
            if fields is None:
                record = {_text(k) or "": _text(v) for k, v in raw.items()}
                yield job_id, (record or None)
            else:
                values = dict(zip(fields, (_text(v) for v in raw), strict=True))
                # A live record has at least its state and spec: all-missing means it expired.
                yield job_id, (values if any(v is not None for v in values.values()) else None)


def count_states(conn: Any, job_ids: Iterable[str]) -> dict[str, int]:
    """How many of ``job_ids`` are in each job state (``VANISHED`` for expired records)."""
    counts: dict[str, int] = {}
    for _, record in read_records(conn, list(job_ids), ("state",)):
        state = (record or {}).get("state") or VANISHED
        counts[state] = counts.get(state, 0) + 1
    return counts
