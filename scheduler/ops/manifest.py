"""What a batch produced: the results manifest, one row per job, as JSONL and CSV.

``write_manifest`` writes each job's id, line, prompt, state, S3 URIs of
video/poster/metadata, per-stage timings, attempts and failure reason locally
and uploads them beside the renders under ``<key_prefix>/batches/<name>/manifest.{jsonl,csv}``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from scheduler.core import keys
from scheduler.core.job_record import JobState, StageField, attempt_of, stage_field
from scheduler.core.keys import Hop, Stage, all_hops
from scheduler.core.settings import FarmSettings
from scheduler.ops.timeline import JobTimeline, load_timelines

CSV_COLUMNS = [
    "job_id",
    "line",
    "state",
    "prompt",
    "seed",
    "width",
    "height",
    "frames",
    "steps",
    "video",
    "poster",
    "metadata",
    "video_bytes",
    "queued_seconds",
    "encode_seconds",
    "transform_seconds",
    "decode_seconds",
    "total_seconds",
    "attempts",
    "retries",
    "error",
]


# --------------------------------------------------------------------------- manifest


def manifest_row(job: JobTimeline) -> dict[str, Any]:
    """One job as a manifest row: the CSV columns, plus nested per-stage detail for the JSONL."""
    fields = job.fields
    spec = json.loads(fields.get("spec", "{}"))
    result = json.loads(fields["result"]) if "result" in fields else {}
    seconds = {
        stage.value: float(fields[name])
        for stage in all_hops()
        if (name := stage_field(stage, StageField.SECONDS)) in fields
    }
    # The CSV has a column per stage kind: a split loop's transform hops add up in ``transform_seconds``.
    by_kind: dict[str, float] = {}
    for hop, value in seconds.items():
        by_kind[Hop(hop).kind.value] = by_kind.get(Hop(hop).kind.value, 0.0) + value
    first_start = min((s.start for s in job.spans), default=None)
    finished = job.finished_at if job.state == JobState.SUCCEEDED else None
    attempts = {
        stage.value: attempt_of(fields, stage)
        for stage in all_hops()
        if stage_field(stage, StageField.ATTEMPT) in fields
    }
    row: dict[str, Any] = {
        "job_id": job.job_id,
        "line": job.line,
        "state": job.state,
        "prompt": spec.get("prompt", ""),
        "seed": spec.get("seed"),
        "width": spec.get("width"),
        "height": spec.get("height"),
        "frames": spec.get("frames"),
        "steps": spec.get("steps"),
        "video": result.get("video", ""),
        "poster": result.get("poster", ""),
        "metadata": result.get("metadata", ""),
        "video_bytes": result.get("bytes"),
        "queued_seconds": round(first_start - job.queued_at, 3) if first_start is not None else None,
        **{f"{stage.value}_seconds": by_kind.get(stage.value) for stage in Stage},
        "total_seconds": round(finished - job.created_at, 3) if finished is not None else None,
        "attempts": max(attempts.values(), default=0),
        "retries": int(fields.get("retries", "0") or 0),
        "error": fields.get("error", ""),
    }
    row["stages"] = {
        span.stage: {
            "started_at": span.start,
            "finished_at": span.end,
            "seconds": seconds.get(span.stage),
            "worker": span.worker,
            "attempt": span.attempt,
        }
        for span in job.spans
    }
    row["attempts_by_stage"] = attempts
    row["failures"] = json.loads(fields.get("failures", "[]"))
    return row


def manifest_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows).encode()


def manifest_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue().encode()


def manifest_keys(key_prefix: str, name: str) -> tuple[str, str]:
    """Object keys of a batch's manifests; derived from the farm prefix and the validated batch name only."""
    base = "/".join(p for p in (key_prefix.strip("/"), "batches", keys.check_batch_name(name)) if p)
    return f"{base}/manifest.jsonl", f"{base}/manifest.csv"


@dataclass(frozen=True)
class ManifestFiles:
    jsonl: Path
    csv: Path
    uris: tuple[str, ...]
    rows: int
    states: dict[str, int]


def write_manifest(
    conn: redis.Redis,
    settings: FarmSettings,
    name: str,
    out_dir: Path,
    *,
    upload: bool = True,
    client: Any = None,
) -> ManifestFiles:
    """Write ``manifest.jsonl`` and ``manifest.csv`` for batch ``name`` into ``out_dir`` and (by default) S3."""
    rows = [manifest_row(job) for job in load_timelines(conn, name)]
    jsonl, table = manifest_jsonl(rows), manifest_csv(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    local_jsonl, local_csv = out_dir / "manifest.jsonl", out_dir / "manifest.csv"
    for path, data in ((local_jsonl, jsonl), (local_csv, table)):
        # Beside, then renamed: a reader never sees half a manifest.
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    uris: tuple[str, ...] = ()
    if upload:
        from scheduler.core.object_store import put_bytes, s3_uri

        client = client if client is not None else settings.s3.client()
        bucket = settings.s3.bucket
        jsonl_key, csv_key = manifest_keys(settings.s3.key_prefix, name)
        put_bytes(client, bucket, jsonl_key, jsonl, "application/x-ndjson", retry_seconds=settings.s3.retry_seconds)
        put_bytes(client, bucket, csv_key, table, "text/csv", retry_seconds=settings.s3.retry_seconds)
        uris = (s3_uri(bucket, jsonl_key), s3_uri(bucket, csv_key))
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    return ManifestFiles(local_jsonl, local_csv, uris, len(rows), states)
