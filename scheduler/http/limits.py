"""Request size limits, enforced before a body is read: 413 in OpenAI's error shape.

A pure ASGI middleware (so it sees the byte stream, not a parsed body): a
declared ``Content-Length`` over the limit is refused at once; a body sent
without one (chunked) is counted as it arrives and refused when it passes the
limit. Multipart requests (image and batch-file uploads) get the upload limit,
everything else the JSON limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.http.errors import error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_json_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, scope: Scope) -> int:
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        return self.max_upload_bytes if content_type.startswith("multipart/") else self.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        seen = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not refused:
                    # Answer now and tell the app the client went away: it stops reading, and whatever
                    # it would still answer is dropped below (FastAPI would turn a raised error into a 400).
                    refused = True
                    if not started:
                        await _refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counting_receive, tracking_send)


async def _refuse(send: Send, limit: int) -> None:
    body: dict[str, Any] = error_body(
        f"the request body is over this server's limit of {limit:,} bytes; send less (split a batch file, "
        "shrink the image) or raise http.max_json_bytes / http.max_upload_bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
