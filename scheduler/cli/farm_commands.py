"""The farm itself: ``up``/``down`` (the embedded farm), ``worker``, ``model``, ``info`` and ``metrics``.

Commands that need torch (``worker``, ``model``) exec a ``python -m workers`` process, so the CLI
runs on a machine with no GPU stack.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import click

from scheduler.cli.common import farm_command, stop_on_signals, table
from scheduler.core.connection import connect_redis
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings, parse_worker_counts


@click.group()
def model() -> None:
    """Model directories."""


@model.command("tiny")
@click.argument("model_dir", type=click.Path(path_type=Path))
def model_tiny(model_dir: Path) -> None:
    """Write a tiny Wan2.1 text-to-video model in diffusers format (random weights, no downloads)."""
    os.execv(sys.executable, [sys.executable, "-m", "workers.models", "tiny", str(model_dir)])


@model.command("build")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--arch",
    required=True,
    help="tiny, tiny-i2v, bench (CPU pipeline benchmarks) or wan2.1-t2v-1.3b (the published shape, random weights)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="weight seed; the same seed gives identical files")
def model_build(model_dir: Path, arch: str, seed: int) -> None:
    """Write a model directory of a named architecture in diffusers format (random weights, no downloads)."""
    # The architectures live with the models (workers.models.presets), which checks the name.
    command = [sys.executable, "-m", "workers.models", "build", str(model_dir), "--arch", arch, "--seed", str(seed)]
    os.execv(sys.executable, command)


@model.command("lora")
@click.argument("lora_dir", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=4, show_default=True, help="the LoRA's rank")
@click.option("--seed", type=int, default=0, show_default=True, help="weight seed; the same seed gives identical files")
@click.option(
    "--layout", default="diffusers", show_default=True, help="diffusers (PEFT keys) or wan (the original layout)"
)
@click.option(
    "--model", "for_model", default=None, help="the model dir whose DiT it adapts (default: the tiny model's)"
)
def model_lora(lora_dir: Path, rank: int, seed: int, layout: str, for_model: str | None) -> None:
    """Write a tiny LoRA for a Wan DiT with random weights (tests, benchmarks; no downloads)."""
    command = [sys.executable, "-m", "workers.models", "lora", str(lora_dir), "--rank", str(rank), "--seed", str(seed)]
    command += ["--layout", layout, *(["--model", for_model] if for_model else [])]
    os.execv(sys.executable, command)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("stage", type=click.Choice(["encode", "transform", "decode"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(stage: str, args: tuple[str, ...]) -> None:
    """Run one stage worker (keeps its model loaded; serves jobs until stopped)."""
    os.execv(sys.executable, [sys.executable, "-m", "workers", stage, *args])


@click.command()
@click.option(
    "--workers",
    "worker_counts",
    default=None,
    metavar="STAGE=N,...",
    help="workers per stage, e.g. transform=2,decode=2 (default: one each; settings: workers_per_stage)",
)
@farm_command
def up(settings: FarmSettings, worker_counts: str | None) -> None:
    """Start the embedded farm (Valkey, S3 server, workers per stage) in the background."""
    from scheduler.local.embedded import farm_up, read_state

    if worker_counts is not None:
        settings = settings.with_worker_counts(parse_worker_counts(worker_counts))
    farm = farm_up(settings)
    layout = ", ".join(f"{count} {stage}" for stage, count in farm.worker_layout().items())
    click.echo(
        f"reelfarm is up: redis 127.0.0.1 (password in {farm.state_file}), S3 {farm.s3.endpoint_url}, "
        f"workers: {layout}; logs in {farm.home / 'logs'}"
    )
    api_key = (read_state(farm.home) or {}).get("api_key")
    if api_key:
        click.echo(f"HTTP API (OpenAI Videos/Batches): http://{farm.http.host}:{farm.http.port}/v1  API key: {api_key}")


@click.command("serve")
@click.option("--host", default=None, help="address to bind (default: settings http.host, 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default: settings http.port, 8000)")
@farm_command
def serve_command(settings: FarmSettings, host: str | None, port: int | None) -> None:
    """Serve the HTTP front: OpenAI's Videos and Batches APIs, webhooks and the status page at /."""
    from scheduler.http.server import serve

    if not settings.http.api_key_hashes:
        click.echo(
            "reelfarm: no API key configured, so every call will be refused (401); set REELFARM_API_KEY or "
            "http.api_key_hashes (make a key with `reelfarm api-key`)",
            err=True,
        )
    serve(settings, host, port)


@click.command("api-key")
@click.option(
    "--name", default=None, help="Name the key (1-64 of A-Z a-z 0-9 _ -): what it creates is recorded under it."
)
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True, help="With --name.")
def api_key_command(name: str | None, role: str) -> None:
    """Make a new random API key for the HTTP front and print it with the settings entry to configure."""
    import json
    import secrets

    from scheduler.core.settings import ApiKeyEntry, api_key_hash

    key = "rf-" + secrets.token_urlsafe(32)
    click.echo(f"key:    {key}")
    if name is None:
        click.echo(f"config: http: {{api_key_hashes: [{api_key_hash(key)}]}}   (or pass the key as REELFARM_API_KEY)")
        return
    try:
        entry = ApiKeyEntry(name=name, hash=api_key_hash(key), role=role)  # type: ignore[arg-type]
    except ValueError:
        raise click.BadParameter("use 1-64 characters from A-Z a-z 0-9 _ -", param_hint="--name") from None
    # JSON is YAML: the entry pastes into configs/farm.yaml's http.api_keys list as it is.
    click.echo(f"config: http: {{api_keys: [{json.dumps(entry.model_dump(exclude_none=True))}]}}")


@click.command()
@farm_command
def down(settings: FarmSettings) -> None:
    """Stop the embedded farm started by `reelfarm up`."""
    from scheduler.local.embedded import farm_down

    stopped = farm_down(settings.home)
    click.echo("stopped: " + ", ".join(stopped) if stopped else "no embedded farm is running")


@click.command("info")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def info_command(settings: FarmSettings, as_json: bool) -> None:
    """Queue depths per stage and priority; live workers with model, device, heartbeat, state and job; refused calls."""
    from scheduler.core import demand, keys, stage_calls
    from scheduler.ops import job_admin

    conn = connect_redis(settings)
    queue_rows = job_admin.queue_rows(conn, list(settings.model_dirs()))
    workers = job_admin.worker_rows(conn)
    inflight = int(conn.zcard(keys.inflight_key()))  # type: ignore[arg-type]
    delayed = int(conn.zcard(keys.delayed_key()))  # type: ignore[arg-type]
    refused_counts = stage_calls.refusal_counts(conn)
    refused = stage_calls.recent_refusals(conn, limit=10)
    if as_json:
        queues_json: dict[str, dict[str, dict[str, int]]] = {}
        for row in queue_rows:
            queues_json.setdefault(row.stage, {})[row.model] = row.depths
        body = {
            "queues": queues_json,
            "workers": [asdict(w) for w in workers],
            "inflight": inflight,
            "delayed_retries": delayed,
            # What the autoscaler sees (KEDA reads these keys' lengths); recounted by every maintenance pass.
            "demand": {stage.value: count for stage, count in demand.read_demand(conn).items()},
            "refused_calls": {"counts": refused_counts, "recent": [asdict(r) for r in refused]},
        }
        click.echo(json.dumps(body, indent=2))
        return
    several = len(settings.model_dirs()) > 1
    rows = [["QUEUE", *(["MODEL"] if several else []), *[p.upper() for p in keys.PRIORITIES], "TOTAL"]]
    for row in queue_rows:
        label = [row.stage, *([row.model] if several else [])]
        rows.append([*label, *[str(row.depths[p]) for p in keys.PRIORITIES], str(row.total)])
    click.echo(table(rows))
    click.echo(f"in flight: {inflight} stage executions; waiting out a retry backoff: {delayed}")
    by_stage = ", ".join(f"{stage.value} {count}" for stage, count in demand.read_demand(conn).items())
    click.echo(f"demand (autoscaling keys {keys.demand_key(Stage.ENCODE).rsplit(':', 1)[0]}:STAGE): {by_stage}")
    click.echo("")
    if refused_counts:
        by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(refused_counts.items()))
        click.echo(f"REFUSED rq jobs (not run; someone who can write to Redis queued them): {by_reason}")
        rows = [["WHEN", "QUEUE", "RQ JOB", "FUNCTION", "REASON", "DETAIL"]]
        for r in refused:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at))
            rows.append([when, r.queue, r.rq_job_id, r.function, r.reason, r.detail])
        click.echo(table(rows))
        click.echo("")
    if not workers:
        click.echo("no live workers (start them with `reelfarm worker STAGE` or `reelfarm up`)")
        return
    header = ["WORKER", "STAGE", "STATE", "JOB", "MODEL", "DEVICE", "HEARTBEAT", "DONE", "FREE SLOTS"]
    rows = [[*header, "DECODE RANKS", "RECEIVE"]]
    for w in workers:
        rows.append(
            [
                w.worker_id,
                w.stage,
                w.state,
                w.current_job or "-",
                w.model,
                w.device,
                f"{w.heartbeat_age:.1f}s ago",
                str(w.jobs_done),
                w.free_slots,
                w.decode_group,
                w.receive,
            ]
        )
    click.echo(table(rows))


@click.command("metrics")
@click.option("--port", type=int, default=9464, show_default=True)
@click.option("--addr", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0 to expose)")
@farm_command
def metrics_command(settings: FarmSettings, port: int, addr: str) -> None:
    """Serve the farm's Prometheus metrics (queues, jobs, workers), read from Redis at each scrape."""
    from scheduler.ops.metrics import serve_farm_metrics

    conn = connect_redis(settings)
    bound = serve_farm_metrics(conn, port, addr, models=list(settings.model_dirs()))
    click.echo(
        f"serving farm metrics at http://{addr}:{bound}/metrics (started {datetime.now(UTC):%H:%M:%SZ})", err=True
    )
    stop = stop_on_signals()
    stop.wait()
