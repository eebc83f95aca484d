"""Decode output: streaming VAE decode -> ffmpeg (fragmented MP4 on a pipe) -> S3 multipart upload.

Frames leave the VAE one latent frame at a time and the encoded bytes leave for
S3 as ffmpeg produces them, so neither the whole video nor its frames are ever
held in memory. The poster (first frame, JPEG) and a metadata JSON land beside
the video under deterministic keys; the video object only exists once its
multipart upload completed -- a failure aborts the upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scheduler.core import jobs, worker_metrics
from scheduler.core.object_store import (
    ObjectStoreError,
    StreamingMultipartUpload,
    abort_incomplete_uploads,
    put_bytes,
    s3_uri,
)
from scheduler.core.output_keys import output_keys
from scheduler.core.spec import JobSpec
from workers.fault_injection import UPLOAD_POINT, pause_if_injected
from workers.video_encoder import FfmpegStreamEncoder, codec_from_options, encode_jpeg

if TYPE_CHECKING:
    # Only the type: the runtime builds the stages that call this module, so a real import would loop back.
    from workers.stage_seam import ComputeContext
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.sharded_decode import ShardedVaeDecoder

log = logging.getLogger("reelfarm.decode")


def _upload_sink(upload: StreamingMultipartUpload) -> Callable[[bytes], None]:
    """``upload.write``, plus the fault-injection pause point after the first part (tests only)."""
    first_part_seen = False

    def write(data: bytes) -> None:
        nonlocal first_part_seen
        upload.write(data)
        if not first_part_seen and upload.parts_uploaded:
            first_part_seen = True
            pause_if_injected(UPLOAD_POINT)

    return write


def render_and_upload(
    rt: ComputeContext,
    decoder: StreamingVaeDecoder | ShardedVaeDecoder,
    job_id: str,
    spec: JobSpec,
    latents: torch.Tensor,
) -> dict[str, Any]:
    bucket = rt.settings.s3.bucket
    out = output_keys(rt.settings.s3.key_prefix, spec.output_prefix, job_id)
    codec = codec_from_options(spec.codec.name, spec.codec.crf, spec.codec.preset)
    started = time.monotonic()
    frames_written = 0
    poster: np.ndarray | None = None
    raw_digest = hashlib.sha256()
    retry = rt.settings.s3.retry_seconds
    # An earlier attempt that died mid-upload left parts behind: the key is deterministic, so clear them.
    # Best effort: with the store down there is nothing to list; the upload below retries on its own.
    try:
        abort_incomplete_uploads(rt.s3, bucket, out.video)
    except ObjectStoreError as exc:
        log.warning("could not clear earlier uploads of %s: %s", out.video, exc)
    with StreamingMultipartUpload(rt.s3, bucket, out.video, "video/mp4", retry_seconds=retry) as upload:
        with FfmpegStreamEncoder(spec.width, spec.height, spec.fps, codec, sink=_upload_sink(upload)) as encoder:
            for chunk in decoder.iter_frames(latents):
                if poster is None:
                    poster = chunk[0].copy()
                raw_digest.update(np.ascontiguousarray(chunk).tobytes())
                encoder.write_frames(chunk)
                frames_written += chunk.shape[0]
        uploaded = upload.complete()
    decode_seconds = time.monotonic() - started
    assert poster is not None, "the VAE produced no frames"
    poster_bytes = encode_jpeg(poster)
    put_bytes(rt.s3, bucket, out.poster, poster_bytes, "image/jpeg", retry_seconds=retry)
    status = jobs.read_status(rt.conn, job_id)
    timings = {name: float(stage["seconds"]) for name, stage in status["stages"].items() if "seconds" in stage}
    timings["decode"] = round(decode_seconds, 3)
    result = {
        "video": s3_uri(bucket, out.video),
        "poster": s3_uri(bucket, out.poster),
        "metadata": s3_uri(bucket, out.metadata),
        "video_key": out.video,
        "bytes": uploaded.size,
        "sha256": uploaded.sha256,
        "frames": frames_written,
        "width": spec.width,
        "height": spec.height,
        "fps": spec.fps,
        "codec": spec.codec.name,
    }
    metadata = {
        "job_id": job_id,
        "spec": spec.model_dump(mode="json"),
        "result": result,
        "frames_sha256": raw_digest.hexdigest(),
        "timings_seconds": timings,
        "workers": {name: stage.get("worker") for name, stage in status["stages"].items()},
        "attempts": {name: int(stage.get("attempt", 1)) for name, stage in status["stages"].items()},
        "model": spec.model,
        "model_dir": rt.settings.model_dirs()[spec.model].name,
        # The adapters the DiT ran with, with the checksums of the bytes loaded (spec.loras has names and scales).
        "loras": (status["stages"].get("transform", {}).get("dit") or {}).get("loras", []),
        "created_at": status["created_at"],
        "finished_at": time.time(),
    }
    metadata_bytes = json.dumps(metadata, indent=2).encode()
    put_bytes(rt.s3, bucket, out.metadata, metadata_bytes, "application/json", retry_seconds=retry)
    worker_metrics.observe_upload(uploaded.size + len(poster_bytes) + len(metadata_bytes))
    return result
