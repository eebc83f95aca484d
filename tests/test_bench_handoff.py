"""The hand-off benchmark still runs the product's own hand-off, on both receive paths.

A smoke run (2 repeats, no warm-up) checks what the figures in bench/README.md
rest on: the bench's step-by-step breakdown wraps the calls ``pull_input`` really
makes (it raises when one is gone), the payloads arrive bit-identical (it raises
otherwise), and each receive path shows its own steps. Timings are not asserted:
speed targets belong to the benchmark's own report, not to tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import handoff

pytestmark = pytest.mark.slow

SHARED_STEPS = {"claim (returns the room)", "verify descriptor", "check producer + mark transferring", "ack"}


@pytest.mark.parametrize(
    ("receive", "path_steps"),
    [
        ("auto", {"fresh private buffer (page faults)", "verify checksum"}),
        ("slot", {"acquire slot", "copy out + verify the copy", "release slot"}),
    ],
)
def test_smoke_run_reports_the_steps_of_its_receive_path(tmp_path: Path, receive: str, path_steps: set[str]) -> None:
    out = tmp_path / "handoff.json"
    args = [
        "--payloads",
        "480p",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--silent",
        "--receive",
        receive,
        "--json",
        str(out),
    ]
    assert handoff.main(args) == 0
    report = json.loads(out.read_text())
    expected = handoff.RECEIVE_PRIVATE if receive == "auto" else handoff.RECEIVE_SLOT
    assert report["receive"] == expected
    payload = report["payloads"]["480p"]
    assert payload["repeats"] == 2
    steps = set(payload["farm_steps_median_s"])
    assert SHARED_STEPS | path_steps | {handoff.PULL_STEP} <= steps
    other_path = {"acquire slot", "copy out + verify the copy"} if receive == "auto" else {"verify checksum"}
    assert not steps & other_path
