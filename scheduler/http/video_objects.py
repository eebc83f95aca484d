"""A job record as OpenAI's Video object (``{"object": "video", "status", "progress", ...}``).

States map as: queued -> ``queued``; running -> ``in_progress``; succeeded ->
``completed``; failed and cancelled -> ``failed`` (with ``error.code``
``render_failed`` or ``cancelled`` and the farm's one-line reason).
``progress`` (0-100) weighs the stages by what they cost: encode 0-10, the
denoising loop 10-90 by its step counter, decode 90-100.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from scheduler.core.job_record import JobState, StageState, kind_progress, kind_state
from scheduler.core.keys import Stage

STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "in_progress",
    JobState.SUCCEEDED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "failed",
}
# Where each stage's share of the progress bar starts and ends.
_STAGE_SPAN = {Stage.ENCODE: (0, 10), Stage.TRANSFORM: (10, 90), Stage.DECODE: (90, 100)}


def progress_of(fields: Mapping[str, str | None]) -> int:
    if fields.get("state") == JobState.SUCCEEDED:
        return 100
    done = 0.0
    for stage, (low, high) in _STAGE_SPAN.items():
        # Per stage kind: a split loop's two transform hops fill the transform span together.
        stage_state = kind_state(fields, stage)
        if stage_state == StageState.DONE:
            done = high
        elif stage_state == StageState.RUNNING and stage is Stage.TRANSFORM:
            steps_done, _, total = (kind_progress(fields, stage) or "0/1").partition("/")
            try:
                done = low + (high - low) * min(1.0, int(steps_done) / max(1, int(total)))
            except ValueError:
                done = low
    return int(done)


def video_object(job_id: str, fields: Mapping[str, str | None]) -> dict[str, Any]:
    try:
        spec: dict[str, Any] = json.loads(fields.get("spec") or "{}")
    except ValueError:
        spec = {}
    try:
        state = JobState(fields.get("state") or "")
    except ValueError:
        state = JobState.FAILED  # a record this farm does not know how to read
    finished = state.finished
    error = None
    if state in (JobState.FAILED, JobState.CANCELLED):
        error = {
            "code": "cancelled" if state is JobState.CANCELLED else "render_failed",
            "message": fields.get("error") or "the job ended without a video",
        }
    frames, fps = int(spec.get("frames", 1)), max(1, int(spec.get("fps", 16)))
    return {
        "id": job_id,
        "object": "video",
        "status": STATUS[state],
        "progress": progress_of(fields),
        "created_at": int(float(fields.get("created_at") or 0)),
        "completed_at": int(float(fields.get("updated_at") or 0)) if finished else None,
        "expires_at": None,
        "error": error,
        "model": spec.get("model", "default"),
        "prompt": spec.get("prompt"),
        "remixed_from_video_id": None,
        "seconds": f"{(frames - 1) / fps:g}",
        "size": f"{spec.get('width', 0)}x{spec.get('height', 0)}",
    }
