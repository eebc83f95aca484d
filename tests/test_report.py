"""Manifest rows and the timeline report from job records in a real Valkey (records written as workers would)."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.core import keys
from scheduler.core.object_store import get_bytes
from scheduler.core.settings import FarmSettings, S3Settings
from scheduler.ops.batch import parse_batch, submit_batch
from scheduler.ops.manifest import manifest_keys, write_manifest
from scheduler.ops.timeline import BatchReport, StageUtilisation, batch_report, load_timelines, utilisation

TINY = {"width": 64, "height": 48, "frames": 17, "steps": 2}


def simulate_batch(conn: redis.Redis, settings: FarmSettings, name: str, count: int) -> list[str]:
    """Submit a batch and write the stage timings a farm with 1 encode, 2 transform and 1 decode worker would."""
    text = "\n".join(json.dumps({"prompt": f"shot {i}", "seed": i, **TINY}) for i in range(count))
    parsed = parse_batch(text, settings, name=name)
    submit_batch(conn, settings, parsed)
    t0 = float(conn.hget(keys.job_key(parsed.job_ids[0]), "created_at"))  # type: ignore[arg-type]
    encode_free, decode_free, transform_free = t0, t0, [t0, t0]
    for i, job_id in enumerate(parsed.job_ids):
        fields: dict[str, Any] = {}
        e0 = encode_free
        encode_free = e0 + 1.0
        lane = min(range(2), key=lambda k: transform_free[k])
        tr0 = max(encode_free, transform_free[lane])
        transform_free[lane] = tr0 + 4.0
        d0 = max(transform_free[lane], decode_free)
        decode_free = d0 + 1.5
        spans = {
            "encode": (e0, encode_free, "encode-host-1-aaaaaa"),
            "transform": (tr0, transform_free[lane], f"transform-host-{lane}-bbbbb{lane}"),
            "decode": (d0, decode_free, "decode-host-1-cccccc"),
        }
        failed = i == 3
        for stage, (start, end, worker) in spans.items():
            fields[f"{stage}.started_at"] = repr(start)
            fields[f"{stage}.worker"] = worker
            fields[f"{stage}.attempt"] = "1"
            if failed and stage == "decode":
                fields["decode.state"] = "failed"
                break
            fields[f"{stage}.finished_at"] = repr(end)
            fields[f"{stage}.seconds"] = f"{end - start:.3f}"
            fields[f"{stage}.state"] = "done"
        if failed:
            fields.update(state="failed", error="decode: RuntimeError: ffmpeg exited 1", **{"decode.attempt": "3"})
        else:
            result = {
                "video": f"s3://b/renders/{job_id}/video.mp4",
                "poster": f"s3://b/renders/{job_id}/poster.jpg",
                "metadata": f"s3://b/renders/{job_id}/metadata.json",
                "bytes": 1000 + i,
            }
            fields.update(state="succeeded", result=json.dumps(result))
        conn.hset(keys.job_key(job_id), mapping=fields)  # type: ignore[arg-type]
    return parsed.job_ids


def test_manifest_rows_local_and_uploaded(redis_url: str, s3_config: Any, s3_client: Any, tmp_path: Path) -> None:
    settings = FarmSettings(
        redis_url=redis_url,
        secret=secrets.token_hex(8),
        s3=S3Settings(
            endpoint_url=s3_config.endpoint_url,
            bucket=s3_config.bucket,
            access_key=s3_config.access_key,
            secret_key=s3_config.secret_key,
        ),
    )
    conn = redis.Redis.from_url(redis_url)
    ids = simulate_batch(conn, settings, "shots", 6)
    files = write_manifest(conn, settings, "shots", tmp_path / "out")
    rows = [json.loads(line) for line in files.jsonl.read_text().splitlines()]
    assert [r["job_id"] for r in rows] == ids
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert files.states == {"succeeded": 5, "failed": 1}
    ok, bad = rows[0], rows[3]
    assert (
        ok["state"] == "succeeded" and ok["video"].endswith(f"{ids[0]}/video.mp4") and ok["poster"] and ok["metadata"]
    )
    assert ok["encode_seconds"] == 1.0 and ok["transform_seconds"] == 4.0 and ok["decode_seconds"] == 1.5
    assert ok["prompt"] == "shot 0" and ok["attempts"] == 1 and ok["error"] == ""
    assert bad["state"] == "failed" and bad["video"] == "" and bad["attempts"] == 3
    assert bad["error"] == "decode: RuntimeError: ffmpeg exited 1"
    table = list(csv.DictReader(io.StringIO(files.csv.read_text())))
    assert [r["job_id"] for r in table] == ids and table[3]["error"] == bad["error"]

    jsonl_key, csv_key = manifest_keys(settings.s3.key_prefix, "shots")
    assert jsonl_key == "renders/batches/shots/manifest.jsonl"
    assert get_bytes(s3_client, s3_config.bucket, jsonl_key) == files.jsonl.read_bytes()
    assert get_bytes(s3_client, s3_config.bucket, csv_key) == files.csv.read_bytes()
    assert files.uris == (f"s3://{s3_config.bucket}/{jsonl_key}", f"s3://{s3_config.bucket}/{csv_key}")


def test_utilisation_and_timeline_png(redis_url: str, tmp_path: Path) -> None:
    settings = FarmSettings(redis_url=redis_url, secret=secrets.token_hex(8))
    conn = redis.Redis.from_url(redis_url)
    simulate_batch(conn, settings, "shots", 30)
    stages = utilisation(load_timelines(conn, "shots"))
    # 2 transform workers each 4 s per job, 1 decode worker 1.5 s per job: transform is the bottleneck.
    assert stages["transform"].workers == 2 and stages["encode"].workers == 1
    assert stages["transform"].fraction > 0.9
    assert stages["encode"].fraction == pytest.approx(30 / stages["encode"].window_seconds, rel=1e-6)

    png = Path(os.environ.get("REELFARM_TEST_PNG_DIR", str(tmp_path))) / "synthetic-timeline.png"
    report = batch_report(conn, "shots", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.states == {"succeeded": 29, "failed": 1}
    assert "transform" in report.describe() and "% busy" in report.describe()


def stage_load(busy: dict[str, float], workers: dict[str, int]) -> BatchReport:
    stages = {name: StageUtilisation(name, seconds, workers[name], 100.0) for name, seconds in busy.items()}
    return BatchReport(None, 10, 100.0, 100.0, {"succeeded": 10}, stages)


def test_report_names_the_bounding_stage_and_a_balancing_layout() -> None:
    # The embedded default's shape: the tiny VAE decode dominates.
    report = stage_load({"encode": 2.0, "transform": 4.5, "decode": 43.0}, {"encode": 1, "transform": 1, "decode": 1})
    assert report.bounding_stage() == "decode"
    assert report.balanced_workers() == {"encode": 1, "transform": 2, "decode": 16}
    assert "bound by decode" in report.describe() and "--workers transform=2,decode=16" in report.describe()
    # Per worker, not per stage: two decode workers halve decode's share.
    two_decoders = stage_load(
        {"encode": 2.0, "transform": 30.0, "decode": 40.0}, {"encode": 1, "transform": 1, "decode": 2}
    )
    assert two_decoders.bounding_stage() == "transform"
    assert two_decoders.balanced_workers() == {"encode": 1, "transform": 12, "decode": 16}  # 1:15:20 scaled to 16
    assert (
        stage_load(
            {"encode": 0.0, "transform": 0.0, "decode": 0.0}, {"encode": 1, "transform": 1, "decode": 1}
        ).bounding_stage()
        is None
    )
