"""Object storage on S3-compatible servers (AWS S3, MinIO, SeaweedFS): the only module that imports boto3/botocore.

It owns the client settings (path-style addressing, checksums only where S3
requires them, timeouts, retries with backoff), bucket set-up and reachability
checks with errors a person can act on, and the streaming multipart upload the
decode stage pours MP4 bytes into.

``StreamingMultipartUpload`` lifecycle:

1. ``write(data)`` buffers; whenever ``part_size`` bytes are buffered one part
   is uploaded (the multipart upload itself is created with the first part, so
   an object smaller than one part becomes a single ``PutObject``);
2. ``complete()`` uploads the rest as the last part and completes the upload --
   only now does the object appear, whole, at its key (S3 semantics), so a
   retried job overwrites instead of duplicating;
3. ``abort()`` (or leaving a ``with`` block by an exception, or without
   ``complete()``) aborts the multipart upload, so no orphan parts are billed
   or left behind.

Why one module of ~560 lines rather than several: boto3 enters the project
through exactly one module (STYLE.md), and the retry policy, the error
translation into actionable messages and the multipart upload share the same
client and exception types; splitting it would spread boto3 imports again.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
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


def check_reachable(client: S3Client, bucket: str) -> None:
    """Raise ``ObjectStoreError`` unless the endpoint answers and ``bucket`` exists and is ours."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _http_status(exc) == 404 or _error_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
            raise ObjectStoreError(
                f"bucket {bucket!r} does not exist at S3 endpoint {_endpoint(client)}; "
                "create it or set REELFARM_S3_BUCKET"
            ) from None
        raise _describe(client, exc, f"access to bucket {bucket!r}") from None
    except (BotoCoreError, OSError) as exc:
        raise _describe(client, exc, f"HeadBucket {bucket!r}") from None


def ensure_bucket(client: S3Client, bucket: str) -> None:
    """Create ``bucket`` unless it exists (idempotent; a concurrent creator is fine)."""
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if not (_http_status(exc) == 404 or _error_code(exc) in {"404", "NoSuchBucket", "NotFound"}):
            raise _describe(client, exc, f"access to bucket {bucket!r}") from None
    except (BotoCoreError, OSError) as exc:
        raise _describe(client, exc, f"HeadBucket {bucket!r}") from None
    kwargs: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    # us-east-1 is the one region S3 refuses an explicit LocationConstraint for.
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise _describe(client, exc, f"CreateBucket {bucket!r}") from None
    except (BotoCoreError, OSError) as exc:
        raise _describe(client, exc, f"CreateBucket {bucket!r}") from None


def list_bucket_names(client: S3Client) -> list[str]:
    try:
        response = client.list_buckets()
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _describe(client, exc, "ListBuckets") from None
    return [str(b["Name"]) for b in response.get("Buckets", [])]


def remove_bucket(client: S3Client, bucket: str) -> None:
    """Delete every object and incomplete upload in ``bucket``, then the bucket (tests and maintenance)."""
    try:
        abort_incomplete_uploads(client, bucket)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
    except ClientError as exc:
        if _error_code(exc) == "NoSuchBucket":
            return
        raise _describe(client, exc, f"removing bucket {bucket!r}") from None
    except (BotoCoreError, OSError) as exc:
        raise _describe(client, exc, f"removing bucket {bucket!r}") from None


# --------------------------------------------------------------------------- whole objects


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _md5_b64(data: bytes | memoryview) -> str:
    # Content-MD5 makes S3 reject a body damaged in transit; cheap next to encoding the video.
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def put_bytes(
    client: S3Client,
    bucket: str,
    key: str,
    data: bytes,
    content_type: str = "application/octet-stream",
    metadata: dict[str, str] | None = None,
    retry_seconds: float = DEFAULT_RETRY_SECONDS,
) -> UploadResult:
    """Upload a small object in one request (poster frames, metadata JSON); it appears whole or not at all."""
    response = _retrying(
        client,
        f"PutObject {s3_uri(bucket, key)}",
        lambda: client.put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            ContentMD5=_md5_b64(data),
            Metadata=metadata or {},
        ),
        retry_seconds,
    )
    return UploadResult(key, len(data), hashlib.sha256(data).hexdigest(), _etag(response), parts=1)


def get_bytes(client: S3Client, bucket: str, key: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes; with ``max_bytes``, an object larger than that is refused before it is read whole."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        if max_bytes is None:
            return bytes(response["Body"].read())
        data = bytes(response["Body"].read(max_bytes + 1))
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _describe(client, exc, f"GetObject {s3_uri(bucket, key)}") from None
    if len(data) > max_bytes:
        response["Body"].close()
        raise ObjectStoreError(f"{s3_uri(bucket, key)} is larger than the {max_bytes} bytes expected; it is not ours")
    return data


def delete_objects_under(client: S3Client, bucket: str, prefix: str, older_than: datetime | None = None) -> int:
    """Delete the objects under ``prefix`` (only those last modified before ``older_than``, if given); returns how many."""
    if not prefix:
        raise ValueError("refusing to delete a whole bucket: give a prefix")
    deleted = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            doomed = [
                {"Key": obj["Key"]}
                for obj in page.get("Contents", [])
                if older_than is None or obj["LastModified"] < older_than
            ]
            if doomed:
                client.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
                deleted += len(doomed)
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _describe(client, exc, f"deleting objects under {s3_uri(bucket, prefix)}") from None
    return deleted


@dataclass(frozen=True)
class ObjectHead:
    size: int
    content_type: str


def head_object(client: S3Client, bucket: str, key: str) -> ObjectHead | None:
    """Size and content type of an object, or ``None`` when there is none at ``key``."""
    try:
        response = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _http_status(exc) == 404 or _error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise _describe(client, exc, f"HeadObject {s3_uri(bucket, key)}") from None
    except (BotoCoreError, OSError) as exc:
        raise _describe(client, exc, f"HeadObject {s3_uri(bucket, key)}") from None
    return ObjectHead(int(response["ContentLength"]), str(response.get("ContentType") or "application/octet-stream"))


def object_exists(client: S3Client, bucket: str, key: str) -> bool:
    return head_object(client, bucket, key) is not None


def iter_object(
    client: S3Client, bucket: str, key: str, first: int = 0, last: int | None = None, chunk_size: int = MiB
) -> Iterator[bytes]:
    """The bytes ``first..last`` (inclusive, as in an HTTP Range) of an object, streamed in chunks.

    The request is made before the first chunk is yielded, so a missing object fails before a caller
    has started an answer of its own.
    """
    what = f"GetObject {s3_uri(bucket, key)}"
    byte_range = f"bytes={first}-{'' if last is None else last}"
    try:
        body = client.get_object(Bucket=bucket, Key=key, Range=byte_range)["Body"]
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _describe(client, exc, what) from None

    def chunks() -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise _describe(client, exc, what) from None
        finally:
            body.close()

    return chunks()


def delete_objects(client: S3Client, bucket: str, object_keys: list[str]) -> None:
    """Delete these objects (missing ones are fine: deleting is idempotent in S3)."""
    for key in object_keys:
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise _describe(client, exc, f"DeleteObject {s3_uri(bucket, key)}") from None


def download_to(client: S3Client, bucket: str, key: str, path: Path, chunk_size: int = MiB) -> int:
    """Stream an object into ``path`` (written beside it, then renamed: never a half file). Returns its size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
                for chunk in body.iter_chunks(chunk_size):
                    fh.write(chunk)
                    size += len(chunk)
            except (BotoCoreError, ClientError, OSError) as exc:
                raise _describe(client, exc, f"GetObject {s3_uri(bucket, key)}") from None
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return size


# --------------------------------------------------------------------------- incomplete uploads


def _iter_incomplete(client: S3Client, bucket: str, prefix: str) -> Iterator[IncompleteUpload]:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            yield IncompleteUpload(str(upload["Key"]), str(upload["UploadId"]), upload.get("Initiated"))


def list_incomplete_uploads(client: S3Client, bucket: str, prefix: str = "") -> list[IncompleteUpload]:
    """Multipart uploads started and neither completed nor aborted (tests and maintenance)."""
    try:
        return list(_iter_incomplete(client, bucket, prefix))
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _describe(client, exc, f"ListMultipartUploads {s3_uri(bucket, prefix)}") from None


def abort_incomplete_uploads(
    client: S3Client, bucket: str, prefix: str = "", older_than: datetime | None = None
) -> int:
    """Abort incomplete multipart uploads under ``prefix`` (optionally only those started before ``older_than``)."""
    aborted = 0
    try:
        for upload in list(_iter_incomplete(client, bucket, prefix)):
            if older_than is not None and upload.initiated is not None and upload.initiated >= older_than:
                continue
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=upload.key, UploadId=upload.upload_id)
            except ClientError as exc:
                if _error_code(exc) != "NoSuchUpload":  # someone else finished or aborted it meanwhile
                    raise
            aborted += 1
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _describe(client, exc, f"aborting uploads under {s3_uri(bucket, prefix)}") from None
    return aborted


# --------------------------------------------------------------------------- streaming multipart upload


def _etag(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"')


class StreamingMultipartUpload:
    """Upload a byte stream of unknown length to one key, part by part, as it is produced.

    Not thread-safe: one producer calls ``write`` (e.g. the ffmpeg reader
    thread), then ``complete`` or ``abort``. Memory use is about one part.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        content_type: str = "application/octet-stream",
        part_size: int = DEFAULT_PART_SIZE,
        metadata: dict[str, str] | None = None,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes (S3 limits)")
        self.client = client
        self.bucket = bucket
        self.key = key
        self.content_type = content_type
        self.part_size = part_size
        self.metadata = dict(metadata or {})
        self.retry_seconds = retry_seconds
        self.upload_id: str | None = None
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._state: Literal["open", "completed", "aborted"] = "open"
        self.result: UploadResult | None = None

    @property
    def uri(self) -> str:
        return s3_uri(self.bucket, self.key)

    @property
    def parts_uploaded(self) -> int:
        return len(self._parts)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != "open":
            raise ObjectStoreError(f"upload to {self.uri} is already {self._state}; start a new one")
        if not data:
            return
        self._sha256.update(data)
        self.size += len(data)
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[: self.part_size])
            del self._buffer[: self.part_size]
            self._upload_part(part)

    def _start(self) -> None:
        # Not retried: a lost response would leave an upload nobody knows the id of.
        try:
            response = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType=self.content_type, Metadata=self.metadata
            )
        except (BotoCoreError, ClientError, OSError) as exc:
            raise _describe(self.client, exc, f"CreateMultipartUpload {self.uri}") from None
        self.upload_id = str(response["UploadId"])

    def _upload_part(self, part: bytes) -> None:
        if self.upload_id is None:
            self._start()
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise ObjectStoreError(
                f"{self.uri} needs more than {MAX_PARTS} parts of {self.part_size} bytes; raise the part size"
            )
        upload_id = self.upload_id
        response = _retrying(
            self.client,
            f"UploadPart {number} of {self.uri}",
            # Re-sending a part under the same number replaces it: safe to retry.
            lambda: self.client.upload_part(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=part,
                ContentMD5=_md5_b64(part),
            ),
            self.retry_seconds,
        )
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def complete(self) -> UploadResult:
        """Upload what is buffered and make the object visible. Returns what was stored."""
        if self._state == "completed" and self.result is not None:
            return self.result
        if self._state != "open":
            raise ObjectStoreError(f"upload to {self.uri} was aborted; start a new one")
        try:
            if self.upload_id is None:
                # Smaller than one part: a single PUT, and no multipart upload ever existed.
                result = put_bytes(
                    self.client,
                    self.bucket,
                    self.key,
                    bytes(self._buffer),
                    self.content_type,
                    self.metadata,
                    self.retry_seconds,
                )
                etag, parts = result.etag, 1
            else:
                if self._buffer:
                    self._upload_part(bytes(self._buffer))
                try:
                    response = self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        MultipartUpload={"Parts": self._parts},
                    )
                except (BotoCoreError, ClientError, OSError) as exc:
                    raise _describe(self.client, exc, f"CompleteMultipartUpload {self.uri}") from None
                etag, parts = _etag(response), len(self._parts)
        except BaseException as failure:
            self._abort_after(failure)
            raise
        self._buffer = bytearray()
        self._state = "completed"
        self.result = UploadResult(self.key, self.size, self._sha256.hexdigest(), etag, parts)
        return self.result

    def abort(self) -> None:
        """Throw the upload away; S3 deletes every uploaded part. Idempotent, a no-op after ``complete``."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = bytearray()
        if self.upload_id is None:
            return
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except ClientError as exc:
            if _error_code(exc) != "NoSuchUpload":
                raise _describe(self.client, exc, f"AbortMultipartUpload {self.uri}") from None
        except (BotoCoreError, OSError) as exc:
            raise _describe(self.client, exc, f"AbortMultipartUpload {self.uri}") from None

    def __enter__(self) -> StreamingMultipartUpload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.abort()  # a no-op when complete() ran; otherwise nothing half-done stays behind
        else:
            self._abort_after(exc)

    def _abort_after(self, failure: BaseException) -> None:
        try:
            self.abort()
        except ObjectStoreError as abort_error:
            # The original failure stays the error; the abort that also failed rides along as a note.
            failure.add_note(f"also failed to abort the multipart upload: {abort_error}")
