"""Control-plane ceiling: jobs/s one Redis/Valkey sustains through the farm's whole protocol, zero-compute stages.

Run: ``python -m bench.control_plane [--workers 10,50] [--jobs 1000] [--real] [--json PATH]``.

One Valkey (started here, AOF on, as the embedded farm runs it). For each
worker count, that many zero-compute stage worker processes (``bench.zero_stage``:
the real worker's Redis protocol -- rq's dequeue and bookkeeping, the call check,
the record's start fence, the claims, descriptors and acks of the hand-offs, the
finishing transactions, heartbeats, ack listeners and reapers -- without a model,
torch or Mooncake), split equally over the three stages (the remainder to
transform, then decode). They are forked from this process, so 50 start in a
second and each costs ~40 MB. Then ``--jobs`` jobs of ``bench.overhead``'s shape
(2 steps) go in through the farm's real submit path (``scheduler.intake.submit``,
one job at a time, as fast as this process can), and run to the end.

Measured, with ``INFO`` sampled every ``SAMPLE_SECONDS`` and ``/proc`` read at
the same moments:

- **steady state** (from when submission is over and 10% of the jobs finished,
  to 90%): jobs/s finished, Redis commands/s, Redis CPU (main thread, and all
  threads: ``used_cpu_sys`` + ``used_cpu_user``), the CPU of the worker
  processes and of this driver, and how busy the machine's cores were;
- **per job** (the whole run, ``INFO commandstats`` reset before submission;
  the sampler's own commands and what the idle farm sends anyway -- heartbeats,
  blocking dequeues and ack waits timing out, reaper passes, measured for 5 s
  first, with the Redis CPU they cost -- taken out): Redis commands and ``commandstats`` microseconds, as
  ``bench.overhead`` counts them for real workers;
- **Redis CPU per job** = (steady Redis main-thread CPU - the idle farm's) / steady
  jobs/s; **ceiling** = (1 - the idle farm's share of the thread) / Redis CPU per
  job: the rate at which the jobs fill the one thread Valkey executes commands on.
  Per-command CPU tends to fall as a server gets busier (more replies per wake-up),
  so this extrapolation errs low; ``1e6 / commandstats us per job`` (command
  execution only, no I/O) is the optimistic bound.

**Where it saturates**: when Redis's main thread is near a full core, Redis is
the limit and the measured rate *is* the ceiling. Otherwise, when the machine's
cores are all busy (the workers' Python is the bulk), the clients saturate the
CPUs first: the measured rate is a floor and the ceiling is extrapolated. Both are
printed, with the load average before and after.

**Fidelity**: a run at 1:1:1 with 20 queued jobs -- ``bench.overhead``'s queue run
-- counts commands per job the same way; it is printed next to what
``bench.overhead`` measured for real workers (the figure recorded in bench/README.md,
or measured in this run with ``--real``, which starts real torch workers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import redis

from bench import zero_stage
from bench.local_farm import connect
from bench.overhead import JOB
from scheduler.core import keys
from scheduler.core.job_record import JobState, read_records
from scheduler.core.keys import Stage
from scheduler.core.queues import stage_queue
from scheduler.core.settings import FarmSettings
from scheduler.intake.submit import submit
from scheduler.local.valkey import start_valkey
from scheduler.ops.batch import submit_batch
from scheduler.ops.batch_file import ParsedBatch, parse_batch, specs_to_text

SAMPLE_SECONDS = 0.5
IDLE_SECONDS = 5.0  # one reaper interval: every worker's pass falls in it once
SETTLE_SECONDS = 2.5  # after start-up: every thread has opened its connections and beaten once
SAMPLER_COMMANDS = 3  # per sample: INFO cpu, INFO stats, ZCARD
FIDELITY_JOBS = 20
# bench.overhead's queue run with real tiny-model workers (bench/README.md, "Control-plane ceiling").
# Re-measured 2026-12-03 after queues.FarmWorker and jobs.ProgressWrites (issue 25 item 2); 310 before.
REAL_REFERENCE = {"commands_per_job": 259.0, "redis_us_per_job": 1900.0, "source": "bench/README.md (bench.overhead)"}
REDIS_SATURATED = 0.85  # of one core: Redis's main thread is the limit
CPUS_SATURATED = 0.85  # of all cores busy: the clients (and everything else) fill the machine
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def layout_for(workers: int) -> dict[Stage, int]:
    """``workers`` processes over the three stages, equally; the remainder to transform, then decode."""
    if workers < len(Stage):
        raise ValueError(f"a farm needs at least one worker per stage ({len(Stage)}), not {workers}")
    base, extra = divmod(workers, len(Stage))
    return {
        Stage.ENCODE: base,
        Stage.TRANSFORM: base + (1 if extra >= 1 else 0),
        Stage.DECODE: base + (1 if extra >= 2 else 0),
    }


@contextmanager
def bench_valkey(tmp: Path, model_dir: Path, **overrides: Any) -> Iterator[FarmSettings]:
    """One Valkey under ``tmp`` (AOF on, as the embedded farm runs it) and settings for a zero-compute farm."""
    password = secrets.token_hex(16)
    valkey = start_valkey(tmp / "valkey", None, password)
    try:
        settings = FarmSettings(
            redis_url=f"redis://:{password}@127.0.0.1:{valkey.port}/0",
            secret=secrets.token_hex(32),
            home=tmp / "farm",
            model_dir=model_dir,
        )
        yield settings.model_copy(update=overrides)
    finally:
        valkey.stop()


# --------------------------------------------------------------------------- processes


def _worker_main(stage: Stage, settings: FarmSettings, index: int) -> None:
    # SIGTERM from the driver ends rq's loop as it ends a real worker's (a warm shutdown).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zero_stage.serve(stage, settings, index)


@contextmanager
def zero_workers(settings: FarmSettings, layout: dict[Stage, int]) -> Iterator[list[BaseProcess]]:
    """Fork the layout's zero-compute workers; wait until every one is registered and in rq's loop."""
    fork = multiprocessing.get_context("fork")
    procs: list[BaseProcess] = []
    try:
        for stage, count in layout.items():
            for _ in range(count):
                child = fork.Process(target=_worker_main, args=(stage, settings, len(procs)), daemon=True)
                child.start()
                procs.append(child)
        _wait_registered(connect(settings), procs)
        yield procs
    finally:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


def _wait_registered(conn: redis.Redis, procs: Sequence[BaseProcess], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        farm = int(conn.scard(keys.workers_index_key()))  # type: ignore[arg-type]
        rq_workers = int(conn.scard("rq:workers"))  # type: ignore[arg-type]
        if farm >= len(procs) and rq_workers >= len(procs):
            return
        dead = [p.pid for p in procs if not p.is_alive()]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(
                f"zero-compute workers did not all start ({farm} registered, {rq_workers} in rq, exited: {dead})"
            )
        time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    at: float
    finished: int
    commands: int
    redis_main: float  # CPU seconds of Valkey's main thread
    redis_all: float  # CPU seconds of the whole server (used_cpu_sys + used_cpu_user)
    workers: float  # CPU seconds of the worker processes
    driver: float  # CPU seconds of this process (submission, sampling)
    machine_busy: float
    machine_total: float


class Sampler(threading.Thread):
    """Samples Redis's counters and the processes' CPU every ``SAMPLE_SECONDS`` (3 commands a sample)."""

    def __init__(self, settings: FarmSettings, finished_key: str, worker_pids: list[int]) -> None:
        super().__init__(name="sampler", daemon=True)
        self.conn = connect(settings)
        self.finished_key = finished_key
        self.worker_pids = worker_pids
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def sample(self) -> Sample:
        pipe = self.conn.pipeline(transaction=False)
        pipe.info("cpu")
        pipe.info("stats")
        pipe.zcard(self.finished_key)
        cpu, stats, finished = pipe.execute()
        busy, total = _machine_busy_seconds()
        sample = Sample(
            at=time.monotonic(),
            finished=int(finished),
            commands=int(stats["total_commands_processed"]),
            redis_main=_redis_main_cpu(cpu),
            redis_all=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            workers=sum(_cpu_seconds(pid) for pid in self.worker_pids),
            driver=_cpu_seconds(os.getpid()),
            machine_busy=busy,
            machine_total=total,
        )
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# --------------------------------------------------------------------------- one run


def idle_load(conn: redis.Redis, seconds: float) -> dict[str, Any]:
    """What the idle farm sends per second (heartbeats, dequeues and ack waits timing out, reaper passes)."""
    conn.config_resetstat()
    cpu_before = _redis_main_cpu(conn.info("cpu"))
    time.sleep(seconds)
    cpu_after = _redis_main_cpu(conn.info("cpu"))
    stats = conn.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    top = sorted(calls.items(), key=lambda item: -item[1])[:5]
    return {
        "calls_per_s": sum(calls.values()) / seconds,
        "usec_per_s": sum(int(stat["usec"]) for stat in stats.values()) / seconds,
        "top": ", ".join(f"{name} {count / seconds:.0f}/s" for name, count in top),
        "redis_main_cores": (cpu_after - cpu_before) / seconds,
    }


def _redis_main_cpu(cpu: dict[str, Any]) -> float:
    """CPU seconds of the thread Valkey runs commands on (the whole server's where it does not say)."""
    return float(cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])) + float(
        cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
    )


def bench_batch(settings: FarmSettings, name: str, jobs: int) -> ParsedBatch:
    """``jobs`` distinct specs of ``bench.overhead``'s shape, parsed and validated as ``reelfarm batch`` does."""
    specs = [{**JOB, "prompt": f"{JOB['prompt']} #{i}"} for i in range(jobs)]
    return parse_batch(specs_to_text(specs), settings, name=name)


@dataclass
class RunResult:
    label: str
    layout: dict[str, int]
    jobs: int
    seconds: float
    submit_seconds: float
    jobs_per_s: float  # steady state
    steady_jobs: int
    commands_per_s: float
    redis_main_cores: float  # fraction of one core: Valkey's command thread
    redis_all_cores: float
    worker_cores: float
    driver_cores: float
    machine_busy: float  # fraction of all cores
    others_cores: float  # what other processes on the machine used meanwhile
    cpus: int
    submitted: str  # "one by one" or "batch"
    commands_per_job: float  # whole run, the sampler's and the idle farm's commands taken out
    commands_per_job_gross: float
    redis_us_per_job: float  # commandstats usec, same accounting
    redis_cpu_ms_per_job: float  # steady state: main-thread CPU, the idle farm's out, per job finished
    client_cpu_ms_per_job: float  # steady state: the workers' CPU / jobs finished
    ceiling_jobs_per_s: float  # (1 - idle_redis_cores) / redis_cpu_ms_per_job
    idle_calls_per_s: float
    idle_redis_cores: float  # Redis main-thread CPU of the idle farm: heartbeats, ack waits, reaper passes
    idle_top: str
    saturates: str
    top: str
    loadavg_before: str
    loadavg_after: str
    calls: dict[str, int] = field(default_factory=dict)


def _steady(samples: list[Sample], jobs: int, submitted_at: float) -> tuple[Sample, Sample]:
    """The first and last sample of the steady window: submission over and 10% finished, to 90% finished."""
    after = [s for s in samples if s.at >= submitted_at]
    start = next((s for s in after if s.finished >= 0.1 * jobs), after[0])
    end = next((s for s in after if s.finished >= 0.9 * jobs), after[-1])
    if end.at - start.at < 2 * SAMPLE_SECONDS or end.finished <= start.finished:
        start, end = samples[0], samples[-1]  # too short a run for a window: the whole run
    return start, end


def _verdict(redis_main: float, machine_busy: float, ceiling: float, jobs_per_s: float, cpus: int) -> str:
    if redis_main >= REDIS_SATURATED:
        return f"Redis: its command thread is {redis_main:.0%} busy at {jobs_per_s:,.0f} jobs/s"
    if machine_busy >= CPUS_SATURATED:
        return (
            f"the clients: all {cpus} cores {machine_busy:.0%} busy while Redis's command thread is "
            f"{redis_main:.0%} busy; Redis would saturate near {ceiling:,.0f} jobs/s"
        )
    return (
        f"neither (cores {machine_busy:.0%} busy, Redis {redis_main:.0%}): latency-bound at this worker count; "
        f"Redis would saturate near {ceiling:,.0f} jobs/s"
    )


def _wait_finished(conn: redis.Redis, sampler: Sampler, job_ids: list[str], stall_seconds: float = 30.0) -> None:
    last, moved_at = -1, time.monotonic()
    while True:
        finished = sampler.samples[-1].finished if sampler.samples else 0
        if finished >= len(job_ids):
            return
        if finished != last:
            last, moved_at = finished, time.monotonic()
        elif time.monotonic() - moved_at > stall_seconds:
            records = [r or {} for _, r in read_records(conn, job_ids, ["state", "error"])]
            failed = [(j, r.get("error")) for j, r in zip(job_ids, records, strict=True) if r.get("state") == "failed"]
            detail = f"{len(failed)} failed, e.g. {failed[0]}" if failed else "none failed"
            raise RuntimeError(f"bench jobs stopped finishing at {finished}/{len(job_ids)} ({detail})")
        time.sleep(SAMPLE_SECONDS / 2)


def run_layout(
    settings: FarmSettings, label: str, layout: dict[Stage, int], jobs: int, *, one_by_one: bool = False
) -> RunResult:
    """Run ``jobs`` jobs through ``layout``'s zero-compute workers; submitted one by one (``intake.submit``,
    as ``bench.overhead`` does) or as one batch (``reelfarm batch``'s path, parsed before the clock starts)."""
    conn = connect(settings)
    conn.flushall()
    load_before = _loadavg()
    parsed = None if one_by_one else bench_batch(settings, label.replace(" ", "-"), jobs)
    finished_key = stage_queue(conn, Stage.DECODE).finished_job_registry.key
    with zero_workers(settings, layout) as procs:
        time.sleep(SETTLE_SECONDS)
        idle = idle_load(conn, seconds=IDLE_SECONDS)
        sampler = Sampler(settings, finished_key, [p.pid for p in procs if p.pid is not None])
        conn.config_resetstat()
        sampler.sample()
        sampler.start()
        started = time.monotonic()
        if parsed is None:
            job_ids = [submit(conn, settings, JOB) for _ in range(jobs)]
        else:
            submit_batch(conn, settings, parsed)
            job_ids = parsed.job_ids
        submitted_at = time.monotonic()
        try:
            _wait_finished(conn, sampler, job_ids)
        finally:
            sampler.stop()
        seconds = time.monotonic() - started
        commandstats = conn.info("commandstats")
    records = [r or {} for _, r in read_records(conn, job_ids, ["state"])]
    if any(r.get("state") != JobState.SUCCEEDED.value for r in records):
        raise RuntimeError("not every bench job succeeded")
    start, end = _steady(sampler.samples, jobs, submitted_at)
    span = end.at - start.at
    busy = end.machine_busy - start.machine_busy
    jobs_per_s = (end.finished - start.finished) / span
    redis_main = (end.redis_main - start.redis_main) / span
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in commandstats.items()}
    usec = sum(int(stat["usec"]) for stat in commandstats.values())
    info_usec = int(commandstats.get("cmdstat_info", {"usec": 0})["usec"])
    own = SAMPLER_COMMANDS * len(sampler.samples) + 1  # and the INFO commandstats itself
    net_calls = sum(calls.values()) - own - idle["calls_per_s"] * seconds
    net_usec = max(0.0, usec - info_usec - idle["usec_per_s"] * seconds)
    # What the jobs cost Redis's command thread, the idle farm's share (which does not grow with jobs/s) out:
    # the ceiling is the rate at which that per-job cost fills what the idle farm leaves of the thread.
    per_job = max(redis_main - idle["redis_main_cores"], 0.0) / jobs_per_s if jobs_per_s else 0.0
    ceiling = (1.0 - idle["redis_main_cores"]) / per_job if per_job else 0.0
    machine_busy = busy / (end.machine_total - start.machine_total)
    ours = (end.redis_all - start.redis_all + end.workers - start.workers + end.driver - start.driver) / span
    cpus = os.cpu_count() or 1
    top = sorted(calls.items(), key=lambda item: -item[1])[:8]
    return RunResult(
        label=label,
        layout={stage.value: count for stage, count in layout.items()},
        jobs=jobs,
        seconds=seconds,
        submit_seconds=submitted_at - started,
        jobs_per_s=jobs_per_s,
        steady_jobs=end.finished - start.finished,
        commands_per_s=(end.commands - start.commands) / span,
        redis_main_cores=redis_main,
        redis_all_cores=(end.redis_all - start.redis_all) / span,
        worker_cores=(end.workers - start.workers) / span,
        driver_cores=(end.driver - start.driver) / span,
        machine_busy=machine_busy,
        others_cores=max(0.0, busy / span - ours),
        cpus=cpus,
        submitted="one by one" if parsed is None else "batch",
        commands_per_job=net_calls / jobs,
        commands_per_job_gross=(sum(calls.values()) - own) / jobs,
        redis_us_per_job=net_usec / jobs,
        redis_cpu_ms_per_job=1000 * per_job,
        client_cpu_ms_per_job=1000 * (end.workers - start.workers) / max(1, end.finished - start.finished),
        ceiling_jobs_per_s=ceiling,
        idle_calls_per_s=idle["calls_per_s"],
        idle_redis_cores=idle["redis_main_cores"],
        idle_top=idle["top"],
        saturates=_verdict(redis_main, machine_busy, ceiling, jobs_per_s, cpus),
        top=", ".join(f"{name} {count / jobs:.1f}" for name, count in top),
        loadavg_before=load_before,
        loadavg_after=_loadavg(),
        calls=calls,
    )


# --------------------------------------------------------------------------- the reference and the report


def real_reference(tmp: Path) -> dict[str, Any]:
    """Commands and Redis CPU per job of ``bench.overhead``'s queue run, with real workers, measured now."""
    out = tmp / "overhead.json"
    command = [sys.executable, "-m", "bench.overhead", "--serial", "1", "--queue", str(FIDELITY_JOBS),
               "--json", str(out)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    load = json.loads(out.read_text())["redis"]
    return {
        "commands_per_job": load["commands_per_job"],
        "redis_us_per_job": load["redis_us_per_job"],
        "calls": load["calls"],
        "source": f"bench.overhead --queue {FIDELITY_JOBS}, this run",
    }


def render(results: list[RunResult]) -> str:
    lines = [
        "| run | workers e:t:d | jobs | steady jobs/s | commands/s | Redis CPU main / all (cores) "
        "| Redis CPU per job | commands per job | workers' CPU (cores) | driver | machine busy "
        "| ceiling jobs/s | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        layout = ":".join(str(r.layout[s.value]) for s in Stage)
        lines.append(
            f"| {r.label} | {layout} | {r.jobs} | **{r.jobs_per_s:,.0f}** | {r.commands_per_s:,.0f} "
            f"| {r.redis_main_cores:.2f} / {r.redis_all_cores:.2f} | {r.redis_cpu_ms_per_job:.2f} ms "
            f"| {r.commands_per_job:.0f} | {r.worker_cores:.2f} | {r.driver_cores:.2f} "
            f"| {r.machine_busy:.0%} of {r.cpus} | **{r.ceiling_jobs_per_s:,.0f}** "
            f"| {r.loadavg_before} / {r.loadavg_after} |"
        )
    return "\n".join(lines)


def fidelity_lines(fidelity: RunResult, reference: dict[str, Any]) -> list[str]:
    real = reference["commands_per_job"]
    lines = [
        f"Fidelity (1:1:1, queue of {fidelity.jobs}, counted as bench.overhead counts): zero-compute workers "
        f"{fidelity.commands_per_job:.0f} commands and {fidelity.redis_us_per_job:,.0f} us of commandstats per job; "
        f"real workers {real:.0f} commands and {reference['redis_us_per_job']:,.0f} us ({reference['source']}): "
        f"{fidelity.commands_per_job - real:+.0f} commands ({(fidelity.commands_per_job - real) / real:+.0%})."
    ]
    if "calls" in reference:
        names = sorted(set(fidelity.calls) | set(reference["calls"]), key=lambda n: -reference["calls"].get(n, 0))
        diffs = [
            f"{name} {fidelity.calls.get(name, 0) / fidelity.jobs:.1f} vs {reference['calls'].get(name, 0) / FIDELITY_JOBS:.1f}"
            for name in names
            if abs(fidelity.calls.get(name, 0) / fidelity.jobs - reference["calls"].get(name, 0) / FIDELITY_JOBS) >= 0.5
        ]
        lines.append(
            "Per command, per job (gross: zero-compute vs real, whose hmget are mostly bench.overhead's own polls), "
            "where they differ: " + "; ".join(diffs)
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="10,50", help="worker process counts, comma-separated")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per worker count")
    parser.add_argument("--real", action="store_true", help="also measure real workers (bench.overhead) now")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.workers.split(",") if part.strip()]
    layouts = [layout_for(count) for count in counts]  # refused before anything starts
    # A bench stopped with SIGTERM still stops its workers and its Valkey.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-control-plane-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "model"
        model_dir.mkdir()
        # Read by submission's model check (scheduler.core.model_catalog); the workers load nothing.
        (model_dir / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        # First, while the machine is as quiet as this bench leaves it: real workers load torch.
        reference = real_reference(tmp) if args.real else REAL_REFERENCE
        with bench_valkey(tmp, model_dir, spec_defaults={"fps": 16}) as settings:
            fidelity = run_layout(settings, "fidelity", dict.fromkeys(Stage, 1), FIDELITY_JOBS, one_by_one=True)
            results = [
                run_layout(settings, f"{count} workers", layout, args.jobs)
                for count, layout in zip(counts, layouts, strict=True)
            ]
    print(render([fidelity, *results]))
    for line in fidelity_lines(fidelity, reference):
        print(line)
    for r in results:
        print(
            f"{r.label}: saturates at {r.saturates}. Per job: {r.commands_per_job:.0f} commands "
            f"({r.commands_per_job_gross:.0f} with the idle farm's {r.idle_calls_per_s:.0f}/s, which cost Redis "
            f"{r.idle_redis_cores:.1%} of its thread: {r.idle_top}), "
            f"{r.redis_us_per_job:,.0f} us commandstats, {r.redis_cpu_ms_per_job:.2f} ms Redis main-thread CPU, "
            f"{r.client_cpu_ms_per_job:.1f} ms of worker CPU. Busiest per job: {r.top}"
        )
    if args.json:
        payload = {"fidelity": asdict(fidelity), "runs": [asdict(r) for r in results], "reference": reference}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
