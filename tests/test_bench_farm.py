"""The farm benchmarks run with one command each (smoke runs on the tiny model), and the overhead split is right.

The figures themselves are for bench/README.md, not for assertions: these tests
check that every benchmark runs end to end against real parts and prints the
table it promises, so the code cannot rot between measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.control_plane import layout_for
from bench.overhead import JobOverhead, overheads, queue_adjusted

REPO = Path(__file__).resolve().parents[1]
PULL = 0.004


def _record(created: float, spans: dict[str, tuple[float, float, float]], worker: str = "w") -> dict[str, str]:
    record = {"created_at": repr(created)}
    for stage, (start, end, compute) in spans.items():
        record |= {
            f"{stage}.started_at": repr(start),
            f"{stage}.finished_at": repr(end),
            f"{stage}.compute_seconds": repr(compute),
            f"{stage}.worker": f"{stage}-{worker}",
        }
        if stage != "encode":
            record[f"{stage}.pull_seconds"] = repr(PULL)
    return record


def test_overhead_counts_waits_only_once_the_job_is_ready_and_a_worker_is_free() -> None:
    first = _record(0.0, {"encode": (0.01, 1.0, 0.9), "transform": (1.02, 3.0, 1.9), "decode": (3.03, 4.0, 0.9)})
    # Submitted with the first: its encode waits behind the first's (not overhead), then starts 5 ms late.
    second = _record(0.0, {"encode": (1.005, 2.0, 0.95), "transform": (3.01, 5.0, 1.98), "decode": (5.02, 6.0, 0.97)})
    one, two = overheads([first, second])

    assert isinstance(one, JobOverhead)
    assert one.wait == pytest.approx({"encode": 0.01, "transform": 0.02, "decode": 0.03})
    assert one.in_stage == pytest.approx({"encode": 0.09, "transform": 0.08, "decode": 0.07})
    assert one.e2e == pytest.approx(4.0)
    assert queue_adjusted(one) == pytest.approx(0.3)
    # Second job: ready at 0 but the encode worker was free only at 1.0; transform ready at 2.0, free at 3.0.
    assert two.wait == pytest.approx({"encode": 0.005, "transform": 0.01, "decode": 0.02})
    assert queue_adjusted(two) == pytest.approx(0.035 + 0.045 + 0.01 + 0.01)
    assert one.pull == {"encode": 0.0, "transform": PULL, "decode": PULL}


def test_a_producer_with_its_slots_full_is_not_counted_as_waiting() -> None:
    first = _record(0.0, {"encode": (0.0, 1.0, 1.0), "transform": (1.0, 5.0, 4.0), "decode": (5.0, 6.0, 1.0)})
    # One slot: encode holds job 1's output until transform pulled it (1.0 + PULL); starting at 1.01 is 6 ms late.
    second = _record(0.0, {"encode": (1.01, 2.0, 0.99), "transform": (5.0, 9.0, 4.0), "decode": (9.0, 10.0, 1.0)})
    _, two = overheads([first, second], slots=1)
    assert two.wait["encode"] == pytest.approx(1.01 - (1.0 + PULL))


def _bench(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_pipeline_bench_smoke(tmp_path: Path) -> None:
    out = _bench("bench.pipeline", "--arch", "tiny", "--jobs", "2", "--steps", "1", "--layouts", "1:1:1", "--rounds", "1",
                 "--json", str(tmp_path / "p.json"))  # fmt: skip
    assert "| loop |" in out and "| rq |" in out and "| farm 1:1:1 |" in out
    sides = {side["name"]: side for side in json.loads((tmp_path / "p.json").read_text())}
    assert sides["farm 1:1:1"]["jobs"] == 2 and sides["farm 1:1:1"]["videos_per_minute"] > 0
    assert 0 < sides["farm 1:1:1"]["dit_busy_steady"] <= 1.0


@pytest.mark.slow
def test_overhead_bench_smoke(tmp_path: Path) -> None:
    out = _bench("bench.overhead", "--serial", "1", "--queue", "2", "--json", str(tmp_path / "o.json"))
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [row["jobs"] for row in rows] == [1, 2]
    assert all(0 < row["overhead_ms_median"] < row["e2e_ms_median"] for row in rows)
    assert "farm overhead" in out


@pytest.mark.slow
def test_decode_bench_smoke(tmp_path: Path) -> None:
    out = _bench("bench.decode", "--arch", "tiny", "--frames", "5,9", "--sizes", "64x64", "--threads", "1",
                 "--json", str(tmp_path / "d.json"))  # fmt: skip
    rows = json.loads((tmp_path / "d.json").read_text())
    assert {(r["mode"], r["frames"]) for r in rows} == {("stream", 5), ("stream", 9), ("whole", 5), ("whole", 9)}
    assert all(r["video_bytes"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert "streaming peak 5 -> 9 frames" in out


@pytest.mark.slow
def test_rehearsal_bench_smoke(tmp_path: Path) -> None:
    out = _bench("bench.rehearsal", "--arch", "tiny", "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["record"]["state"] == "succeeded"
    assert int(result["record"]["decode.input_bytes"]) > 0
    assert all(w["peak_kib"] >= w["rss_loaded_kib"] > 0 for w in result["workers"].values())
    assert "| transform |" in out


def test_control_plane_layouts_split_workers_equally_over_the_stages() -> None:
    assert list(layout_for(10).values()) == [3, 4, 3]
    assert list(layout_for(50).values()) == [16, 17, 17]
    assert list(layout_for(3).values()) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least one worker per stage"):
        layout_for(2)


@pytest.mark.slow
def test_control_plane_bench_smoke(tmp_path: Path) -> None:
    out = _bench("bench.control_plane", "--workers", "4", "--jobs", "40", "--json", str(tmp_path / "c.json"),
                 timeout=120)  # fmt: skip
    result = json.loads((tmp_path / "c.json").read_text())
    fidelity, (run,) = result["fidelity"], result["runs"]
    assert fidelity["layout"] == {"encode": 1, "transform": 1, "decode": 1} and fidelity["jobs"] == 20
    assert run["layout"] == {"encode": 1, "transform": 2, "decode": 1} and run["jobs"] == 40
    # The whole protocol ran: every job was submitted, claimed twice and finished (the driver checked each
    # record succeeded); a job costs Redis some hundreds of commands, each stage's rq bookkeeping included.
    for row in (fidelity, run):
        assert 150 < row["commands_per_job"] < 600, row
        assert row["jobs_per_s"] > 0 and 0 < row["redis_main_cores"] <= 1.0
        assert row["ceiling_jobs_per_s"] >= row["jobs_per_s"]
        assert row["calls"]["evalsha"] >= 6 * row["jobs"]  # claim, begin-transfer and ack of both hand-offs
    assert "| 4 workers | 1:2:1 | 40 |" in out and "Fidelity (1:1:1" in out and "saturates at" in out
