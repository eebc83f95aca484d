"""Deliberate worker crashes and slow stages for the fault-injection suite, off unless env vars ask.

``REELFARM_FAULT_CRASH=STAGE:MARKER`` makes a worker of STAGE hard-exit (as an OOM
kill or a segfault would: no cleanup, no Python unwinding) when it starts a job
whose prompt contains MARKER. ``REELFARM_FAULT_SLOW=POINT:SECONDS`` pauses a worker
at POINT, widening the window in which a test can kill it: a stage name pauses
that stage mid-job (after its input was pulled and acknowledged);
``decode-upload`` pauses the decode worker right after the first part of the
video's multipart upload landed, so a kill there leaves an incomplete upload; ``STAGE-pull`` pauses
a consuming stage after it claimed its job and before it pulls the input (the multi-host test cuts the
producer's network link in that window); ``transform-step`` pauses after every denoising step,
``transform-step-N`` after step N only (after its checkpoint save was started).
``POINT:SECONDS:MARKER`` pauses only jobs whose prompt has MARKER. It exists so tests can show that a job which keeps
killing workers is quarantined instead of looping; operators never set it.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("reelfarm.fault")

CRASH_EXIT_CODE = 86


def crash_if_injected(stage: str, prompt: str) -> None:
    spec = os.environ.get("REELFARM_FAULT_CRASH", "")
    if not spec:
        return
    crash_stage, _, marker = spec.partition(":")
    if crash_stage == stage and marker and marker in prompt:
        log.error("fault injection: crashing the %s worker on purpose", stage)
        os._exit(CRASH_EXIT_CODE)


UPLOAD_POINT = "decode-upload"
TRANSFORM_STEP_POINT = "transform-step"


def pull_point(stage: str) -> str:
    """The point just before a stage pulls its input: the producer has published and waits for the pull."""
    return f"{stage}-pull"


def pause_if_injected(point: str, prompt: str = "") -> None:
    """Pause at ``point`` if ``REELFARM_FAULT_SLOW=POINT:SECONDS[:MARKER]`` names it (and, with a MARKER, only for
    jobs whose prompt contains it, so one worker can pause for one test job and not for the others)."""
    slow_point, _, rest = os.environ.get("REELFARM_FAULT_SLOW", "").partition(":")
    seconds, _, marker = rest.partition(":")
    if slow_point == point and seconds and (not marker or marker in prompt):
        log.error("fault injection: pausing at %s for %s s on purpose", point, seconds)
        time.sleep(float(seconds))
