"""Decode stage: streaming VAE decode into an S3 multipart upload vs diffusers' whole-clip decode, at the
Wan2.1-T2V-1.3B VAE (random weights), for several clip lengths and resolutions.

Run: ``python -m bench.decode [--frames 17,33,81] [--sizes 96x160,192x320] [--arch wan2.1-t2v-1.3b] [--json PATH]``.

Each measurement runs in a fresh process (so peak memory is its own) with the
VAE loaded first; peak memory is the process's peak resident set *above* the
loaded model (Linux ``VmHWM``, reset after loading through
``/proc/self/clear_refs``):

- **stream** -- what the decode worker runs (`workers.render_upload`):
  `StreamingVaeDecoder` one latent frame at a time -> ffmpeg (fragmented MP4 on
  a pipe) -> `StreamingMultipartUpload`. Also timed: decode start to the first
  part stored in the object store, and to the end of decode.
- **whole** -- ``vae.decode`` of the whole latent clip, ``postprocess_video``,
  then ffmpeg over all frames, then one ``put_object``.

Targets: the streaming peak grows less than 10% from the shortest to the
longest clip at a resolution; the first bytes are stored before decode is half
done (only possible where the video is larger than one multipart part: S3's
minimum part is 5 MiB, and the table says when a video is smaller).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.local_farm import farm_servers

REPO = Path(__file__).resolve().parents[1]
PEAK_GROWTH_TARGET = 0.10


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # Writing 5 resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this process (run as a child of the bench)."""
    import numpy as np
    import torch

    from scheduler.core.object_store import MIN_PART_SIZE, StreamingMultipartUpload
    from scheduler.core.settings import S3Settings
    from workers.allocator import return_freed_memory_promptly
    from workers.stages.decode import StreamingVaeDecoder, frames_to_uint8
    from workers.video_encoder import FfmpegStreamEncoder, codec_from_options

    if not config.get("default_malloc"):
        return_freed_memory_promptly()  # as every worker process does at start (workers.allocator)
    torch.set_num_threads(config["threads"])
    height, width, frames = config["height"], config["width"], config["frames"]
    decoder = StreamingVaeDecoder(Path(config["model_dir"]))
    latents = torch.randn(
        1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(0)
    )
    settings = S3Settings.model_validate(config["s3"])
    client = settings.client()
    codec = codec_from_options("h264", None, None)
    key = f"bench/{config['mode']}-{frames}-{height}x{width}.mp4"
    baseline = _rss_kib("VmRSS")
    _reset_peak()
    started = time.monotonic()
    first_stored: float | None = None
    decode_end = 0.0
    if config["mode"] == "stream":
        with StreamingMultipartUpload(client, settings.bucket, key, "video/mp4", part_size=MIN_PART_SIZE) as upload:

            def sink(data: bytes) -> None:
                nonlocal first_stored
                upload.write(data)
                if first_stored is None and upload.parts_uploaded:
                    first_stored = time.monotonic() - started

            with FfmpegStreamEncoder(width, height, 16, codec, sink=sink) as encoder:
                for chunk in decoder.iter_frames(latents):
                    encoder.write_frames(chunk)
                decode_end = time.monotonic() - started
            size = upload.complete().size
    else:
        with torch.no_grad():
            video = decoder.vae.decode(decoder.denormalize(latents), return_dict=False)[0]
            frames_np = frames_to_uint8(decoder.video_processor.postprocess_video(video, output_type="np")[0])
        decode_end = time.monotonic() - started
        buffer = io.BytesIO()

        def keep(data: bytes) -> None:
            buffer.write(data)

        with FfmpegStreamEncoder(width, height, 16, codec, sink=keep) as encoder:
            encoder.write_frames(np.ascontiguousarray(frames_np))
        client.put_object(Bucket=settings.bucket, Key=key, Body=buffer.getvalue())
        size = buffer.tell()
    total = time.monotonic() - started
    if first_stored is None:
        first_stored = total  # the only part went up when the upload completed (or the single put)
    return {
        **{k: config[k] for k in ("mode", "frames", "height", "width")},
        "seconds": total,
        "decode_seconds": decode_end,
        "first_stored_seconds": first_stored,
        "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024,
        "video_bytes": size,
    }


def write_vae(model_dir: Path, arch_name: str) -> Path:
    """Only ``vae/`` of the preset's directory (all the decoder reads): the 1.3b DiT would be 5.7 GB of disk."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from workers.models.presets import arch_named

    torch.manual_seed(0)
    AutoencoderKLWan(**arch_named(arch_name).vae).save_pretrained(model_dir / "vae", safe_serialization=True)
    return model_dir


def run_child(config: dict[str, Any], module: str = "bench.decode") -> dict[str, Any]:
    """``python -m MODULE --child`` with ``config`` on stdin: one measurement in a fresh process, its JSON row back."""
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", module, "--child"],
        input=json.dumps(config).encode(),
        capture_output=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} measurement {config} failed:\n{done.stderr.decode()[-3000:]}")
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def answer_parent(measure: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The child side of `run_child`: config from stdin, one JSON row to stdout."""
    print(json.dumps(measure(json.loads(sys.stdin.read()))))
    return 0


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | frames | mode | decode stage s | peak MiB above the model | first part stored at | video bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["first_stored_seconds"] / r["decode_seconds"] if r["decode_seconds"] else 0.0
        first = (
            f"{r['first_stored_seconds']:.1f} s ({100 * share:.0f}% of decode)"
            if r["mode"] == "stream"
            else "at the end"
        )
        lines.append(
            f"| {r['height']}x{r['width']} | {r['frames']} | {r['mode']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} "
            f"| {first} | {r['video_bytes']:,} |"
        )
    for size in sorted({(r["height"], r["width"]) for r in rows}):
        stream = sorted(
            (r for r in rows if (r["height"], r["width"]) == size and r["mode"] == "stream"), key=lambda r: r["frames"]
        )
        if len(stream) >= 2:
            growth = stream[-1]["peak_mib"] / stream[0]["peak_mib"] - 1 if stream[0]["peak_mib"] > 0 else 0.0
            verdict = "meets" if growth < PEAK_GROWTH_TARGET else "misses"
            lines.append(
                f"{size[0]}x{size[1]}: streaming peak {stream[0]['frames']} -> {stream[-1]['frames']} frames: "
                f"{100 * growth:+.1f}% ({verdict} < {100 * PEAK_GROWTH_TARGET:.0f}%)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="17,33,81")
    parser.add_argument("--sizes", default="96x160,192x320", help="HxW list")
    parser.add_argument("--arch", default="wan2.1-t2v-1.3b", help="whose VAE (tiny for a smoke run)")
    parser.add_argument("--modes", default="stream,whole")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's trim threshold alone (what workers change)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return answer_parent(measure)
    rows = []
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-decode-") as tmp:
        model_dir = write_vae(Path(tmp) / "model", args.arch)
        with farm_servers(Path(tmp) / "farm", model_dir) as settings:
            from scheduler.core.object_store import ensure_bucket

            ensure_bucket(settings.s3.client(), settings.s3.bucket)
            for size in args.sizes.split(","):
                height, width = (int(v) for v in size.split("x"))
                for frames in (int(f) for f in args.frames.split(",")):
                    for mode in args.modes.split(","):
                        config = {
                            "mode": mode,
                            "frames": frames,
                            "height": height,
                            "width": width,
                            "threads": args.threads,
                            "default_malloc": args.default_malloc,
                            "model_dir": str(model_dir),
                            "s3": json.loads(settings.s3.model_dump_json()),
                        }
                        rows.append(run_child(config))
                        print(json.dumps(rows[-1]), file=sys.stderr)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
