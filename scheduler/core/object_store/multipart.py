"""The streaming multipart upload the decode stage pours MP4 bytes into (lifecycle: the package docstring)."""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

from scheduler.core.object_store.client import (
    DEFAULT_PART_SIZE,
    DEFAULT_RETRY_SECONDS,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    ObjectStoreError,
    S3Client,
    UploadResult,
    _describe,
    _error_code,
    _etag,
    _retrying,
)
from scheduler.core.object_store.objects import _md5_b64, put_bytes, s3_uri


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
