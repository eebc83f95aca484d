"""Stage calls: the only call a stage worker makes for a queued job, and the signature that proves the farm queued it.

rq imports and calls whatever dotted name a job hash names -- its function and
its success, failure and stopped callbacks -- and sends whatever webhooks it
lists. Without a check, anyone who can write to Redis runs code on every
worker. The descriptor HMAC already says a Redis writer is not trusted with a
worker's memory; the queue must not be a wider door. So a worker checks every
dequeued rq job, in this order, before rq may import anything:

1. shape: the function is exactly ``STAGE_ENTRYPOINT``; no positional arguments,
   no instance; keyword arguments exactly ``job_id`` (an id), ``stage`` (a hop
   of this worker's stage: ``transform`` or ``transform@low`` for a transform worker), ``attempt`` (int >= 1), ``upstream_attempt`` (int >= 1 or
   None, present exactly when the stage has an upstream); no callbacks,
   webhooks or dependencies;
2. signature: an HMAC-SHA256 under the farm secret over the function, the
   arguments and the rq job id, made by whoever enqueued it (the control plane
   or a worker handing on), kept in the rq job's ``meta``. A worker accepts the
   current and the previous secret, so a farm rotates without draining.

A call failing either is *refused*: it is never imported or called; it is taken
out of the queue, its rq job hash deleted, and a record (queue, rq job id, the
function it named, why) kept in a capped list that ``reelfarm info`` shows,
with a count per reason for metrics. If the refused call is the one a farm job
is waiting on (a signature made with a secret this worker does not hold), that
job is failed with the reason and the fix, so nothing waits forever.

rq stays in ``scheduler.core.queues``: this module sees an rq job only as the plain
fields of ``CallFields``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from scheduler.core import keys
from scheduler.core.keys import Hop, Stage

# The function each stage worker runs, referenced by name so the control plane never imports it.
STAGE_ENTRYPOINT = "workers.stage_job.run_stage"
# Where the call's signature travels: rq's job meta, which rq stores but never interprets.
SIGNATURE_META_KEY = "reelfarm_call_signature"
CALL_SIGNATURE_VERSION = 1
# Refusal records kept for `reelfarm info` (newest first); counts per reason are kept forever.
REFUSED_RECORDS_KEPT = 1000
_TEXT_LIMIT = 200


class RefusalReason(StrEnum):
    """Why a dequeued rq job was refused; a small fixed set, so it can be a metric label."""

    UNREADABLE = "unreadable"  # the rq job hash or its data could not be read
    FUNCTION = "function"  # it names a function other than the stage entrypoint
    ARGUMENTS = "arguments"  # the entrypoint with missing, extra or mistyped arguments
    HOOKS = "hooks"  # callbacks, webhooks or dependencies attached
    SIGNATURE = "signature"  # unsigned, or signed with neither accepted secret


class CallRefused(ValueError):
    """A dequeued rq job a stage worker must not run; ``reason`` is the label, the message the detail."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class StageCall:
    """One attempt of one stage of a job: the only thing a stage worker is ever asked to run."""

    job_id: str
    stage: Hop  # the hop of the job's route this call runs (a stage kind, or e.g. transform@low)
    attempt: int
    upstream_attempt: int | None

    def kwargs(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "stage": self.stage.value,
            "attempt": self.attempt,
            "upstream_attempt": self.upstream_attempt,
        }


@dataclass(frozen=True)
class CallFields:
    """What an rq job asks a worker to do, read from its hash without importing or calling anything."""

    rq_job_id: str
    func_name: str | None
    instance: Any = None
    args: Any = ()
    kwargs: Any = field(default_factory=dict)
    callbacks: tuple[str, ...] = ()
    webhooks: int = 0
    dependency_ids: tuple[str, ...] = ()
    meta: Any = field(default_factory=dict)


def _canonical(rq_job_id: str, func_name: str, args: Any, kwargs: Any) -> bytes:
    message = {"v": CALL_SIGNATURE_VERSION, "func": func_name, "args": args, "kwargs": kwargs, "rq_job_id": rq_job_id}
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()


def sign_call(secret: bytes, rq_job_id: str, call: StageCall) -> str:
    """The HMAC a worker checks before running ``call`` under rq job id ``rq_job_id``."""
    return hmac.new(secret, _canonical(rq_job_id, STAGE_ENTRYPOINT, [], call.kwargs()), hashlib.sha256).hexdigest()


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_arguments(fields: CallFields, stage: Stage) -> StageCall:
    kwargs = fields.kwargs
    if fields.instance is not None or fields.args not in ([], ()):
        raise CallRefused(RefusalReason.ARGUMENTS, "the call passes positional arguments or an instance")
    expected = {"job_id", "stage", "attempt", "upstream_attempt"}
    if not isinstance(kwargs, dict) or set(kwargs) != expected:
        names = sorted(kwargs) if isinstance(kwargs, dict) else type(kwargs).__name__
        raise CallRefused(RefusalReason.ARGUMENTS, f"the call's keyword arguments are {names}, not {sorted(expected)}")
    job_id, stage_name, attempt, upstream = (kwargs[k] for k in ("job_id", "stage", "attempt", "upstream_attempt"))
    if not isinstance(job_id, str) or not keys.ID_PATTERN.match(job_id):
        raise CallRefused(RefusalReason.ARGUMENTS, f"job_id {_clip(job_id)} is not a job id")
    try:
        hop = Hop(stage_name) if isinstance(stage_name, str) else None
    except ValueError:
        hop = None
    if hop is None or hop.kind is not stage:
        raise CallRefused(RefusalReason.ARGUMENTS, f"stage {_clip(stage_name)} is not a hop of this worker's stage {stage}")
    if not _is_int(attempt, 1):
        raise CallRefused(RefusalReason.ARGUMENTS, f"attempt {_clip(attempt)} is not an integer >= 1")
    # Every route starts with encode, and only there: encode has no upstream, every other hop has one.
    first = hop.kind is Stage.ENCODE
    if first and upstream is not None:
        raise CallRefused(RefusalReason.ARGUMENTS, f"the {stage} stage has no upstream, yet upstream_attempt is set")
    if not first and not _is_int(upstream, 1):
        raise CallRefused(RefusalReason.ARGUMENTS, f"upstream_attempt {_clip(upstream)} is not an integer >= 1")
    return StageCall(job_id, hop, attempt, upstream)


def vet_call(fields: CallFields, stage: Stage, accepted_secrets: Sequence[bytes]) -> StageCall:
    """The call ``fields`` describes, if a ``stage`` worker may run it; raises ``CallRefused`` otherwise."""
    if fields.func_name != STAGE_ENTRYPOINT:
        raise CallRefused(RefusalReason.FUNCTION, f"names function {_clip(fields.func_name)}, not {STAGE_ENTRYPOINT}")
    if fields.callbacks or fields.webhooks or fields.dependency_ids:
        attached = [*fields.callbacks, *(["webhooks"] if fields.webhooks else []), *fields.dependency_ids]
        raise CallRefused(RefusalReason.HOOKS, f"has callbacks, webhooks or dependencies attached: {_clip(attached)}")
    call = _check_arguments(fields, stage)
    signature = fields.meta.get(SIGNATURE_META_KEY) if isinstance(fields.meta, dict) else None
    if not isinstance(signature, str) or not signature:
        raise CallRefused(RefusalReason.SIGNATURE, "the call is not signed with the farm secret")
    if not any(
        hmac.compare_digest(sign_call(secret, fields.rq_job_id, call), signature) for secret in accepted_secrets
    ):
        raise CallRefused(
            RefusalReason.SIGNATURE, "the call's signature matches neither this worker's secret nor its previous one"
        )
    return call


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 3] + "..."


@dataclass(frozen=True)
class Refusal:
    """One refused rq job, as ``reelfarm info`` shows it."""

    at: float
    queue: str
    rq_job_id: str
    function: str
    reason: str
    detail: str
    worker: str
    job_id: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def record_refusal(pipe: Any, refusal: Refusal) -> None:
    """Keep the refusal where operators look (joins the caller's pipeline)."""
    pipe.lpush(keys.refused_calls_key(), refusal.to_json())
    pipe.ltrim(keys.refused_calls_key(), 0, REFUSED_RECORDS_KEPT - 1)
    pipe.hincrby(keys.refused_counts_key(), refusal.reason, 1)


def refusal_counts(conn: redis.Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = conn.hgetall(keys.refused_counts_key())  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


def recent_refusals(conn: redis.Redis, limit: int = 10) -> list[Refusal]:
    rows: list[bytes] = conn.lrange(keys.refused_calls_key(), 0, max(0, limit - 1))  # type: ignore[assignment]
    out = []
    for raw in rows:
        try:
            entry = json.loads(raw)
            at = float(entry.pop("at"))
            text = {name: printable(entry.get(name, "")) for name in Refusal.__dataclass_fields__ if name != "at"}
            out.append(Refusal(at=at, **text))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # a record planted by hand: not ours to show
    return out


def printable(value: Any) -> str:
    """``value`` as one line of plain text: what a Redis writer chose never reaches a terminal as control codes."""
    text = str(value)
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= _TEXT_LIMIT else clean[: _TEXT_LIMIT - 3] + "..."


def job_id_named(fields: CallFields) -> str:
    """The farm job a refused call claims to be for, if it names one validly (else "")."""
    kwargs = fields.kwargs if isinstance(fields.kwargs, dict) else {}
    job_id = kwargs.get("job_id")
    return job_id if isinstance(job_id, str) and keys.ID_PATTERN.match(job_id) else ""
