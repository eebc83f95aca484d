"""How the bench summarises its samples, and how it notices a busy machine.

Percentiles, per-step laps on one clock, and the CPU the rest of the machine
used meanwhile (`CpuWatch`): the figures only mean much on a quiet machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); q in [0, 100]."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[float], nbytes: int) -> dict[str, float]:
    median = percentile(samples, 50)
    return {
        "median_s": median,
        "p95_s": percentile(samples, 95),
        "min_s": min(samples),
        "bytes_per_s": nbytes / median if median > 0 else math.inf,
        "n": len(samples),
    }


class Laps:
    """Named durations of consecutive steps, from one perf_counter clock."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + (now - self._last)
        self._last = now


class CpuWatch:
    """CPU time the rest of the machine used while the bench ran: the figures only mean much on a quiet machine.

    Other = every core's busy time (/proc/stat) minus what the bench's own processes used (the bench,
    its producer, its Valkey), in cores averaged over the interval. Linux only; None elsewhere.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = self._sample()

    @staticmethod
    def _busy_ticks() -> int:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        return sum(values) - values[3] - values[4]

    def _own_ticks(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += int(fields[11]) + int(fields[12])  # utime stime
        return total

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            return time.monotonic(), self._busy_ticks(), self._own_ticks()
        except (OSError, ValueError, IndexError):
            return None

    def other_cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(other, 0) / hz / (end[0] - self._start[0])


BUSY_MACHINE_CORES = 0.25
