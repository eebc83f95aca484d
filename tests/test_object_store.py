"""Object storage against a real S3 server (SeaweedFS): multipart streaming, atomic visibility, aborts, errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from scheduler.core.object_store import (
    MiB,
    ObjectStoreError,
    S3Config,
    StreamingMultipartUpload,
    abort_incomplete_uploads,
    check_reachable,
    download_to,
    ensure_bucket,
    get_bytes,
    list_incomplete_uploads,
    make_s3_client,
    object_exists,
    put_bytes,
    s3_uri,
)
from scheduler.local.processes import free_port


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_multipart_upload_round_trips_with_its_sha256(s3_config: S3Config, s3_client: Any) -> None:
    data = os.urandom(11 * MiB + 12345)
    upload = StreamingMultipartUpload(s3_client, s3_config.bucket, "renders/job-1/video.mp4", "video/mp4", 5 * MiB)
    for piece in chunks(data, 700 * 1024):  # ffmpeg hands over uneven pieces
        upload.write(piece)
    assert upload.parts_uploaded == 2  # two full parts went out while writing
    result = upload.complete()

    assert result.parts == 3
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.key == "renders/job-1/video.mp4"
    assert result.etag.endswith("-3")  # S3's multipart ETag: md5-of-md5s, dash, part count
    assert get_bytes(s3_client, s3_config.bucket, result.key) == data
    head = s3_client.head_object(Bucket=s3_config.bucket, Key=result.key)
    assert head["ContentType"] == "video/mp4"
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []


def test_object_is_invisible_until_complete(s3_config: S3Config, s3_client: Any) -> None:
    key = "renders/job-2/video.mp4"
    upload = StreamingMultipartUpload(s3_client, s3_config.bucket, key, "video/mp4", 5 * MiB)
    upload.write(os.urandom(6 * MiB))
    assert upload.parts_uploaded == 1
    assert not object_exists(s3_client, s3_config.bucket, key)
    assert [u.key for u in list_incomplete_uploads(s3_client, s3_config.bucket, "renders/")] == [key]

    upload.complete()
    assert object_exists(s3_client, s3_config.bucket, key)
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []


def test_abort_leaves_no_object_and_no_parts(s3_config: S3Config, s3_client: Any) -> None:
    key = "renders/job-3/video.mp4"
    upload = StreamingMultipartUpload(s3_client, s3_config.bucket, key, "video/mp4", 5 * MiB)
    upload.write(os.urandom(11 * MiB))
    assert upload.parts_uploaded == 2
    upload.abort()
    upload.abort()  # idempotent

    assert not object_exists(s3_client, s3_config.bucket, key)
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []
    with pytest.raises(ObjectStoreError, match="aborted"):
        upload.write(b"more")


def test_an_exception_inside_the_with_block_aborts(s3_config: S3Config, s3_client: Any) -> None:
    key = "renders/job-4/video.mp4"
    with pytest.raises(RuntimeError, match="VAE blew up"):
        with StreamingMultipartUpload(s3_client, s3_config.bucket, key, "video/mp4", 5 * MiB) as upload:
            upload.write(os.urandom(6 * MiB))
            raise RuntimeError("VAE blew up")
    assert not object_exists(s3_client, s3_config.bucket, key)
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []


def test_leaving_the_with_block_without_complete_aborts(s3_config: S3Config, s3_client: Any) -> None:
    key = "renders/job-5/video.mp4"
    with StreamingMultipartUpload(s3_client, s3_config.bucket, key, "video/mp4", 5 * MiB) as upload:
        upload.write(os.urandom(6 * MiB))
    assert not object_exists(s3_client, s3_config.bucket, key)
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []


def test_a_small_object_is_a_single_put(s3_config: S3Config, s3_client: Any) -> None:
    data = b"tiny mp4" * 100
    with StreamingMultipartUpload(s3_client, s3_config.bucket, "small.mp4", "video/mp4") as upload:
        upload.write(data)
        result = upload.complete()
    assert upload.upload_id is None  # no multipart upload was ever created
    assert (result.parts, result.size, result.sha256) == (1, len(data), hashlib.sha256(data).hexdigest())
    assert get_bytes(s3_client, s3_config.bucket, "small.mp4") == data


def test_an_empty_stream_makes_an_empty_object(s3_config: S3Config, s3_client: Any) -> None:
    result = StreamingMultipartUpload(s3_client, s3_config.bucket, "empty.bin").complete()
    assert result.size == 0 and result.sha256 == hashlib.sha256(b"").hexdigest()
    assert get_bytes(s3_client, s3_config.bucket, "empty.bin") == b""


def test_a_retried_upload_overwrites_the_same_key(s3_config: S3Config, s3_client: Any) -> None:
    key = "renders/job-6/video.mp4"
    for fill in (b"a", b"b"):
        with StreamingMultipartUpload(s3_client, s3_config.bucket, key, "video/mp4", 5 * MiB) as upload:
            upload.write(fill * (6 * MiB))
            upload.complete()
    assert get_bytes(s3_client, s3_config.bucket, key) == b"b" * (6 * MiB)


def test_part_size_below_the_s3_minimum_is_refused(s3_client: Any) -> None:
    with pytest.raises(ValueError, match="part_size"):
        StreamingMultipartUpload(s3_client, "bucket", "key", part_size=MiB)


def test_put_get_and_download(s3_config: S3Config, s3_client: Any, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 7)
    result = put_bytes(s3_client, s3_config.bucket, "renders/job-7/poster.jpg", data, "image/jpeg")
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert get_bytes(s3_client, s3_config.bucket, "renders/job-7/poster.jpg") == data

    target = tmp_path / "out" / "poster.jpg"
    assert download_to(s3_client, s3_config.bucket, "renders/job-7/poster.jpg", target) == len(data)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["poster.jpg"]  # no temp file left


def test_download_of_a_missing_key_leaves_no_file(s3_config: S3Config, s3_client: Any, tmp_path: Path) -> None:
    with pytest.raises(ObjectStoreError, match="NoSuchKey"):
        download_to(s3_client, s3_config.bucket, "nope.mp4", tmp_path / "nope.mp4")
    assert list(tmp_path.iterdir()) == []


def test_abort_incomplete_uploads_cleans_up_after_a_crash(s3_config: S3Config, s3_client: Any) -> None:
    crashed = StreamingMultipartUpload(s3_client, s3_config.bucket, "renders/crashed.mp4", part_size=5 * MiB)
    crashed.write(os.urandom(5 * MiB))  # the worker "dies" here: neither complete nor abort
    assert len(list_incomplete_uploads(s3_client, s3_config.bucket)) == 1
    assert abort_incomplete_uploads(s3_client, s3_config.bucket, "renders/") == 1
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []


def test_ensure_bucket_is_idempotent(s3_config: S3Config, s3_client: Any) -> None:
    ensure_bucket(s3_client, s3_config.bucket)
    ensure_bucket(s3_client, s3_config.bucket)
    check_reachable(s3_client, s3_config.bucket)


def test_unreachable_endpoint_is_one_clear_line() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = make_s3_client(S3Config(endpoint, "reelfarm", "ak", "sk"))
    with pytest.raises(ObjectStoreError) as info:
        check_reachable(client, "reelfarm")
    message = str(info.value)
    assert message.startswith(f"cannot reach S3 endpoint {endpoint}: ")
    assert "check REELFARM_S3_ENDPOINT" in message
    assert "\n" not in message


def test_missing_bucket_says_how_to_fix_it(s3_config: S3Config, s3_client: Any) -> None:
    with pytest.raises(ObjectStoreError, match="does not exist .*REELFARM_S3_BUCKET"):
        check_reachable(s3_client, "no-such-bucket-here")


def test_wrong_credentials_say_which_settings(s3_config: S3Config) -> None:
    bad = S3Config(s3_config.endpoint_url, s3_config.bucket, s3_config.access_key, "wrong-secret")
    with pytest.raises(ObjectStoreError, match="REELFARM_S3_ACCESS_KEY and REELFARM_S3_SECRET_KEY"):
        check_reachable(make_s3_client(bad, max_attempts=1), s3_config.bucket)


class FlakyPartClient:
    """Passes every call through to a real client, but the first ``failures`` UploadParts fail to connect."""

    def __init__(self, real: Any, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.meta = real.meta

    def upload_part(self, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise EndpointConnectionError(endpoint_url=self.real.meta.endpoint_url)
        return self.real.upload_part(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_part_upload_retries_through_a_brief_outage(s3_config: S3Config, s3_client: Any) -> None:
    data = os.urandom(6 * MiB)
    flaky = FlakyPartClient(s3_client, failures=2)
    with StreamingMultipartUpload(flaky, s3_config.bucket, "flaky.mp4", part_size=5 * MiB) as upload:
        upload.write(data)
        result = upload.complete()
    assert flaky.failures == 0
    assert result.parts == 2
    assert get_bytes(s3_client, s3_config.bucket, "flaky.mp4") == data


def test_a_lasting_outage_fails_the_upload_and_aborts_it(s3_config: S3Config, s3_client: Any) -> None:
    flaky = FlakyPartClient(s3_client, failures=1000)
    with pytest.raises(ObjectStoreError, match="cannot reach S3 endpoint"):
        with StreamingMultipartUpload(flaky, s3_config.bucket, "down.mp4", part_size=5 * MiB, retry_seconds=1) as up:
            up.write(os.urandom(5 * MiB))
    assert list_incomplete_uploads(s3_client, s3_config.bucket) == []
    assert not object_exists(s3_client, s3_config.bucket, "down.mp4")


def test_config_repr_hides_the_secret() -> None:
    cfg = S3Config("http://127.0.0.1:9000", "b", "access", "very-secret")
    assert "very-secret" not in repr(cfg)


def test_s3_uri() -> None:
    assert s3_uri("reelfarm", "renders/x/video.mp4") == "s3://reelfarm/renders/x/video.mp4"
