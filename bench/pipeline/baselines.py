"""The two baselines of the pipeline benchmark, each run in a process of its own with a fixed thread count.

1. **loop** -- diffusers' ``WanPipeline`` loaded once, then every job in turn:
   ``pipe(...)`` (text encoder, DiT loop, VAE decode), frames encoded to MP4
   by ffmpeg and uploaded to the same S3 bucket. One process, nothing
   overlaps: what a script on one machine does.
2. **rq** -- a one-stage rq ``SimpleWorker`` whose job function runs that same
   per-job work with a pipeline loaded once per worker process: what an rq
   user builds without reelfarm. Jobs are enqueued before the worker starts;
   throughput is measured from the first job's start to the last job's end.

Both print one JSON line: per-job wall seconds and the measured window.
Run by ``bench.pipeline`` (``python -m bench.pipeline.baselines loop|rq CONFIG_JSON``).
"""

from __future__ import annotations

import json
import sys
import time
from functools import cache
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline

from scheduler.core.settings import S3Settings


@cache
def _pipeline(model_dir: str) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_and_upload(model_dir: str, s3: dict[str, Any], job: dict[str, Any]) -> float:
    """One job as a script would do it: WanPipeline, then ffmpeg to MP4, then one S3 upload. Returns seconds."""
    started = time.perf_counter()
    pipe = _pipeline(model_dir)
    frames = pipe(
        prompt=job["prompt"],
        negative_prompt=job["negative_prompt"],
        height=job["height"],
        width=job["width"],
        num_frames=job["frames"],
        num_inference_steps=job["steps"],
        guidance_scale=job["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(job["seed"]),
        output_type="np",
    ).frames[0]
    video = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    mp4 = _encode_mp4(video, job["fps"])
    client = S3Settings.model_validate(s3).client()
    client.put_object(Bucket=s3["bucket"], Key=f"baseline/{job['seed']}.mp4", Body=mp4)
    return time.perf_counter() - started


def _encode_mp4(video: np.ndarray, fps: int) -> bytes:
    import subprocess

    height, width = video.shape[1:3]
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        "-movflags", "frag_keyframe+empty_moov", "-f", "mp4", "-",
    ]  # fmt: skip
    return subprocess.run(command, input=video.tobytes(), capture_output=True, check=True).stdout


def run_loop(config: dict[str, Any]) -> dict[str, Any]:
    _pipeline(config["model_dir"])  # loading is not part of the measured window, as for the farm's workers
    started = time.time()
    seconds = [render_and_upload(config["model_dir"], config["s3"], job) for job in config["jobs"]]
    return {"start": started, "end": time.time(), "job_seconds": seconds}


def rq_job(model_dir: str, s3: dict[str, Any], job: dict[str, Any]) -> dict[str, float]:
    """The rq baseline's job function (imported by the rq worker by name, as rq does)."""
    started = time.time()
    seconds = render_and_upload(model_dir, s3, job)
    return {"start": started, "end": time.time(), "seconds": seconds}


def run_rq(config: dict[str, Any]) -> dict[str, Any]:
    from redis import Redis
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    conn = Redis.from_url(config["redis_url"])
    queue = Queue("bench-baseline", connection=conn, serializer=JSONSerializer)
    queued = [
        queue.enqueue(
            "bench.pipeline.baselines.rq_job", config["model_dir"], config["s3"], job, job_timeout=3600, result_ttl=3600
        )
        for job in config["jobs"]
    ]
    _pipeline(config["model_dir"])  # an rq user preloads the model in the worker process too
    SimpleWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True, logging_level="WARNING")
    results = [job.latest_result() for job in queued]
    returns = [r.return_value for r in results if r is not None and r.return_value]
    if len(returns) != len(queued):
        raise RuntimeError(f"the rq baseline finished {len(returns)} of {len(queued)} jobs")
    return {
        "start": min(r["start"] for r in returns),
        "end": max(r["end"] for r in returns),
        "job_seconds": [r["seconds"] for r in returns],
    }


def main(argv: list[str]) -> int:
    mode, config = argv[0], json.loads(sys.stdin.read())
    torch.set_num_threads(int(config["threads"]))
    result = run_loop(config) if mode == "loop" else run_rq(config)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
