"""Sharded streaming decode: per-rank peak memory and decode time for N = 1, 2, 4 ranks, at the
Wan2.1-T2V-1.3B VAE (random weights), with the frames checked against the one-process streaming decode.

Run: ``python -m bench.sharded_decode [--size 240x416] [--frames 9] [--ranks 1,2,4] [--arch wan2.1-t2v-1.3b]
[--json PATH]``.

Each rank count runs in a fresh process (rank 0) with its followers started by `DecodeRankGroup`, as the
decode worker runs them (N=1 is `StreamingVaeDecoder` alone, the baseline). After every rank loaded the
VAE, each rank's peak resident set is reset (``/proc/PID/clear_refs``); after the decode, the peak
*above* that rank's loaded model is read from ``VmHWM``. Grids: 2 = 2x1, 4 = 2x2.

What to expect: a rank's peak is dominated by the causal-conv cache and the activations of the 8x and 4x
blocks, which scale with the area those blocks decode. The latent halo (15 pixels for this VAE) only
widens the latent and 2x blocks: every block after the attention crops its input to the core plus the
reach still to come (7 output pixels at 8x). The table prints 1/N, the latent shard share (core + halo) and
the full-resolution share (core + reach) next to the measured ratio. Rank 0 also holds the gathered
cores and the assembled chunk (3 channels, small), and the bench keeps every output chunk for the
check. Time does not fall on a 2-core CPU: the N=1 baseline already uses both cores (intra-op threads)
and N ranks split the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.decode import answer_parent, run_child, write_vae

REPO = Path(__file__).resolve().parents[1]
GRIDS = {1: "1x1", 2: "2x1", 4: "2x2"}
FLOAT_TOLERANCE = 1e-4  # as tests/test_sharded_decode.py states and justifies


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One rank count, in this process as rank 0 (run as a child of the bench)."""
    import torch

    from workers.decode_group import DecodeRankGroup
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.sharded_decode import ShardGrid, axis_plan, shard_regions

    torch.set_num_threads(config["threads"])
    height, width, frames, ranks = config["height"], config["width"], config["frames"], config["ranks"]
    model_dir = Path(config["model_dir"])
    latents = torch.randn(
        1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(0)
    )
    base = StreamingVaeDecoder(model_dir)
    grid = ShardGrid.parse(GRIDS[ranks])
    group = None
    chunks: Callable[[torch.Tensor], Iterator[torch.Tensor]]
    if ranks > 1:
        group = DecodeRankGroup(model_dir, grid, timeout_seconds=3600, threads_per_rank=config["threads"])
        decoder = group.start(base)
        chunks = decoder.decode_chunks
        halo = decoder.halo
        pids = [os.getpid(), *(child.pid for child in group.children)]
    else:

        def chunks(lat: torch.Tensor) -> Iterator[torch.Tensor]:
            return base.decoder_steps(base.vae.post_quant_conv(base.denormalize(lat)))

        halo = 0
        pids = [os.getpid()]
    baselines = [_status_kib(pid, "VmRSS") for pid in pids]
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    started = time.monotonic()
    with torch.no_grad():
        output = [chunk.clone() for chunk in chunks(latents)]
    seconds = time.monotonic() - started
    peaks = [(_status_kib(pid, "VmHWM") - base_kib) / 1024 for pid, base_kib in zip(pids, baselines, strict=True)]
    if group is not None:
        group.close()
    reference = Path(config["reference"])
    if ranks == 1:
        torch.save(output, reference)
        max_diff = 0.0
    else:
        expected = torch.load(reference)
        max_diff = max(float((a - b).abs().max()) for a, b in zip(output, expected, strict=True))
    regions = shard_regions(grid, height // 8, width // 8, halo)
    area = max((r.ext_rows[1] - r.ext_rows[0]) * (r.ext_cols[1] - r.ext_cols[0]) for r in regions)
    # What a rank decodes at output resolution, where most of the memory is: its core plus the reach of the
    # convolutions still to come (the blocks' inputs are cropped to it), at the first full-resolution block.
    full_res_area = 0
    for r in regions:
        spans = []
        for core, ext, size in ((r.core_rows, r.ext_rows, height // 8), (r.core_cols, r.ext_cols, width // 8)):
            plan = axis_plan(base.vae.decoder, core, ext, size, 8) if ranks > 1 else None
            start, stop = plan.crops[plan.scales.index(8)] if plan else (0, 8 * size)
            spans.append(stop - start)
        full_res_area = max(full_res_area, spans[0] * spans[1])
    return {
        "ranks": ranks,
        "grid": str(grid),
        "height": height,
        "width": width,
        "frames": frames,
        "halo": halo,
        "seconds": seconds,
        "peak_mib_per_rank": peaks,
        "largest_shard_area_share": area / ((height // 8) * (width // 8)),
        "largest_full_res_area_share": full_res_area / (height * width),
        "max_abs_diff_vs_one_process": max_diff,
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| ranks | grid | decode s | peak MiB above the model, per rank | max rank / N=1 | 1/N "
        "| latent shard share (core+halo) | full-res share (core+reach) | max abs diff vs N=1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_peak = rows[0]["peak_mib_per_rank"][0] if rows and rows[0]["ranks"] == 1 else 0.0
    for r in rows:
        peaks = r["peak_mib_per_rank"]
        ratio = f"{max(peaks) / base_peak:.2f}" if base_peak > 0 else "-"
        verdict = (
            ""
            if r["ranks"] == 1
            else (" (ok)" if r["max_abs_diff_vs_one_process"] < FLOAT_TOLERANCE else " (MISMATCH)")
        )
        lines.append(
            f"| {r['ranks']} | {r['grid']} | {r['seconds']:.1f} | {', '.join(f'{p:.0f}' for p in peaks)} "
            f"| {ratio} | {1 / r['ranks']:.2f} | {r['largest_shard_area_share']:.2f} "
            f"| {r['largest_full_res_area_share']:.2f} | {r['max_abs_diff_vs_one_process']:.1e}{verdict} |"
        )
    first = rows[0] if rows else {}
    size = (
        f"{first['height']}x{first['width']}, {first['frames']} frames, halo {max(r['halo'] for r in rows)}"
        if rows
        else ""
    )
    lines.append(f"{size}; tolerance {FLOAT_TOLERANCE:g} on the decoder's float output in [-1, 1]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sharded_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="240x416", help="HxW of the video (multiples of 16)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--arch", default="wan2.1-t2v-1.3b", help="whose VAE (tiny for a smoke run)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads per rank")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        return answer_parent(measure)
    height, width = (int(v) for v in args.size.split("x"))
    counts = sorted({1, *(int(n) for n in args.ranks.split(","))})
    if any(n not in GRIDS for n in counts):
        parser.error(f"--ranks takes counts from {sorted(GRIDS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-sharded-") as tmp:
        model_dir = write_vae(Path(tmp) / "model", args.arch)
        for ranks in counts:  # N=1 first: it writes the reference frames the others are checked against
            config = {
                "ranks": ranks,
                "height": height,
                "width": width,
                "frames": args.frames,
                "threads": args.threads if ranks == 1 else max(1, args.threads // ranks),
                "model_dir": str(model_dir),
                "reference": str(Path(tmp) / "reference.pt"),
            }
            rows.append(run_child(config, "bench.sharded_decode"))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["max_abs_diff_vs_one_process"] < FLOAT_TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
