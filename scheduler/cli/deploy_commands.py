"""Commands for running the farm elsewhere: ``settings-doc`` (the settings reference) and ``worker-ready``
(the readiness probe of a worker container, see ``deploy/kubernetes``)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from scheduler.cli.common import fail, farm_command
from scheduler.core import worker_registry
from scheduler.core.connection import connect_redis
from scheduler.core.keys import Stage
from scheduler.core.settings import FarmSettings
from scheduler.core.settings_doc import DOC_PATH, render_settings_doc


@click.command("settings-doc")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=DOC_PATH,
    show_default=True,
    help="where to write the reference ('-' for stdout)",
)
@click.option("--check", is_flag=True, help="write nothing; exit 1 if the file at --out is out of date")
def settings_doc(out: Path, check: bool) -> None:
    """Write the settings reference (every setting, default, bound, env var), generated from the settings model."""
    text = render_settings_doc()
    if str(out) == "-":
        sys.stdout.write(text)
        return
    if check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            fail(f"{out} is out of date: run `reelfarm settings-doc --out {out}` and commit it", code=1)
        click.echo(f"{out} is up to date")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    click.echo(f"wrote {out}")


@click.command("worker-ready")
@click.argument("stage", type=click.Choice([stage.value for stage in Stage]))
@farm_command
def worker_ready(settings: FarmSettings, stage: str) -> None:
    """Readiness probe of a worker container: exit 0 when a STAGE worker on this host is registered and
    heartbeating (its record lives only while heartbeats arrive within worker.worker_ttl_seconds)."""
    host = socket.gethostname()
    conn = connect_redis(settings)
    for record in worker_registry.live_workers(conn):
        if record.get("stage") == stage and record.get("host") == host:
            click.echo(f"ready: {record.get('worker_id')} at {record.get('endpoint')}")
            return
    fail(
        f"no live {stage} worker registered from host {host}: it is still loading its model, or cannot reach "
        "Redis (see the worker's log)",
        code=1,
    )
