"""Conditioning images for image-to-video jobs: fetched, checked and stored once, at submit.

Whatever the source -- a local path (read by the submitter), an ``s3://`` object
or an http(s) URL (fetched under ``scheduler.intake.fetch_policy``: public addresses
only, unless ``fetch.allow`` names a host or range) -- the bytes are checked (decodable,
bounded bytes and pixels) and copied to the job's own input key in the bucket.
Workers then read only that key, so a job never depends on a path or URL that
may change or vanish while it waits in a queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scheduler.core.image_checks import ImageInputError, load_and_check_image, parse_image_source
from scheduler.core.object_store import ObjectStoreError, get_bytes, put_bytes, s3_uri
from scheduler.core.output_keys import output_keys
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError
from scheduler.intake.fetch_policy import FetchPolicy, FetchRefused, fetch


def read_source(source: str, client: Any, max_bytes: int, policy: FetchPolicy | None = None) -> bytes:
    """The bytes of an image source; an http(s) URL is fetched under ``policy`` (public addresses only by default)."""
    kind, where = parse_image_source(source)
    if kind == "path":
        path = Path(where)
        if not path.is_file():
            raise ImageInputError(f"image {where} does not exist or is not a file")
        if path.stat().st_size > max_bytes:
            raise ImageInputError(f"image {where} is {path.stat().st_size} bytes, over the limit {max_bytes}")
        return path.read_bytes()
    if kind == "s3":
        bucket, _, key = where.partition("/")
        try:
            return get_bytes(client, bucket, key)
        except ObjectStoreError as exc:
            raise ImageInputError(f"cannot read image s3://{where}: {exc}") from None
    try:
        return fetch(where, policy or FetchPolicy(max_bytes=max_bytes))
    except FetchRefused as exc:
        raise ImageInputError(str(exc)) from None


def stage_input_image(settings: FarmSettings, spec: JobSpec, job_id: str, client: Any) -> JobSpec:
    """Check the spec's image and store it under the job's input key; returns the spec pointing there."""
    if spec.image is None:
        return spec
    limits = settings.limits
    try:
        policy = FetchPolicy.from_settings(settings.fetch, limits.max_image_bytes)
        data = read_source(spec.image, client, limits.max_image_bytes, policy)
        load_and_check_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    except ImageInputError as exc:
        raise SpecError(f"invalid job spec: image: {exc}") from None
    key = output_keys(settings.s3.key_prefix, spec.output_prefix, job_id).input_image
    put_bytes(
        client, settings.s3.bucket, key, data, "application/octet-stream", retry_seconds=settings.s3.retry_seconds
    )
    return spec.model_copy(update={"image": s3_uri(settings.s3.bucket, key)})
