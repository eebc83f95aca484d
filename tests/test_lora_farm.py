"""Per-job LoRAs on a farm of real parts: Valkey, SeaweedFS, three worker processes, Mooncake TCP, ffmpeg.

LoRAs registered with ``reelfarm lora add`` (copied into the bucket, checksum in
the registry) and one given in the settings by local path; one transform worker
serves, in order, a base job, a one-LoRA job, a two-LoRA job (one of them in
the original Wan layout), a job whose LoRA does not fit the DiT and the first
base job again. LoRA frames equal WanPipeline's with the same adapters and
scales; the bad LoRA fails only its job, in one line; the base job after the
LoRA jobs equals the one before them exactly; the record and metadata.json
name the adapters, scales and checksums.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scheduler.core.lora_catalog import register_lora
from scheduler.core.loras import LoraSource
from scheduler.core.object_store import get_bytes, make_s3_client
from scheduler.core.worker_registry import live_workers
from scheduler.intake.submit import submit
from tests.farm_fixtures import Farm
from tests.farm_harness import running_workers, wait_finished, worker_logs
from tests.reference_pipeline import reference_frames
from tests.test_end_to_end import SPEC as END_TO_END_SPEC
from tests.video_probe import decode_video_frames
from workers.models.tiny import TINY_TRANSFORMER
from workers.models.tiny_lora import build_tiny_lora

pytestmark = pytest.mark.slow

# The end-to-end job (lossless, 4 steps, guidance on) with a seed of its own.
SPEC: dict[str, Any] = {**END_TO_END_SPEC, "seed": 21}


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_lora_jobs_match_wanpipeline_fail_alone_and_leave_the_base_model_untouched(
    make_farm: Any, tiny_model_dir: Path, s3_config: Any, tmp_path: Path
) -> None:
    style = build_tiny_lora(tmp_path / "style", seed=1)
    motion_wan = build_tiny_lora(tmp_path / "motion", seed=2, rank=2, layout="wan")
    local = build_tiny_lora(tmp_path / "local", seed=3)
    wide_dir = tmp_path / "wide-model" / "transformer"
    wide_dir.mkdir(parents=True)
    (wide_dir / "config.json").write_text(json.dumps({**TINY_TRANSFORMER, "attention_head_dim": 16}))
    wide = build_tiny_lora(tmp_path / "wide", model_dir=wide_dir.parent)

    farm: Farm = make_farm(loras={"local": LoraSource(source=str(local))})
    settings, conn = farm.settings, farm.conn
    registered = {
        name: register_lora(conn, settings, name, str(path))
        for name, path in (("style", style), ("motion", motion_wan), ("wide", wide))
    }
    one = [{"name": "style", "scale": 0.8}]
    two = [{"name": "motion", "scale": 0.6}, {"name": "local", "scale": 1.3}]
    with running_workers(settings):
        ids = [
            submit(conn, settings, SPEC),
            submit(conn, settings, {**SPEC, "loras": one}),
            submit(conn, settings, {**SPEC, "loras": two}),
            submit(conn, settings, {**SPEC, "loras": [{"name": "wide"}]}),
            submit(conn, settings, SPEC),
        ]
        records = [wait_finished(conn, job_id) for job_id in ids]
        transform = next(w for w in live_workers(conn) if w["stage"] == "transform")

    states = [r["state"] for r in records]
    assert states == ["succeeded", "succeeded", "succeeded", "failed", "succeeded"], worker_logs(settings)
    assert records[3]["error"].count("\n") == 0
    assert "LoRA wide: does not fit this model's DiT (size mismatch" in records[3]["error"]
    # One worker ran all five (the bad LoRA did not take it down) and loaded the DiT once.
    assert {r["stages"]["transform"]["worker"] for r in records} == {transform["worker_id"]}
    assert transform["model_loads"] == "1"

    client = make_s3_client(s3_config)
    frames = []
    for record in (records[0], records[1], records[2], records[4]):
        frames.append(decode_video_frames(get_bytes(client, s3_config.bucket, record["result"]["video_key"])))
    base, with_one, with_two, base_again = frames

    assert np.array_equal(base_again, base)
    expected_one = reference_frames(tiny_model_dir, SPEC, loras={"style": (style, 0.8)})
    expected_two = reference_frames(tiny_model_dir, SPEC, loras={"motion": (motion_wan, 0.6), "local": (local, 1.3)})
    assert max_diff(with_one, expected_one) <= 1
    assert max_diff(with_two, expected_two) <= 1
    assert max_diff(with_one, base) > 8 and max_diff(with_two, with_one) > 8

    # The record and the metadata say what ran: names, scales, the checksums of the bytes loaded.
    dit = records[2]["stages"]["transform"]["dit"]
    assert dit["loras"] == [
        {"name": "motion", "scale": 0.6, "sha256": registered["motion"].sha256},
        {"name": "local", "scale": 1.3, "sha256": hashlib.sha256(local.read_bytes()).hexdigest()},
    ]
    assert "loras" not in records[4]["stages"]["transform"]["dit"]
    stem = records[1]["result"]["video_key"].rsplit("/", 1)[0]
    metadata = json.loads(get_bytes(client, s3_config.bucket, f"{stem}/metadata.json"))
    assert metadata["spec"]["loras"] == one
    assert metadata["loras"] == [{"name": "style", "scale": 0.8, "sha256": registered["style"].sha256}]
