"""``GET /v1/usage``: jobs, videos, video-seconds, DiT-seconds and decode-seconds per API key and day
(``scheduler.ops.usage``), for admin keys: one tenant's usage is not another's to read."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from scheduler.http.errors import ApiError
from scheduler.http.state import caller_of, front_of, require_key
from scheduler.ops.usage import UsageError, parse_since, usage_rows

router = APIRouter(dependencies=[Depends(require_key)], tags=["usage"])


@router.get("/v1/usage", summary="Usage per API key and day (admin keys)")
def usage(
    request: Request,
    key: str | None = Query(default=None, max_length=64, pattern=r"^(\(cli\)|[A-Za-z0-9_-]{1,64})$"),
    since: str = Query(default="7d", max_length=16),
) -> dict[str, Any]:
    if not caller_of(request).admin:
        raise ApiError(
            403,
            "GET /v1/usage needs an admin API key (http.api_keys role admin)",
            error_type="permission_error",
            code="admin_key_required",
        )
    try:
        seconds = parse_since(since)
    except UsageError as exc:
        raise ApiError(400, str(exc), param="since", code="invalid_value") from None
    rows = usage_rows(front_of(request).conn, seconds, key)
    return {"object": "list", "data": [row.as_json() for row in rows], "has_more": False}
