"""Bucket set-up and reachability checks, whole-object reads, writes, listings and deletes, and the incomplete
multipart uploads a crash may leave (listed and aborted)."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from scheduler.core.object_store.client import (
    DEFAULT_RETRY_SECONDS,
    IncompleteUpload,
    MiB,
    ObjectStoreError,
    S3Client,
    UploadResult,
    _describe,
    _endpoint,
    _error_code,
    _etag,
    _http_status,
    _retrying,
)


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
