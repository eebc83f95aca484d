"""The bench's report: per-payload figures and ratios against the targets, as JSON and as a table."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from typing import Any

import torch

from bench.handoff.payloads import PAYLOAD_LABELS
from bench.handoff.stats import BUSY_MACHINE_CORES, percentile, summarize
from bench.handoff.steps import PayloadSamples

TARGET_REDIS_OVER_FARM = 5.0  # at 720p, on loopback
TARGET_OVERHEAD_MS = 5.0  # farm beyond the raw Mooncake read, per hand-off
TARGET_PAYLOAD = "720p"

RECEIVE_PRIVATE = "private memory (read lands in the stage's tensors; no receive slot, no copy)"
RECEIVE_SLOT = "a registered receive slot, copied out (the RDMA path)"


def payload_report(s: PayloadSamples) -> dict[str, Any]:
    ways = {
        "farm": summarize(s.farm, s.nbytes),
        "farm_plus_pack": summarize(s.farm_pack, s.nbytes),
        "raw_read": summarize(s.raw_read, s.nbytes),
        "redis": summarize(s.redis, s.nbytes),
        "redis_bytes": summarize(s.redis_bytes, s.nbytes),
        "memcpy": summarize(s.memcpy, s.nbytes),
    }
    farm, raw, red, mem = (ways[k]["median_s"] for k in ("farm", "raw_read", "redis", "memcpy"))
    overhead_ms = percentile(s.paired_overhead, 50) * 1e3
    ratios = {
        "redis_over_farm": red / farm,
        "redis_over_farm_plus_pack": red / ways["farm_plus_pack"]["median_s"],
        "redis_bytes_over_farm": ways["redis_bytes"]["median_s"] / farm,
        "farm_over_memcpy": farm / mem,
        "farm_over_raw_read": farm / raw,
        "farm_overhead_ms": overhead_ms,
        "farm_overhead_p95_ms": percentile(s.paired_overhead, 95) * 1e3,
        "farm_minus_raw_read_ms": (farm - raw) * 1e3,
        "raw_read_jitter_ms": (ways["raw_read"]["p95_s"] - raw) * 1e3,
    }
    targets: dict[str, Any] = {
        "overhead_under_ms": TARGET_OVERHEAD_MS,
        "overhead_met": overhead_ms < TARGET_OVERHEAD_MS,
    }
    if s.name == TARGET_PAYLOAD:
        targets["redis_over_farm_at_least"] = TARGET_REDIS_OVER_FARM
        targets["redis_over_farm_met"] = ratios["redis_over_farm"] >= TARGET_REDIS_OVER_FARM
    return {
        "label": PAYLOAD_LABELS[s.name],
        "bytes": s.nbytes,
        "repeats": len(s.farm),
        "ways": ways,
        "ratios": ratios,
        "targets": targets,
        "farm_steps_median_s": {k: percentile(v, 50) for k, v in s.steps.items()},
        "farm_steps_p95_s": {k: percentile(v, 95) for k, v in s.steps.items()},
        "producer_pack_median_s": percentile(s.pack, 50),
        "redis_steps_median_s": {k: percentile(v, 50) for k, v in s.redis_steps.items()},
    }


def library_versions(valkey_info: dict[str, Any]) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("mooncake-transfer-engine-non-cuda", "rq", "redis", "xxhash"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["valkey"] = str(valkey_info.get("valkey_version") or valkey_info.get("redis_version", "?"))
    return out


def _fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s < 1e12 else "inf"


def render_table(report: dict[str, Any]) -> str:
    lines = [
        f"reelfarm hand-off benchmark  {report['date']}",
        f"machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}; transport: Mooncake TCP on loopback; "
        f"torch threads per process: {report['machine']['torch_threads_per_process']}",
        f"command: {report['command']}",
        f"consumer receives into: {report['receive']}",
        f"repeats: {report['repeats']} (+{report['warmup']} warm-up) per payload",
        "",
    ]
    names = {
        "farm": "farm (publish..ack)",
        "farm_plus_pack": "farm + producer pack",
        "raw_read": "raw Mooncake read",
        "redis": "redis/rq pickle",
        "redis_bytes": "redis SET/GET bytes *",
        "memcpy": "in-process memcpy",
    }
    for key, p in report["payloads"].items():
        other = p["other_processes_cores"]
        load = "" if other is None else f"; other processes used {other:.2f} cores meanwhile"
        lines.append(f"== {key}: {p['label']}, {p['bytes'] / 2**20:.1f} MiB{load}")
        if other is not None and other > BUSY_MACHINE_CORES:
            lines.append(
                f"   WARNING: other processes used {other:.2f} cores during this payload; its figures are noisy"
            )
        lines.append(f"   {'way':<22} {'median ms':>10} {'p95 ms':>10} {'throughput':>12}")
        for way, label in names.items():
            w = p["ways"][way]
            lines.append(
                f"   {label:<22} {w['median_s'] * 1e3:>10.2f} {w['p95_s'] * 1e3:>10.2f} {_fmt_rate(w['bytes_per_s']):>12}"
            )
        r, t = p["ratios"], p["targets"]
        lines.append(
            f"   redis/farm {r['redis_over_farm']:.1f}x (redis/(farm+pack) {r['redis_over_farm_plus_pack']:.1f}x)   "
            f"farm/memcpy {r['farm_over_memcpy']:.1f}x   farm/raw read {r['farm_over_raw_read']:.2f}x   "
            f"(* redis SET/GET/farm {r['redis_bytes_over_farm']:.1f}x)"
        )
        lines.append(
            f"   farm overhead beyond the raw read: {r['farm_overhead_ms']:.2f} ms median, "
            f"{r['farm_overhead_p95_ms']:.2f} ms p95 (per hand-off: all steps but its own batch_read); "
            f"median(farm) - median(raw read) = {r['farm_minus_raw_read_ms']:.2f} ms "
            f"(raw read jitter p95-median {r['raw_read_jitter_ms']:.1f} ms)"
        )
        verdicts = [
            f"overhead < {t['overhead_under_ms']:.0f} ms: {'MET' if t['overhead_met'] else 'MISSED'}"
            f" ({r['farm_overhead_ms']:.2f} ms)"
        ]
        if "redis_over_farm_met" in t:
            verdicts.insert(
                0,
                f"redis/farm >= {t['redis_over_farm_at_least']:.0f}x: "
                f"{'MET' if t['redis_over_farm_met'] else 'MISSED'} ({r['redis_over_farm']:.1f}x)",
            )
        lines.append("   target " + "; ".join(verdicts))
        lines.append("   farm steps (median ms, the step-by-step hand-off):")
        steps = p["farm_steps_median_s"]
        lines.append("     " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in steps.items()))
        lines.append(f"     sum {sum(steps.values()) * 1e3:.2f}; producer pack {p['producer_pack_median_s'] * 1e3:.2f}")
        lines.append(
            "   redis steps (median ms): "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in p["redis_steps_median_s"].items())
        )
        lines.append("")
    if report["busy_payloads"]:
        lines.append(
            "machine was busy during: " + ", ".join(report["busy_payloads"]) + " -- rerun on a quiet machine to compare"
        )
    missed = report["targets_missed"]
    lines.append("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return "\n".join(lines)


def targets_missed(payloads: dict[str, Any]) -> list[str]:
    missed = []
    for name, p in payloads.items():
        t, r = p["targets"], p["ratios"]
        if not t["overhead_met"]:
            missed.append(f"{name} farm overhead {r['farm_overhead_ms']:.2f} ms >= {TARGET_OVERHEAD_MS:.0f} ms")
        if t.get("redis_over_farm_met") is False:
            missed.append(f"{name} redis/farm {r['redis_over_farm']:.1f}x < {TARGET_REDIS_OVER_FARM:.0f}x")
    return missed
