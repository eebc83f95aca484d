"""The S3 client (path-style addressing, checksums only where S3 requires them, timeouts, botocore's
retries), the error translation into one actionable line, and the retry budget of an upload."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectTimeoutError as BotoConnectTimeoutError,
)

from scheduler.core.errors import UserError

# boto3 ships no type information; every client here is a botocore S3 client.
S3Client = Any

MiB = 1024 * 1024
# S3's limits: every part but the last is at least 5 MiB, at most 5 GiB, and at most 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 8 * MiB

# How long an upload keeps retrying a transient failure (endpoint down, 5xx, throttling)
# on top of botocore's own quick retries, before it gives up and aborts.
DEFAULT_RETRY_SECONDS = 30.0
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_ENV_HINT = "check REELFARM_S3_ENDPOINT and that the server is running"
_CRED_HINT = "check REELFARM_S3_ACCESS_KEY and REELFARM_S3_SECRET_KEY"


class ObjectStoreError(UserError, RuntimeError):
    """An object-store operation failed; the message is one line saying what and what to do."""


@dataclass(frozen=True)
class S3Config:
    """Where the farm's objects go. ``endpoint_url=None`` means AWS S3; ``None`` keys mean boto3's default chain."""

    endpoint_url: str | None
    bucket: str
    access_key: str | None
    secret_key: str | None = field(repr=False)
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = "path"

    def with_bucket(self, bucket: str) -> S3Config:
        return S3Config(self.endpoint_url, bucket, self.access_key, self.secret_key, self.region, self.addressing_style)


@dataclass(frozen=True)
class UploadResult:
    key: str
    size: int
    sha256: str  # hex digest of every byte of the object
    etag: str
    parts: int = 1  # 1 for a single PutObject


@dataclass(frozen=True)
class IncompleteUpload:
    key: str
    upload_id: str
    initiated: datetime | None


def make_s3_client(
    cfg: S3Config,
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
) -> S3Client:
    """A botocore S3 client for ``cfg``. Safe to share between threads once made.

    Checksums are computed and validated only when S3 requires them: MinIO,
    SeaweedFS and older gateways reject or mangle the CRC trailers newer boto3
    adds by default (parts carry a Content-MD5 instead, see ``_md5_b64``).
    """
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": cfg.addressing_style},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # "standard" retries throttling, 5xx and connection errors with exponential backoff and jitter.
        retries={"max_attempts": max_attempts, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # A proxy from the environment must never see traffic meant for a server on this machine.
        proxies={} if _is_loopback(cfg.endpoint_url) else None,
    )
    # One session per client: boto3's default session is not thread-safe to create clients from.
    session = boto3.Session()
    return session.client(
        "s3",
        endpoint_url=cfg.endpoint_url or None,
        aws_access_key_id=cfg.access_key or None,
        aws_secret_access_key=cfg.secret_key or None,
        region_name=cfg.region,
        config=config,
    )


def _is_loopback(endpoint_url: str | None) -> bool:
    return bool(endpoint_url) and urlsplit(endpoint_url or "").hostname in _LOOPBACK_HOSTS


def _endpoint(client: S3Client) -> str:
    return str(client.meta.endpoint_url)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _describe(client: S3Client, exc: Exception, what: str) -> ObjectStoreError:
    """Turn a botocore exception into a one-line ``ObjectStoreError`` naming the likely fix."""
    endpoint = _endpoint(client)
    if isinstance(exc, EndpointConnectionError | BotoConnectTimeoutError | ConnectionClosedError | ReadTimeoutError):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ObjectStoreError(f"cannot reach S3 endpoint {endpoint}: {reason}; {_ENV_HINT}")
    if isinstance(exc, NoCredentialsError):
        return ObjectStoreError(
            f"no S3 credentials for {endpoint}; set REELFARM_S3_ACCESS_KEY and REELFARM_S3_SECRET_KEY"
        )
    if isinstance(exc, ClientError):
        code, status = _error_code(exc), _http_status(exc)
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden"} or status == 403:
            return ObjectStoreError(f"S3 endpoint {endpoint} refused {what} ({code or status}); {_CRED_HINT}")
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        return ObjectStoreError(f"S3 {what} failed at {endpoint}: {code or status} {message}".rstrip())
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ObjectStoreError(f"S3 {what} failed at {endpoint}: {reason}")


_T = TypeVar("_T")


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, EndpointConnectionError | BotoConnectTimeoutError | ConnectionClosedError | ReadTimeoutError):
        return True
    if isinstance(exc, ClientError):
        return _http_status(exc) >= 500 or _error_code(exc) in _TRANSIENT_CODES
    return False


def _retrying(client: S3Client, what: str, call: Callable[[], _T], retry_seconds: float) -> _T:
    """Run ``call``, retrying transient failures with exponential backoff for up to ``retry_seconds``.

    Only for idempotent requests (PutObject, UploadPart with its number, ...):
    a retry after a lost response must not change the outcome.
    """
    deadline = time.monotonic() + retry_seconds
    delay = 0.5
    while True:
        try:
            return call()
        except (BotoCoreError, ClientError, OSError) as exc:
            if not _is_transient(exc) or time.monotonic() + delay > deadline:
                raise _describe(client, exc, what) from None
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


# --------------------------------------------------------------------------- buckets


def _etag(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"')
