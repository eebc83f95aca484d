"""Streaming an object from the store to an HTTP client, with single-range ``Range`` support.

Browsers seek in a ``<video>`` with ``Range: bytes=N-``; download tools resume
with it. One range is served as 206 with ``Content-Range``; a header this does
not understand (several ranges, other units) gets the whole object, as RFC 9110
allows; a range past the end is 416. Bytes go from S3 to the client chunk by
chunk: the server never holds a whole video in memory.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import StreamingResponse

from scheduler.core.object_store import head_object, iter_object
from scheduler.http.errors import ApiError

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` a ``Range`` header asks for, ``None`` for the whole object."""
    if not header:
        return None
    match = _RANGE.match(header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):  # "bytes=-N": the last N bytes
        suffix = int(match.group(2))
        if suffix == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - suffix), size - 1
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size or last < first:
        raise _unsatisfiable(header, size)
    return first, min(last, size - 1)


def _unsatisfiable(header: str, size: int) -> ApiError:
    return ApiError(
        416,
        f"Range {header!r} is outside the object's {size} bytes; ask for bytes=0-{max(0, size - 1)} or less",
        param="Range",
        code="range_not_satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )


def stream_object(client: Any, bucket: str, key: str, range_header: str | None, media_type: str) -> StreamingResponse:
    head = head_object(client, bucket, key)
    if head is None:
        raise ApiError(
            404, f"the object for this video is missing from the store ({key}); re-render it", code="not_found"
        )
    wanted = byte_range(range_header, head.size)
    first, last = wanted if wanted is not None else (0, head.size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, last - first + 1))}
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{head.size}"
    if head.size == 0:
        return StreamingResponse(iter(()), status_code=200, media_type=media_type, headers=headers)
    body = iter_object(client, bucket, key, first, last)
    return StreamingResponse(
        body, status_code=206 if wanted is not None else 200, media_type=media_type, headers=headers
    )
