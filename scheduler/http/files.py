"""OpenAI's Files API, as far as batches need it: upload (purpose ``batch``), retrieve, list, content, delete.

A file's bytes live in the object store under ``<s3.key_prefix>/<http.files_prefix>/<file id>``
(never a name the caller chose); its record (name, size, purpose, time) is a Redis hash. Batch
results are files too, written by ``batches`` with purpose ``batch_output``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from scheduler.core import keys
from scheduler.core.object_store import delete_objects, put_bytes
from scheduler.http.auth import Caller
from scheduler.http.content import stream_object
from scheduler.http.errors import ApiError, not_found
from scheduler.http.ownership import ensure_visible, index_for, indexes_to_write
from scheduler.http.pagination import cursor_page, ids_after
from scheduler.http.state import Front, caller_of, front_of, require_key
from scheduler.intake.tenancy import OWNER_FIELD

router = APIRouter(dependencies=[Depends(require_key)], tags=["files"])

UPLOAD_PURPOSES = ("batch",)
_HINT = "list files with GET /v1/files"
_FIELDS = ("filename", "bytes", "purpose", "created_at")


def file_object_key(front: Front, file_id: str) -> str:
    return f"{front.settings.s3.key_prefix}/{front.settings.http.files_prefix}/{keys.check_id(file_id, 'file id')}"


def store_file(
    front: Front, data: bytes, filename: str, purpose: str, file_id: str | None = None, *, owner: str | None
) -> dict[str, Any]:
    """Put ``data`` in the object store and record it as ``owner``'s (an API key name); the same ``file_id``
    again overwrites (idempotent)."""
    file_id = file_id or "file-" + uuid.uuid4().hex[:24]
    put_bytes(
        front.s3,
        front.settings.s3.bucket,
        file_object_key(front, file_id),
        data,
        "application/jsonl",
        retry_seconds=front.settings.s3.retry_seconds,
    )
    now = time.time()
    record = {"filename": filename[:256], "bytes": str(len(data)), "purpose": purpose, "created_at": repr(now)}
    pipe = front.conn.pipeline(transaction=True)
    stored: dict[str, str] = {**record, **({OWNER_FIELD: owner} if owner else {})}
    pipe.hset(keys.api_file_key(file_id), mapping=stored)  # type: ignore[arg-type]
    for index in indexes_to_write(owner, "files"):
        pipe.zadd(index, {file_id: now})
    pipe.execute()
    return file_object(file_id, record)


def file_object(file_id: str, record: dict[str, str]) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": int(record["bytes"]),
        "created_at": int(float(record["created_at"])),
        "filename": record["filename"],
        "purpose": record["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def read_file_record(front: Front, file_id: str, caller: Caller | None = None) -> dict[str, str]:
    """The file's record; 404 for an unknown or malformed id, or (for ``caller``) another key's file."""
    if not keys.ID_PATTERN.match(file_id):
        raise not_found("file", file_id, _HINT)
    raw = front.conn.hmget(keys.api_file_key(file_id), [*_FIELDS, OWNER_FIELD])
    values = [v.decode() if isinstance(v, bytes) else v for v in raw]  # type: ignore[union-attr]
    if any(v is None for v in values[: len(_FIELDS)]):
        raise not_found("file", file_id, _HINT)
    ensure_visible(caller, values[-1], not_found("file", file_id, _HINT))
    return dict(zip(_FIELDS, values, strict=False))  # type: ignore[arg-type]


# The route reads its multipart form itself (to bound it); this documents it for clients and the fuzz test.
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                    },
                }
            }
        },
    }
}


@router.post("/v1/files", summary="Upload a file (purpose batch)", openapi_extra=_UPLOAD_BODY)
async def upload_file(request: Request) -> dict[str, Any]:
    front = front_of(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "upload the file as multipart/form-data with fields file and purpose", param="file")
    form = await request.form(max_files=1, max_fields=8)
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "file: attach the file to upload (multipart field 'file')", param="file")
    if purpose not in UPLOAD_PURPOSES:
        raise ApiError(
            400,
            f"purpose {purpose!r}: this server takes purpose 'batch' (JSONL of /v1/videos requests)",
            param="purpose",
        )
    data = await upload.read()
    owner = caller_of(request).name
    filename = upload.filename or "upload.jsonl"
    return await run_in_threadpool(lambda: store_file(front, data, filename, str(purpose), owner=owner))


@router.get("/v1/files/{file_id}", summary="Retrieve a file's record")
def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return file_object(file_id, read_file_record(front_of(request), file_id, caller_of(request)))


@router.get("/v1/files", summary="List files")
def list_files(
    request: Request,
    after: str | None = Query(default=None, max_length=96),
    limit: int = Query(default=20, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    front = front_of(request)
    caller = caller_of(request)
    ids = [m.decode() for m in front.conn.zrange(index_for(caller, "files"), 0, -1, desc=order == "desc")]  # type: ignore[union-attr]
    ids = ids_after(ids, after)
    page = ids[:limit]
    data = []
    for file_id in page:
        try:
            data.append(file_object(file_id, read_file_record(front, file_id, caller)))
        except ApiError:
            continue  # deleted between the index read and the record read
    return cursor_page(data, len(ids) > limit)


@router.get("/v1/files/{file_id}/content", summary="Download a file's bytes")
def file_content(
    file_id: str, request: Request, range_header: str | None = Header(default=None, alias="Range")
) -> StreamingResponse:
    front = front_of(request)
    read_file_record(front, file_id, caller_of(request))
    return stream_object(
        front.s3, front.settings.s3.bucket, file_object_key(front, file_id), range_header, "application/jsonl"
    )


@router.delete("/v1/files/{file_id}", summary="Delete a file")
def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    front = front_of(request)
    caller = caller_of(request)
    read_file_record(front, file_id, caller)
    owner = front.conn.hget(keys.api_file_key(file_id), OWNER_FIELD)
    delete_objects(front.s3, front.settings.s3.bucket, [file_object_key(front, file_id)])
    pipe = front.conn.pipeline(transaction=True)
    pipe.delete(keys.api_file_key(file_id))
    for index in indexes_to_write(owner.decode() if isinstance(owner, bytes) else None, "files"):
        pipe.zrem(index, file_id)
    pipe.execute()
    return {"id": file_id, "object": "file", "deleted": True}
