"""The checkpoint benchmark still measures the product's own checkpoint path.

A smoke run (tiny preset, 4 steps, one repeat) checks what the figures in bench/README.md rest on:
the loop runs the farm's step hook, which saves the denoising state through ``workers.checkpoints``
into a real S3 server and names it in a real job record, the latents checkpoint is recorded too, and
checkpointing leaves the latents bit-identical (the bench raises otherwise). Timings are not
asserted: the target belongs to the benchmark's own report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import checkpoints

pytestmark = pytest.mark.slow


def test_smoke_run_saves_through_the_farm_hook_and_reports_the_cost(tmp_path: Path) -> None:
    out = tmp_path / "checkpoints.json"
    args = ["--arch", "tiny", "--model-dir", str(tmp_path / "tiny"), "--steps", "4", "--repeats", "1"]
    status = checkpoints.main([*args, "--json", str(out)])
    figures = json.loads(out.read_text())
    assert status == (0 if figures["cost_fraction"] < checkpoints.TARGET_FRACTION else 1)
    # 10% of 4 steps rounds to a save after every step but the last (the finished latents cover it).
    assert (figures["save_every_steps"], figures["saves_per_job"]) == (1, 3)
    # A state carries the latents and the scheduler's multistep memory: several latents' worth.
    assert figures["state_object_bytes"] > 2 * figures["latents_object_bytes"] > 0
    assert figures["median_seconds"]["in_hook"] > 0 and figures["median_seconds"]["writer_cpu"] > 0
    assert (
        0
        < figures["cost_fraction"]
        == pytest.approx(figures["in_hook_fraction"] + figures["writer_cpu_fraction"], abs=1e-4)
    )
