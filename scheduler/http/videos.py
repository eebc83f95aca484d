"""OpenAI's Videos API on the farm: create, retrieve, list, download content, delete.

A video is a reelfarm job (its id is the job id); creating one is the farm's own
``submit`` -- validated in full before anything is written, image checked and
stored once -- so the API adds no second path into the queues. Request mapping
is ``video_requests``, the response object ``video_objects``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from scheduler.core import keys
from scheduler.core.job_record import read_records
from scheduler.core.object_store import delete_objects, put_bytes, s3_uri
from scheduler.core.output_keys import output_keys
from scheduler.core.spec import JobSpec
from scheduler.http import video_requests
from scheduler.http.auth import Caller
from scheduler.http.content import stream_object
from scheduler.http.errors import ApiError, not_found
from scheduler.http.ownership import ensure_visible, index_for
from scheduler.http.pagination import cursor_page
from scheduler.http.quotas import check_job_quota
from scheduler.http.state import Front, caller_of, front_of, require_key
from scheduler.http.video_objects import video_object
from scheduler.intake.submit import submit
from scheduler.intake.tenancy import OWNER_FIELD, REQUEST_DIGEST_FIELD
from scheduler.ops.job_removal import delete_job, is_deleted

router = APIRouter(dependencies=[Depends(require_key)], tags=["videos"])

# How soon the SDK's poll helper should ask again (it reads this header).
POLL_AFTER_MS = "500"
_HINT = "list videos with GET /v1/videos"

_JSON_SCHEMA = video_requests.VideoCreateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
# Schemas the create body refers to, for the app's /openapi.json (the route parses its body itself,
# JSON or multipart, so FastAPI does not see a body model to document).
COMPONENT_SCHEMAS: dict[str, Any] = {
    "VideoCreateRequest": {k: v for k, v in _JSON_SCHEMA.items() if k != "$defs"},
    **_JSON_SCHEMA.get("$defs", {}),
}
_MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1},
        "model": {"type": "string"},
        "seconds": {"type": "string"},
        "size": {"type": "string"},
        "input_reference": {"type": "string", "format": "binary"},
    },
}
_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/VideoCreateRequest"}},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


def read_video(front: Front, video_id: str, caller: Caller | None = None) -> dict[str, str | None]:
    """The job record behind ``video_id``; 404 for an unknown, malformed or deleted id, or another key's."""
    if not keys.ID_PATTERN.match(video_id):
        raise not_found("video", video_id, _HINT)
    _, fields = next(read_records(front.conn, [video_id]))
    if fields is None or "state" not in fields or is_deleted(fields):
        raise not_found("video", video_id, _HINT)
    ensure_visible(caller, fields.get(OWNER_FIELD), not_found("video", video_id, _HINT))
    return fields


async def _request_fields(request: Request) -> tuple[dict[str, Any], UploadFile | None]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=64)
        upload: UploadFile | None = None
        items: list[tuple[str, Any]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "input_reference":
                    raise ApiError(400, f"{name}: only input_reference may be a file", param=name, code="invalid_value")
                upload = value
            else:
                items.append((name, value))
        return video_requests.form_to_dict(items), upload
    return video_requests.decode_json_body(await request.body()), None


def _submit_video(
    front: Front, spec: dict[str, Any], job_id: str, image: bytes | None, caller: Caller, digest: str | None
) -> dict[str, Any]:
    settings = front.settings
    if digest is not None:
        _check_reuse(front, job_id, digest)
    staged: str | None = None
    if image is not None:
        # The upload takes the farm's one image path (checked, then copied to the job's input key).
        staged = f"{settings.s3.key_prefix}/{settings.http.files_prefix}/uploads/{job_id}"
        put_bytes(front.s3, settings.s3.bucket, staged, image, retry_seconds=settings.s3.retry_seconds)
        spec = {**spec, "image": s3_uri(settings.s3.bucket, staged)}
    try:
        submit(front.conn, settings, spec, job_id=job_id, owner=caller.name, request_digest=digest)
    finally:
        if staged is not None:
            delete_objects(front.s3, settings.s3.bucket, [staged])
    if digest is not None:
        _check_reuse(front, job_id, digest)  # again: a concurrent create with another body may have won
    if settings.http.webhooks:
        front.conn.zadd(keys.api_watch_key(), {f"video:{job_id}": time.time()}, nx=True)
    return video_object(job_id, read_video(front, job_id, caller))


def _check_reuse(front: Front, job_id: str, digest: str) -> None:
    """422 when the video an ``Idempotency-Key`` made was asked for with a different body (the IETF
    idempotency-key draft and Stripe: a reused key must not silently answer with the first request's object)."""
    stored = front.conn.hget(keys.job_key(job_id), REQUEST_DIGEST_FIELD)
    if stored is not None and stored.decode() != digest:  # type: ignore[union-attr]
        raise ApiError(
            422,
            "Idempotency-Key was already used with a different request body; "
            "send the same body to retry, or use a new Idempotency-Key for a new video",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )


@router.post("/v1/videos", openapi_extra=_CREATE_BODY, summary="Create a video")
async def create_video(
    request: Request, idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")
) -> JSONResponse:
    front = front_of(request)
    raw, upload = await _request_fields(request)
    if upload is not None and "input_reference" in raw:
        raise ApiError(400, "input_reference: give a file or a reference, not both", param="input_reference")
    parsed = video_requests.parse_request(raw)
    spec = video_requests.to_spec(parsed, front.settings)
    image = None
    if upload is not None:
        image = await upload.read(front.settings.limits.max_image_bytes + 1)
        if len(image) > front.settings.limits.max_image_bytes:
            raise ApiError(
                400,
                f"input_reference: the image is over the farm's limit of {front.settings.limits.max_image_bytes:,} bytes",
                param="input_reference",
                code="invalid_value",
            )
    caller = caller_of(request)
    job_id = video_requests.new_video_id(idempotency_key, caller.name)
    digest = None if idempotency_key is None else video_requests.request_digest(raw, image)
    if digest is None or not front.conn.exists(keys.job_key(job_id)):
        check_job_quota(front, caller, spec)  # a retry of a create that was made is no new job
    created = await run_in_threadpool(_submit_video, front, spec, job_id, image, caller, digest)
    return JSONResponse(created)


@router.get("/v1/videos/{video_id}", summary="Retrieve a video")
def retrieve_video(video_id: str, request: Request) -> JSONResponse:
    body = video_object(video_id, read_video(front_of(request), video_id, caller_of(request)))
    return JSONResponse(body, headers={"openai-poll-after-ms": POLL_AFTER_MS})


@router.get("/v1/videos", summary="List videos")
def list_videos(
    request: Request,
    after: str | None = Query(default=None, max_length=96),
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    front = front_of(request)
    index = index_for(caller_of(request), "videos")
    if after is None:
        low, high = "-inf", "+inf"
    else:
        score = front.conn.zscore(index, after) if keys.ID_PATTERN.match(after) else None
        if score is None:
            raise ApiError(
                400, f"after: no video {after!r} to page after; use last_id of the previous page", param="after"
            )
        low, high = ("-inf", f"({score!r}") if order == "desc" else (f"({score!r}", "+inf")
    if order == "desc":
        raw_ids = front.conn.zrevrangebyscore(index, high, low, start=0, num=limit + 1)
    else:
        raw_ids = front.conn.zrangebyscore(index, low, high, start=0, num=limit + 1)
    ids = [m.decode() for m in raw_ids]  # type: ignore[union-attr]
    data = [
        video_object(job_id, fields)
        for job_id, fields in read_records(front.conn, ids[:limit])
        if fields is not None and not is_deleted(fields)
    ]
    return cursor_page(data, len(ids) > limit)


@router.get("/v1/videos/{video_id}/content", summary="Download a video's MP4 or its thumbnail (poster)")
def video_content(
    video_id: str,
    request: Request,
    variant: Literal["video", "thumbnail", "spritesheet"] = "video",
    range_header: str | None = Header(default=None, alias="Range"),
) -> StreamingResponse:
    front = front_of(request)
    fields = read_video(front, video_id, caller_of(request))
    if variant == "spritesheet":
        raise ApiError(400, "variant 'spritesheet' is not made by this farm; use video or thumbnail", param="variant")
    video = video_object(video_id, fields)
    if video["status"] != "completed":
        raise ApiError(
            409,
            f"video {video_id} is {video['status']}; download its content once status is completed",
            code="video_not_ready",
        )
    spec = JobSpec.model_validate_json(fields.get("spec") or "")
    out = output_keys(front.settings.s3.key_prefix, spec.output_prefix, video_id)
    key, media_type = (out.video, "video/mp4") if variant == "video" else (out.poster, "image/jpeg")
    return stream_object(front.s3, front.settings.s3.bucket, key, range_header, media_type)


@router.delete("/v1/videos/{video_id}", summary="Delete a video (cancels it if unfinished)")
def remove_video(video_id: str, request: Request) -> dict[str, Any]:
    front = front_of(request)
    read_video(front, video_id, caller_of(request))
    delete_job(front.conn, front.settings, video_id, front.s3)
    return {"id": video_id, "object": "video.deleted", "deleted": True}
