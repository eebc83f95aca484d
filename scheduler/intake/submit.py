"""Submission: validate, write the job record and enqueue the first stage, atomically.

The spec is validated before any write; the job record and the encode enqueue
happen in one MULTI, so a crash can not leave a record without a queued stage or
a queued stage without a record.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from scheduler.core import durability, jobs, keys
from scheduler.core.model_catalog import ModelChooser
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, parse_spec
from scheduler.intake.tenancy import tag_owned_jobs


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:20]


def submit(
    conn: redis.Redis,
    settings: FarmSettings,
    raw_spec: dict[str, Any] | JobSpec,
    job_id: str | None = None,
    *,
    owner: str | None = None,
    request_digest: str | None = None,
) -> str:
    """Validate and enqueue one job; returns its id. Re-submitting an existing id is a no-op.

    ``owner``: the API key name that creates it (``tenancy``), written with the record.
    """
    if isinstance(raw_spec, JobSpec):
        raw_spec = raw_spec.model_dump()
    spec = parse_spec(raw_spec, settings.limits, settings.spec_defaults)
    # A job that names no model goes to one that does its task (an image job to an i2v model).
    chooser = ModelChooser(settings, conn)
    spec = chooser.resolve(spec, named="model" in raw_spec)
    job_id = keys.check_id(job_id or new_job_id(), "job id")
    if jobs.job_exists(conn, job_id):
        return job_id
    if spec.image is not None:
        from scheduler.intake.image_staging import stage_input_image

        spec = stage_input_image(settings, spec, job_id, settings.s3.client())
    with conn.pipeline() as pipe:
        # WATCH makes "create unless it exists" atomic: two submitters of one id enqueue it once.
        pipe.watch(keys.job_key(job_id))
        if pipe.exists(keys.job_key(job_id)):
            return job_id
        pipe.multi()
        jobs.create_jobs(pipe, conn, [(job_id, spec)], secret=settings.require_secret(), routes=chooser.route)
        if owner is not None:
            tag_owned_jobs(pipe, owner, [job_id], time.time(), request_digest)
        try:
            pipe.execute()
        except redis.WatchError:
            pass  # another submitter created it first: same id, same job
    # Only then is the id handed out: a failover right after this returns must not lose the job.
    durability.confirm(conn, settings, "submit")
    return job_id
