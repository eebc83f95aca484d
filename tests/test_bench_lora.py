"""The LoRA benchmark runs end to end at tiny step counts and reports every figure its README table rests on.

Timings are not asserted beyond what cannot fail on a sane machine (a cached adapter switches faster
than one loaded from bytes); the figures themselves belong to bench/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import lora

pytestmark = pytest.mark.slow


def test_quick_run_reports_switch_costs_call_costs_and_videos_per_minute(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    assert lora.main(["--quick", "--model-dir", str(tiny_model_dir), "--rank", "2", "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    assert set(report["switch_ms"]) == {"cached", "first use", "DiT reload"}
    assert report["switch_ms"]["cached"] < report["switch_ms"]["first use"]
    assert set(report["dit_call_ms"]) == {"base DiT call", "DiT call with the LoRA"}
    assert list(report["videos_per_min"]) == ["1-step guidance-free", "2-step guided (CFG 5)"]
    fast, slow = report["videos_per_min"].values()
    assert report["few_step_ratio"] == pytest.approx(fast / slow)
