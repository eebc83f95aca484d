"""The DiT benchmark runs end to end at tiny sizes and reports what its README figures rest on.

Timings are not asserted (speed targets belong to the benchmark's own report); what is checked is
that every row ran the DiT as it claims: the farm's loop with options off reproduces the WanPipeline
baseline exactly, one-pass guidance halves the DiT calls, a cache row counts skipped calls, and
each ratio is the baseline's time over the row's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import dit

pytestmark = pytest.mark.slow


def test_quick_run_reports_every_option_against_wanpipeline(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dit.json"
    assert dit.main(["--quick", "--model-dir", str(tiny_model_dir), "--thresholds", "0.5", "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    rows = {row["option"]: row for row in report["rows"]}
    steps = report["job"]["steps"]
    assert list(rows) == [
        "WanPipeline (baseline)",
        "stage, two-pass (all options off)",
        "one-pass guidance",
        "cache first_block t=0.5",
        "best: one-pass + cache",
        "quantized int8_dynamic, two-pass",
        "quantized int8_dynamic + one-pass",
        "farm batch of 2 (transform.batch_size, one-pass)",
        "WanPipeline, 2 jobs per call (diffusers' batching)",
    ]
    baseline = rows["WanPipeline (baseline)"]
    assert rows["stage, two-pass (all options off)"]["psnr_db_vs_uncached"] == float("inf")
    assert baseline["psnr_db_vs_uncached"] == float("inf")  # the farm's loop equals diffusers' exactly
    assert rows["one-pass guidance"]["dit_calls"] == steps
    assert rows["one-pass guidance"]["psnr_db_vs_uncached"] > 60
    # int8 weights and activations move the output, a little: neither exact nor far off.
    quantized = rows["quantized int8_dynamic, two-pass"]
    assert 0 < quantized["relative_error_vs_two_pass"] < 0.1 and quantized["dit_calls"] == 2 * steps
    assert rows["stage, two-pass (all options off)"]["relative_error_vs_two_pass"] == 0
    assert rows["cache first_block t=0.5"]["dit_calls"] == 2 * steps
    assert rows["cache first_block t=0.5"]["dit_calls_skipped"] > 0
    for name in (
        "farm batch of 2 (transform.batch_size, one-pass)",
        "WanPipeline, 2 jobs per call (diffusers' batching)",
    ):
        batched = rows[name]
        assert batched["jobs_per_call"] == 2
        assert batched["psnr_db_vs_uncached"] > 60  # a job batched with another still renders (nearly) its solo frames
    assert rows["farm batch of 2 (transform.batch_size, one-pass)"]["dit_calls"] == steps
    for row in report["rows"]:
        assert row["ratio"] == pytest.approx(baseline["seconds_per_job"] / row["seconds_per_job"])
    assert report["best_ratio"] == rows["best: one-pass + cache"]["ratio"]
