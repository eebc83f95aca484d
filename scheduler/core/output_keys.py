"""Object keys of a job's outputs and checkpoints: deterministic, derived from the job id and configured prefixes.

A retried decode writes to the same keys (overwrite, never duplicate), and no
key is ever built from free-form user text: the optional per-job prefix is
validated to safe path segments by the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.core import keys
from scheduler.core.keys import Hop, Stage


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


def checkpoint_prefix(farm_prefix: str, job_id: str) -> str:
    """Everything checkpointed for ``job_id`` lies under this (deleted together at completion or cancel).

    Checkpoints live under their own farm prefix (settings ``checkpoints.key_prefix``), never beside the
    video: a job's output folder holds exactly its video, poster and metadata.
    """
    return "/".join([p for p in (farm_prefix.strip("/"),) if p] + [keys.check_id(job_id, "job id")]) + "/"


def latents_checkpoint_key(farm_prefix: str, job_id: str, attempt: int, hop: Hop = Stage.TRANSFORM) -> str:
    """The finished latents of transform hop ``hop``'s attempt ``attempt`` (what decode reads when it cannot pull)."""
    return f"{checkpoint_prefix(farm_prefix, job_id)}{hop.slug}-a{int(attempt)}.latents"


def denoise_state_key(farm_prefix: str, job_id: str, attempt: int, hop: Hop = Stage.TRANSFORM) -> str:
    """The latest mid-denoise save of transform hop ``hop``'s attempt ``attempt`` (overwritten at each save)."""
    return f"{checkpoint_prefix(farm_prefix, job_id)}{hop.slug}-a{int(attempt)}.state"
