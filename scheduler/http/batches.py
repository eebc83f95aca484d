"""OpenAI's Batch API for ``/v1/videos``, on reelfarm's own batch submission.

Lifecycle of ``POST /v1/batches``:

1. read the input file (JSONL of ``{custom_id, method, url, body}``) and check
   every line: method POST, url ``/v1/videos``, a unique ``custom_id``, a body
   that maps to a job spec (``video_requests``). A bad line becomes an error
   result (an OpenAI error body with status 400), never a job.
2. the good lines go through ``ops.batch`` (``parse_batch`` + ``submit_batch``)
   as the reelfarm batch named after the batch id: validated again line by
   line, job ids derived from the batch and the spec (idempotent: identical
   lines share a job), submitted in pipelined chunks.
3. each input line's outcome (job id or error) is kept by line number, so
   results are keyed by ``custom_id`` in input order.
4. reading the batch (``GET``, or the front's watcher) counts its jobs; once
   all have finished the output file (one line per succeeded request) and the
   error file (invalid lines, failed and cancelled renders) are written in
   OpenAI's batch output format under ids derived from the batch id, so two
   readers finalizing at once write the same files.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from scheduler.core import keys
from scheduler.core.job_record import JobState, read_records
from scheduler.core.object_store import ObjectStoreError, get_bytes
from scheduler.core.spec import SpecError
from scheduler.http import video_requests
from scheduler.http.admission import drop_held, held_job_ids, hold_back
from scheduler.http.auth import Caller
from scheduler.http.errors import INVALID_REQUEST, ApiError, error_body, not_found
from scheduler.http.files import file_object_key, read_file_record, store_file
from scheduler.http.ownership import ensure_visible, index_for, indexes_to_write
from scheduler.http.pagination import cursor_page, ids_after
from scheduler.http.quotas import check_batch_lines, check_batch_quota
from scheduler.http.state import Front, caller_of, front_of, require_key
from scheduler.http.video_objects import video_object
from scheduler.intake.tenancy import OWNER_FIELD
from scheduler.ops.batch import parse_batch, specs_to_text, submit_batch
from scheduler.ops.job_admin import cancel_jobs

router = APIRouter(dependencies=[Depends(require_key)], tags=["batches"])

ENDPOINT = "/v1/videos"
_HINT = "list batches with GET /v1/batches"
_FAILED_STATES = {JobState.FAILED.value, JobState.CANCELLED.value}
_FINISHED_STATES = {JobState.SUCCEEDED.value, *_FAILED_STATES}


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=96)
    endpoint: Literal["/v1/videos"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


@dataclass(frozen=True)
class RequestOutcome:
    """One input line: the job it became, or why it did not."""

    line: int
    custom_id: str
    job_id: str | None = None
    error: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps({"custom_id": self.custom_id, "job_id": self.job_id, "error": self.error})


def _line_error(line: int, custom_id: str, message: str, param: str | None = None) -> RequestOutcome:
    return RequestOutcome(line, custom_id, error=error_body(message, INVALID_REQUEST, param, "invalid_value")["error"])


def read_input_lines(text: str, front: Front) -> tuple[list[tuple[int, str, dict[str, Any]]], list[RequestOutcome]]:
    """``(line, custom_id, raw spec)`` for each usable line, and an error outcome for each other line."""
    good: list[tuple[int, str, dict[str, Any]]] = []
    bad: list[RequestOutcome] = []
    seen: set[str] = set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            bad.append(_line_error(line_no, f"line-{line_no}", f"line {line_no} is not valid JSON ({exc})"))
            continue
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 512:
            bad.append(_line_error(line_no, f"line-{line_no}", f"line {line_no}: give a custom_id string", "custom_id"))
            continue
        if custom_id in seen:
            bad.append(
                _line_error(line_no, custom_id, f"custom_id {custom_id!r} is used twice; make each unique", "custom_id")
            )
            continue
        seen.add(custom_id)
        if item.get("method") != "POST" or item.get("url") != ENDPOINT:
            message = f"line {line_no}: this batch's endpoint is POST {ENDPOINT}; set method and url to that"
            bad.append(_line_error(line_no, custom_id, message, "url"))
            continue
        if not isinstance(item.get("body"), dict):
            bad.append(_line_error(line_no, custom_id, f"line {line_no}: body must be a JSON object", "body"))
            continue
        try:
            spec = video_requests.to_spec(video_requests.parse_request(item["body"]), front.settings)
        except ApiError as exc:
            bad.append(RequestOutcome(line_no, custom_id, error=exc.body()["error"]))
            continue
        good.append((line_no, custom_id, spec))
    return good, bad


def _submit(
    front: Front, batch_id: str, good: list[tuple[int, str, dict[str, Any]]], source: str, caller: Caller
) -> list[RequestOutcome]:
    """Submit the good lines as the reelfarm batch ``batch_id``; an outcome per line, in any order.

    A user key's lines beyond its admission window are held back (``admission``) and enter the queues as
    its earlier jobs finish; their outcome is already their job id.
    """
    parsed = parse_batch(
        specs_to_text([spec for _, _, spec in good]), front.settings, name=batch_id, source=source, conn=front.conn
    )
    largest = max((e.spec.frames * e.spec.width * e.spec.height for e in parsed.entries), default=0)
    check_batch_quota(front, caller, largest)
    admitted = hold_back(front, caller, batch_id, parsed.entries)
    outcome = submit_batch(
        front.conn, front.settings, replace(parsed, entries=admitted), source=source, owner=caller.name
    )
    # parse_batch numbers the spec text's lines from 1: spec line n is good[n - 1].
    by_spec_line = {e.line_no: e.job_id for e in parsed.entries}
    for line, first in parsed.duplicates:
        by_spec_line[line] = by_spec_line[first]
    refused = {e.line_no: e.reason for e in parsed.errors + outcome.errors}
    results = []
    for n, (line_no, custom_id, _) in enumerate(good, start=1):
        if n in refused:
            results.append(_line_error(line_no, custom_id, f"invalid job spec: {refused[n]}"))
        else:
            results.append(RequestOutcome(line_no, custom_id, job_id=by_spec_line[n]))
    return results


def create_batch(front: Front, request: BatchCreateRequest, caller: Caller) -> dict[str, Any]:
    read_file_record(front, request.input_file_id, caller)
    try:
        data = get_bytes(front.s3, front.settings.s3.bucket, file_object_key(front, request.input_file_id))
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "input_file_id: the file is not UTF-8 JSONL", param="input_file_id") from None
    batch_id = "batch_" + uuid.uuid4().hex[:24]
    check_batch_lines(caller, sum(1 for line in text.splitlines() if line.strip()))
    good, bad = read_input_lines(text, front)
    if not good and not bad:
        raise ApiError(400, "input_file_id: the file has no requests; one JSON request per line", param="input_file_id")
    try:
        submitted = _submit(front, batch_id, good, request.input_file_id, caller) if good else []
    except SpecError as exc:  # the whole batch refused (not one line): nothing was written
        raise ApiError(400, str(exc), param="input_file_id") from None
    now = repr(time.time())
    pipe = front.conn.pipeline(transaction=True)
    pipe.hset(keys.api_batch_requests_key(batch_id), mapping={str(o.line): o.to_json() for o in [*submitted, *bad]})
    pipe.hset(
        keys.api_batch_key(batch_id),
        mapping={
            "input_file_id": request.input_file_id,
            "endpoint": request.endpoint,
            "completion_window": request.completion_window,
            "metadata": json.dumps(request.metadata),
            "created_at": now,
            "in_progress_at": now,
            OWNER_FIELD: caller.name,
        },
    )
    for index in indexes_to_write(caller.name, "batches"):
        pipe.zadd(index, {batch_id: float(now)})
    if front.settings.http.webhooks:
        pipe.zadd(keys.api_watch_key(), {f"batch:{batch_id}": float(now)}, nx=True)
    pipe.execute()
    return batch_object(front, batch_id)


def _outcomes(front: Front, batch_id: str) -> list[RequestOutcome]:
    raw: dict[bytes, bytes] = front.conn.hgetall(keys.api_batch_requests_key(batch_id))  # type: ignore[assignment]
    outcomes = []
    for line, value in raw.items():
        item = json.loads(value)
        outcomes.append(RequestOutcome(int(line), item["custom_id"], item["job_id"], item["error"]))
    return sorted(outcomes, key=lambda o: o.line)


def _record(front: Front, batch_id: str, caller: Caller | None = None) -> dict[str, str]:
    if not keys.ID_PATTERN.match(batch_id):
        raise not_found("batch", batch_id, _HINT)
    raw: dict[bytes, bytes] = front.conn.hgetall(keys.api_batch_key(batch_id))  # type: ignore[assignment]
    if not raw:
        raise not_found("batch", batch_id, _HINT)
    record = {k.decode(): v.decode() for k, v in raw.items()}
    ensure_visible(caller, record.get(OWNER_FIELD), not_found("batch", batch_id, _HINT))
    return record


def _result_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def _result_line(batch_id: str, outcome: RequestOutcome, response: dict[str, Any] | None, error: Any) -> str:
    digest = hashlib.sha256(f"{batch_id}:{outcome.line}".encode()).hexdigest()
    return json.dumps(
        {
            "id": f"batch_req_{digest[:24]}",
            "custom_id": outcome.custom_id,
            "response": None if response is None else {**response, "request_id": f"req_{digest[24:48]}"},
            "error": error,
        }
    )


def _finalize(
    front: Front,
    batch_id: str,
    outcomes: list[RequestOutcome],
    records: dict[str, Any],
    owner: str | None,
    cancelled: bool,
) -> dict[str, str]:
    output, errors = [], []
    for outcome in outcomes:
        if outcome.error is not None:
            errors.append(_result_line(batch_id, outcome, {"status_code": 400, "body": {"error": outcome.error}}, None))
            continue
        fields = records.get(outcome.job_id or "") or {
            "state": JobState.FAILED.value,
            # No record: a line the cancel dropped while it waited for admission, or an expired record.
            "error": "cancelled before it entered the queues" if cancelled else "the job record expired",
        }
        video = video_object(outcome.job_id or "", fields)
        if video["status"] == "completed":
            output.append(_result_line(batch_id, outcome, {"status_code": 200, "body": video}, None))
        else:
            errors.append(_result_line(batch_id, outcome, None, video["error"]))
    done: dict[str, str] = {}
    for kind, lines, field in (("output", output, "output_file_id"), ("errors", errors, "error_file_id")):
        if lines:
            file_id = _result_file_id(batch_id, kind)
            data = ("\n".join(lines) + "\n").encode()
            store_file(front, data, f"{batch_id}_{kind}.jsonl", "batch_output", file_id, owner=owner)
            done[field] = file_id
    return done


def batch_object(front: Front, batch_id: str, caller: Caller | None = None) -> dict[str, Any]:
    """The batch as OpenAI shows it; finalizes it (result files, end time) once all its jobs have finished."""
    record = _record(front, batch_id, caller)
    outcomes = _outcomes(front, batch_id)
    job_ids = sorted({o.job_id for o in outcomes if o.job_id})
    held = held_job_ids(front, batch_id)
    # Only the states while it runs (one field per job); whole records once, when the results are written.
    # A line held back at admission has no record yet: it is waiting, not gone.
    states = {
        job_id: (fields or {}).get("state") or (JobState.QUEUED.value if job_id in held else JobState.FAILED.value)
        for job_id, fields in read_records(front.conn, job_ids, ("state",))
    }
    completed = sum(1 for o in outcomes if o.job_id and states[o.job_id] == JobState.SUCCEEDED.value)
    failed = sum(1 for o in outcomes if o.error is not None or states.get(o.job_id or "") in _FAILED_STATES)
    ended = "completed_at" in record or "cancelled_at" in record
    if not ended and all(state in _FINISHED_STATES for state in states.values()):
        now = repr(time.time())
        end_field = "cancelled_at" if "cancelling_at" in record else "completed_at"
        records = {job_id: fields for job_id, fields in read_records(front.conn, job_ids) if fields is not None}
        results = _finalize(front, batch_id, outcomes, records, record.get(OWNER_FIELD), "cancelling_at" in record)
        update = {**results, "finalizing_at": now, end_field: now}
        front.conn.hset(keys.api_batch_key(batch_id), mapping=update)  # type: ignore[arg-type]
        record.update(update)
    if "cancelled_at" in record:
        status = "cancelled"
    elif "completed_at" in record:
        status = "completed"
    elif "cancelling_at" in record:
        status = "cancelling"
    else:
        status = "in_progress"

    def when(name: str) -> int | None:
        return int(float(record[name])) if name in record else None

    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": record["endpoint"],
        "errors": None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": status,
        "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"),
        "created_at": when("created_at"),
        "in_progress_at": when("in_progress_at"),
        "expires_at": None,
        "finalizing_at": when("finalizing_at"),
        "completed_at": when("completed_at"),
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": when("cancelling_at"),
        "cancelled_at": when("cancelled_at"),
        "request_counts": {"total": len(outcomes), "completed": completed, "failed": failed},
        "metadata": json.loads(record.get("metadata") or "null"),
    }


@router.post("/v1/batches", summary="Create a batch of /v1/videos requests from an uploaded JSONL file")
async def create(body: BatchCreateRequest, request: Request) -> dict[str, Any]:
    front = front_of(request)
    try:
        return await run_in_threadpool(create_batch, front, body, caller_of(request))
    except ObjectStoreError as exc:
        raise ApiError(503, f"cannot read the input file: {exc}", error_type="server_error") from None


@router.get("/v1/batches/{batch_id}", summary="Retrieve a batch")
def retrieve(batch_id: str, request: Request) -> dict[str, Any]:
    return batch_object(front_of(request), batch_id, caller_of(request))


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch: queued jobs leave, running ones stop")
def cancel(batch_id: str, request: Request) -> dict[str, Any]:
    front = front_of(request)
    caller = caller_of(request)
    record = _record(front, batch_id, caller)
    if "completed_at" not in record and "cancelled_at" not in record:
        front.conn.hsetnx(keys.api_batch_key(batch_id), "cancelling_at", repr(time.time()))
        # First: no held line is admitted after the cancel (the dropped ones never became jobs).
        never_queued = drop_held(front, batch_id, record.get(OWNER_FIELD))
        cancel_jobs(front.conn, sorted({o.job_id for o in _outcomes(front, batch_id) if o.job_id} - never_queued))
    return batch_object(front, batch_id, caller)


@router.get("/v1/batches", summary="List batches")
def list_batches(
    request: Request,
    after: str | None = Query(default=None, max_length=96),
    limit: int = Query(default=20, ge=1, le=100),
) -> dict[str, Any]:
    front = front_of(request)
    caller = caller_of(request)
    ids = [m.decode() for m in front.conn.zrevrange(index_for(caller, "batches"), 0, -1)]  # type: ignore[union-attr]
    ids = ids_after(ids, after)
    data = [batch_object(front, batch_id, caller) for batch_id in ids[:limit]]
    return cursor_page(data, len(ids) > limit)
