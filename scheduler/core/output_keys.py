"""Object keys of a job's outputs: deterministic, derived from the job id and configured prefixes.

A retried decode writes to the same keys (overwrite, never duplicate), and no
key is ever built from free-form user text: the optional per-job prefix is
validated to safe path segments by the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.core import keys


@dataclass(frozen=True)
class OutputKeys:
    video: str
    poster: str
    metadata: str
    # Where submission stores an image-to-video job's conditioning image (whatever its source).
    input_image: str


def output_keys(farm_prefix: str, job_prefix: str | None, job_id: str) -> OutputKeys:
    parts = [p for p in (farm_prefix.strip("/"), job_prefix) if p]
    base = "/".join([*parts, keys.check_id(job_id, "job id")])
    return OutputKeys(
        video=f"{base}/video.mp4",
        poster=f"{base}/poster.jpg",
        metadata=f"{base}/metadata.json",
        input_image=f"{base}/input-image",
    )
