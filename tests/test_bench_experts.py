"""The expert-placement benchmark runs end to end on the tiny two-expert model and reports its figures.

Only what cannot fail on a sane machine is asserted about them: a worker holding one expert's DiT never
peaks above one holding both. The figures themselves belong to bench/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import experts

pytestmark = pytest.mark.slow


def test_smoke_run_compares_split_and_together(tiny_two_expert_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "experts.json"
    args = ["--arch", "tiny-2expert", "--model-dir", str(tiny_two_expert_model_dir), "--jobs", "2", "--rounds", "1"]
    assert experts.main([*args, "--steps", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    together, split = report["sides"]["together"], report["sides"]["split"]
    assert set(together["busy"]) == {"transform"} and set(split["busy"]) == {"transform@high", "transform@low"}
    assert set(split["peak_mib"]) == {"transform@high", "transform@low"}
    assert all(0.0 < fraction <= 1.0 for fraction in [*together["busy"].values(), *split["busy"].values()])
    assert 0.0 < report["split_peak_over_together_peak"] <= 1.0
    assert report["split_vs_together_videos_per_min"] > 0
