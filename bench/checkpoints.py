"""What checkpointing the DiT's work costs the transform stage, against the same stage without it, in one run.

Run: ``python -m bench.checkpoints [--arch bench] [--repeats 3] [--saves-every-percent 10] [--json PATH]``.

The transform stage of the ``bench`` preset (``reelfarm model build DIR --arch bench``: a DiT-bound
model at its own job shape, 20 steps) runs the farm's denoising loop, interleaved:

1. **baseline** -- ``DenoiseStage.denoise``, no hook;
2. **checkpointed** -- the same loop with the farm's step-boundary hook
   (``workers.transform_compute.saving_boundary``) saving the denoising state every
   ``--saves-every-percent`` of the steps, then the finished latents checkpoint,
   through ``workers.checkpoints`` into a real SeaweedFS S3 server and a real
   Valkey job record (both started by the bench, stopped on the way out).

The cost is what the checkpoints take from the stage: the CPU time the loop
itself spends in the hook (host copy of latents + scheduler state, handing it to
the writer thread) plus every CPU second of the writer thread (safetensors,
checksum, PutObject, the record update) -- on a machine whose cores the DiT
already uses, those are stolen from it. Reported as a fraction of the baseline
stage's CPU time (all its threads), medians; target < 2%. CPU against CPU,
because on a shared machine wall times stretch with the neighbours' load; the
wall-time figures and the measured difference of the two stage times are
printed too (noisier than the cost itself).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from scheduler.core import keys
from scheduler.core.job_record import StageField, stage_field
from scheduler.core.keys import Stage
from scheduler.core.object_store import S3Config, ensure_bucket, make_s3_client
from scheduler.core.settings import CheckpointSettings, FarmSettings, S3Settings
from scheduler.core.spec import JobSpec
from scheduler.local.seaweedfs import start_s3_server
from scheduler.local.valkey import start_valkey

TARGET_FRACTION = 0.02
PROMPT = "a lighthouse at dusk, waves breaking on the rocks"


@dataclass
class BenchRuntime:
    """What the checkpoint writer and the step hook use of a worker's ``StageRuntime``."""

    settings: FarmSettings
    conn: redis.Redis
    s3: Any
    background: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-io")
    )
    preempt: threading.Event = field(default_factory=threading.Event)
    # The hop a checkpoint belongs to: this bench times one unsplit transform hop.
    stage: Stage = Stage.TRANSFORM


@dataclass
class TimedHook:
    """The farm's step hook, adding up the time the denoising loop spends in it."""

    hook: Any
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def __call__(self, done: int, total: int, capture: Any) -> None:
        self.timed(lambda: self.hook(done, total, capture))

    def timed(self, call: Any) -> Any:
        entered, entered_cpu = time.perf_counter(), time.thread_time()
        try:
            return call()
        finally:
            self.seconds += time.perf_counter() - entered
            self.cpu_seconds += time.thread_time() - entered_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoints", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="bench", help="model preset (tiny for a quick smoke run)")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="where the preset is built [.reelfarm/models/ARCH]"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps [the preset's job]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saves-every-percent", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    # A SIGTERM must still stop the servers started below (the finally), not orphan them.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        figures = measure(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_figures(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["cost_fraction"] < TARGET_FRACTION else 1


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, start Valkey and S3, run the interleaved repeats, stop the servers."""
    from workers.models.presets import arch_named, build_arch_model

    arch = arch_named(args.arch)
    model_dir = build_arch_model(args.model_dir or Path(".reelfarm/models") / arch.name, arch.name)
    job = {"width": 64, "height": 64, "frames": 17, "steps": 20, **arch.job}
    if args.steps:
        job["steps"] = args.steps
    password, access, secret_key = secrets.token_hex(16), "bench", secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-") as tmp:
        valkey = start_valkey(Path(tmp) / "valkey", None, password)
        s3_server = None
        try:
            s3_server = start_s3_server(Path(tmp) / "s3", None, access, secret_key)
            s3 = S3Config(f"http://127.0.0.1:{s3_server.port}", "bench", access, secret_key)
            client = make_s3_client(s3)
            ensure_bucket(client, s3.bucket)
            every = max(1, round(job["steps"] * args.saves_every_percent / 100))
            settings = FarmSettings(
                redis_url="redis://unused",
                secret="bench",
                s3=S3Settings(bucket=s3.bucket),
                checkpoints=CheckpointSettings(save_every_steps=every, save_min_steps=0, preempt_on_sigterm=False),
            )
            conn = redis.Redis(host="127.0.0.1", port=valkey.port, password=password)
            rt = BenchRuntime(settings, conn, client)
            figures = run(rt, model_dir, arch.name, job, args.repeats, every)
            rt.background.shutdown(wait=True)
        finally:
            if s3_server is not None:
                s3_server.stop()
            valkey.stop()
    return figures


def run(rt: BenchRuntime, model_dir: Path, arch: str, job: dict[str, int], repeats: int, every: int) -> dict[str, Any]:
    import torch

    from workers import checkpoints
    from workers.stage_seam import StageJob
    from workers.stages.encode import TextEncodeStage
    from workers.stages.transform import DenoiseStage
    from workers.transform_compute import saving_boundary

    embeds = TextEncodeStage(model_dir).encode(PROMPT, "blurry", 5.0)
    denoiser = DenoiseStage(model_dir)
    spec = JobSpec(prompt=PROMPT, width=job["width"], height=job["height"], frames=job["frames"], steps=job["steps"])
    kwargs: dict[str, Any] = {
        "height": spec.height,
        "width": spec.width,
        "num_frames": spec.frames,
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "seed": spec.seed,
        "flow_shift": None,
    }

    def background_cpu() -> float:
        return rt.background.submit(time.thread_time).result()

    samples: dict[str, list[float]] = {
        name: [] for name in ("baseline", "baseline_cpu", "checkpointed", "in_hook", "in_hook_cpu", "writer_cpu")
    }
    object_bytes: list[int] = []
    for repeat in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        baseline = denoiser.denoise(embeds, **kwargs)
        samples["baseline"].append(time.perf_counter() - started)
        samples["baseline_cpu"].append(time.process_time() - started_cpu)

        job_id = f"bench-{repeat}"
        rt.conn.hset(
            keys.job_key(job_id), mapping={"state": "running", stage_field(Stage.TRANSFORM, StageField.ATTEMPT): "1"}
        )
        hook = TimedHook(saving_boundary(StageJob(rt, job_id, spec, 1)))  # type: ignore[arg-type]
        cpu_before = background_cpu()
        started = time.perf_counter()
        latents = denoiser.denoise(embeds, at_boundary=hook, **kwargs)
        save = functools.partial(checkpoints.save_latents, rt, job_id, 1, latents, spec.steps)  # type: ignore[arg-type]
        written = hook.timed(save)
        samples["checkpointed"].append(time.perf_counter() - started)
        assert written.result(), "the latents checkpoint was not recorded"
        samples["in_hook"].append(hook.seconds)
        samples["in_hook_cpu"].append(hook.cpu_seconds)
        samples["writer_cpu"].append(background_cpu() - cpu_before)
        assert torch.equal(latents, baseline), "checkpointing changed the latents"
        fields = {k.decode(): v.decode() for k, v in rt.conn.hgetall(keys.job_key(job_id)).items()}  # type: ignore[union-attr]
        object_bytes = [
            json.loads(fields[stage_field(Stage.TRANSFORM, name)])["bytes"]
            for name in (StageField.RESUME, StageField.CHECKPOINT)
        ]

    medians = {name: statistics.median(values) for name, values in samples.items()}
    saves = (spec.steps - 1) // every
    # CPU seconds against CPU seconds: on a shared machine wall times stretch with the neighbours' load,
    # CPU times do not (the DiT's CPU time counts its intra-op threads, as the writer competes with them).
    cost = medians["in_hook_cpu"] + medians["writer_cpu"]
    return {
        "arch": arch,
        "job": job,
        "repeats": repeats,
        "saves_per_job": saves,
        "save_every_steps": every,
        "state_object_bytes": object_bytes[0],
        "latents_object_bytes": object_bytes[1],
        "seconds": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "median_seconds": {name: round(v, 4) for name, v in medians.items()},
        "cost_fraction": round(cost / medians["baseline_cpu"], 5),
        "in_hook_fraction": round(medians["in_hook_cpu"] / medians["baseline_cpu"], 5),
        "writer_cpu_fraction": round(medians["writer_cpu"] / medians["baseline_cpu"], 5),
        "in_hook_wall_fraction": round(medians["in_hook"] / medians["baseline"], 5),
        "measured_slowdown": round(medians["checkpointed"] / medians["baseline"] - 1, 4),
        "target_fraction": TARGET_FRACTION,
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
    }


def print_figures(figures: dict[str, Any]) -> None:
    m = figures["median_seconds"]
    job = figures["job"]
    print(
        f"transform stage, {figures['arch']} preset, {job['width']}x{job['height']}x{job['frames']}, {job['steps']} steps "
        f"(median of {figures['repeats']}); {figures['saves_per_job']} state saves "
        f"({figures['state_object_bytes']:,} B each) + 1 latents checkpoint ({figures['latents_object_bytes']:,} B)"
    )
    print(f"  baseline stage (no checkpoints)    {m['baseline']:9.3f} s wall {m['baseline_cpu']:9.3f} s CPU")
    print(f"  checkpointed stage                 {m['checkpointed']:9.3f} s wall ({figures['measured_slowdown']:+.1%})")
    print(
        f"  loop time in the save hook         {m['in_hook']:9.4f} s wall {m['in_hook_cpu']:9.4f} s CPU "
        f"({figures['in_hook_fraction']:.2%} of the stage's CPU, {figures['in_hook_wall_fraction']:.2%} of its wall)"
    )
    print(
        f"  writer thread: serialize, hash, PUT, record  {m['writer_cpu']:9.4f} s CPU "
        f"({figures['writer_cpu_fraction']:.2%})"
    )
    verdict = "meets" if figures["cost_fraction"] < figures["target_fraction"] else "MISSES"
    print(
        f"checkpoint write cost / transform stage, CPU seconds: {figures['cost_fraction']:.2%} "
        f"({verdict} the {figures['target_fraction']:.0%} target)"
    )


if __name__ == "__main__":
    sys.exit(main())
