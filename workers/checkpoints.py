"""Checkpoints of the DiT's work in the object store: a transform's finished latents and its mid-denoise saves.

The DiT is the expensive stage; lineage recompute (``scheduler.core.recovery``) stays for the cheap ones.

Write (transform worker): 1. capture the tensors on the host (the loop and the hand-off go on at once)
2. serialize with safetensors (tensors plus string metadata: no pickle, nothing that runs code)
3. hash the object's bytes 4. PutObject under ``output_keys.latents_checkpoint_key`` /
``denoise_state_key`` 5. name it -- key, size, checksum, step -- in the job record, fenced on the
writing attempt still being current (``jobs.record_checkpoint``); a write that lost that race deletes
its object, so a job that completed or was cancelled meanwhile keeps none. Steps 2-5 run on the
worker's one background I/O thread (``ComputeContext.background``): a hand-off never waits for S3; a
preemption waits for its own save.

Read (decode that cannot pull; a transform attempt that resumes): 1. the record (Redis, the trust
boundary) names the object, its size and checksum 2. GetObject, refusing anything larger 3. verify the
checksum *before* parsing 4. safetensors parses the verified bytes 5. names, dtypes and shapes are
checked against the job before any stage computes on them. Any failure means "no checkpoint": the
caller falls back to lineage.

Lifetime: everything of a job lies under ``output_keys.checkpoint_prefix``; it is deleted when the
video is complete (or kept ``checkpoints.retention_days`` and swept later) and when the job is cancelled;
an hourly sweep deletes leftovers (a failed job's) after ``orphan_days``.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from scheduler.core import jobs
from scheduler.core.job_record import CheckpointRef, StageField, checkpoint_ref
from scheduler.core.keys import Hop, Stage
from scheduler.core.object_store import ObjectStoreError, delete_objects_under, get_bytes, put_bytes
from scheduler.core.output_keys import checkpoint_prefix, denoise_state_key, latents_checkpoint_key
from scheduler.core.spec import JobSpec
from workers.models.ti2v import WAN21_COMPRESSION, VaeCompression, vae_compression
from workers.stages.denoise_state import DenoiseState
from workers.transfer.packing import ChecksumMismatch, bytes_checksum, verify_bytes

if TYPE_CHECKING:
    from workers.stage_seam import ComputeContext

log = logging.getLogger("reelfarm.checkpoints")

FORMAT = "reelfarm-checkpoint/1"
LATENTS = "latents"
# safetensors' header: an 8-byte little-endian length, then that much JSON.
_HEADER_LENGTH = struct.Struct("<Q")
SWEEP_INTERVAL_SECONDS = 3600.0


class CheckpointUnusable(RuntimeError):
    """A named checkpoint that cannot be used (missing, too large, checksum or shape wrong); fall back to lineage."""


# --------------------------------------------------------------------------- writing


def save_latents(
    rt: ComputeContext, job_id: str, attempt: int, latents: torch.Tensor, steps: int, hop: Hop = Stage.TRANSFORM
) -> Future[bool]:
    """Checkpoint a finished transform's latents in the background; the future says whether the record names it."""
    key = latents_checkpoint_key(rt.settings.checkpoints.key_prefix, job_id, attempt, hop)
    return rt.background.submit(
        _write, rt, job_id, attempt, hop, StageField.CHECKPOINT, key, {LATENTS: latents}, {"step": str(steps)}
    )


def save_state(
    rt: ComputeContext, job_id: str, attempt: int, state: DenoiseState, hop: Hop = Stage.TRANSFORM
) -> Future[bool]:
    """Checkpoint a mid-denoise state (already a host copy) of transform hop ``hop`` in the background,
    replacing this attempt's last one."""
    key = denoise_state_key(rt.settings.checkpoints.key_prefix, job_id, attempt, hop)
    return rt.background.submit(
        _write, rt, job_id, attempt, hop, StageField.RESUME, key, state.tensors, state_metadata(state)
    )


def _write(
    rt: ComputeContext,
    job_id: str,
    attempt: int,
    hop: Hop,
    name: StageField,
    key: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> bool:
    started = time.monotonic()
    data = serialize(tensors, {"job_id": job_id, **metadata})
    checksum = bytes_checksum(data)
    bucket = rt.settings.s3.bucket
    try:
        put_bytes(rt.s3, bucket, key, data, retry_seconds=rt.settings.s3.retry_seconds)
    except ObjectStoreError as exc:
        # A lost checkpoint only loses the shortcut: recovery falls back to lineage.
        log.warning("job %s: checkpoint %s not written: %s", job_id, key, exc)
        return False
    ref = CheckpointRef(key, checksum, len(data), attempt, int(metadata["step"]))
    # Latents outlive a completed job when retention keeps them (for decode-from), even if the decode won the race.
    kept = name is StageField.CHECKPOINT and rt.settings.checkpoints.retention_days > 0
    if jobs.record_checkpoint(rt.conn, job_id, hop, attempt, name, ref.to_json(), kept=kept):
        log.info("job %s: checkpointed %s (%d bytes, %.3fs)", job_id, key, len(data), time.monotonic() - started)
        return True
    # Superseded, completed or cancelled while writing: nobody will read it, so it must not stay.
    _delete_quietly(rt, key)
    return False


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A checkpoint object: safetensors bytes (host copies of ``tensors``) with our format tag in the metadata."""
    host = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return safetensors.torch.save(host, metadata={**metadata, "format": FORMAT})


def parse(data: bytes, checksum: str, key: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint object whose bytes hash to ``checksum`` (checked before parsing)."""
    try:
        verify_bytes(data, checksum)
    except ChecksumMismatch as exc:
        raise CheckpointUnusable(f"{key}: {exc}") from None
    try:
        metadata = _metadata(data)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, not {FORMAT}")
        return safetensors.torch.load(data), metadata
    except (ValueError, safetensors.SafetensorError) as exc:
        raise CheckpointUnusable(f"{key} is not a reelfarm checkpoint: {exc}") from None


def state_metadata(state: DenoiseState) -> dict[str, str]:
    return {"step": str(state.step), "total": str(state.total), "scheduler": json.dumps(state.scheduler)}


def state_from_parsed(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    spec: JobSpec,
    key: str = "checkpoint",
    compression: VaeCompression = WAN21_COMPRESSION,
) -> DenoiseState:
    """The `DenoiseState` a parsed checkpoint holds, checked against ``spec``; ``CheckpointUnusable`` if it does not fit."""
    _check_latents(tensors.get(LATENTS), spec, key, compression)
    try:
        scheduler = json.loads(metadata.get("scheduler", "{}"))
        step, total = int(metadata["step"]), int(metadata["total"])
    except (KeyError, ValueError):
        raise CheckpointUnusable(f"{key} has unreadable step metadata") from None
    if not isinstance(scheduler, dict) or total != spec.steps or not 0 < step < total:
        raise CheckpointUnusable(f"{key} is at step {step} of {total}; the job has {spec.steps} steps")
    return DenoiseState(step, total, tensors, scheduler)


def _delete_quietly(rt: ComputeContext, key: str) -> None:
    try:
        delete_objects_under(rt.s3, rt.settings.s3.bucket, key)
    except ObjectStoreError as exc:
        log.warning("could not delete checkpoint %s: %s", key, exc)


# --------------------------------------------------------------------------- reading


def latents_from_checkpoint(
    rt: ComputeContext, job_id: str, spec: JobSpec, hop: Hop = Stage.TRANSFORM
) -> tuple[dict[str, torch.Tensor], int]:
    """The checkpointed latents of the job's current attempt of (last) transform hop ``hop`` and that attempt;
    ``CheckpointUnusable`` when there is none or it fails a check."""
    fields = jobs.job_fields(rt.conn, job_id)
    ref = checkpoint_ref(fields, hop, StageField.CHECKPOINT)
    if ref is None:
        raise CheckpointUnusable("no latents checkpoint recorded")
    tensors, _ = _read(rt, ref)
    latents = tensors.get(LATENTS)
    if set(tensors) != {LATENTS} or latents is None:
        raise CheckpointUnusable(f"{ref.key} holds {sorted(tensors)}, not just {LATENTS}")
    _check_latents(latents, spec, ref.key, _job_compression(rt, spec))
    return {LATENTS: latents.to(rt.settings.worker.device)}, ref.attempt


def state_from_checkpoint(
    rt: ComputeContext, job_id: str, spec: JobSpec, hop: Hop = Stage.TRANSFORM
) -> DenoiseState | None:
    """The job's last mid-denoise save of transform hop ``hop`` (from any earlier attempt of this run), or None;
    a bad one is logged."""
    ref = checkpoint_ref(jobs.job_fields(rt.conn, job_id), hop, StageField.RESUME)
    if ref is None:
        return None
    try:
        state = state_from_parsed(*_read(rt, ref), spec, ref.key, _job_compression(rt, spec))
        if state.step != ref.step:
            raise CheckpointUnusable(f"{ref.key} is at step {state.step}; the record says {ref.step}")
    except CheckpointUnusable as exc:
        log.warning("job %s: cannot resume from the saved denoising state (%s); starting over", job_id, exc)
        return None
    return state


def _read(rt: ComputeContext, ref: CheckpointRef) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = get_bytes(rt.s3, rt.settings.s3.bucket, ref.key, max_bytes=ref.nbytes)
    except ObjectStoreError as exc:
        raise CheckpointUnusable(f"{ref.key}: {exc}") from None
    return parse(data, ref.checksum, ref.key)


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata in a safetensors blob's header (bounds-checked; safetensors itself keeps it from us)."""
    if len(data) < _HEADER_LENGTH.size:
        raise ValueError("too short")
    (length,) = _HEADER_LENGTH.unpack_from(data)
    if length > len(data) - _HEADER_LENGTH.size:
        raise ValueError("header runs past the end")
    header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("unreadable metadata")
    return metadata


def _job_compression(rt: ComputeContext, spec: JobSpec) -> VaeCompression:
    # The job's model's VAE sets the latent size (16x for Wan2.2-TI2V); Wan2.1's where the dir is not known here.
    model_dir = rt.settings.model_dirs().get(spec.model)
    return WAN21_COMPRESSION if model_dir is None else vae_compression(model_dir)


def _check_latents(
    latents: torch.Tensor | None, spec: JobSpec, key: str, compression: VaeCompression = WAN21_COMPRESSION
) -> None:
    """The latents' shape must be the job's: [1, C, 1 + (frames - 1) / 4, height / 8, width / 8] (Wan2.1's VAE;
    ``compression`` gives another's), float32."""
    frames = (spec.frames - 1) // compression.temporal + 1
    expected = (frames, spec.height // compression.spatial, spec.width // compression.spatial)
    if (
        latents is None
        or latents.dtype != torch.float32
        or latents.dim() != 5
        or latents.shape[0] != 1
        or tuple(latents.shape[2:]) != expected
    ):
        shape = None if latents is None else (latents.dtype, list(latents.shape))
        raise CheckpointUnusable(
            f"{key} holds latents {shape}; this job needs float32 [1, C, {', '.join(map(str, expected))}]"
        )


# --------------------------------------------------------------------------- lifetime


def delete_job_checkpoints(client: Any, bucket: str, key_prefix: str, job_id: str) -> int:
    """Delete every checkpoint of ``job_id`` (completion without retention, cancel); returns how many."""
    return delete_objects_under(client, bucket, checkpoint_prefix(key_prefix, job_id))


def on_job_ended(rt: ComputeContext, job_id: str, *, completed: bool) -> None:
    """A job completed or was cancelled on this worker: drop its checkpoints unless retention keeps them."""
    settings = rt.settings.checkpoints
    if rt.s3 is None:
        return
    if not (completed and settings.retention_days > 0):
        try:
            delete_job_checkpoints(rt.s3, rt.settings.s3.bucket, settings.key_prefix, job_id)
        except ObjectStoreError as exc:
            log.warning("job %s: checkpoints not deleted (%s); the retention sweep will", job_id, exc)
    if completed:
        sweep_expired(rt)


_last_sweep = 0.0


def sweep_expired(rt: ComputeContext, now: float | None = None) -> int:
    """Delete checkpoints older than the retention window (at least ``orphan_days``: failed jobs' leftovers),
    at most once per ``SWEEP_INTERVAL_SECONDS`` per worker; returns how many went."""
    global _last_sweep
    settings = rt.settings.checkpoints
    now = time.time() if now is None else now
    if now - _last_sweep < SWEEP_INTERVAL_SECONDS:
        return 0
    _last_sweep = now
    cutoff = datetime.fromtimestamp(now, UTC) - timedelta(days=max(settings.retention_days, settings.orphan_days))
    try:
        return delete_objects_under(rt.s3, rt.settings.s3.bucket, settings.key_prefix.strip("/") + "/", cutoff)
    except ObjectStoreError as exc:
        log.warning("checkpoint retention sweep failed: %s", exc)
        return 0
