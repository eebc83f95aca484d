"""Commands about the farm's tenants and its own least privilege: ``usage`` (per API key and day) and
``redis-acl`` (the Redis ACL file of the farm's roles)."""

from __future__ import annotations

import json

import click

from scheduler.cli.common import farm_command, table
from scheduler.core.connection import connect_redis
from scheduler.core.settings import FarmSettings


@click.command("usage")
@click.option("--key", "key_name", default=None, help="one API key by name ('(cli)': CLI and cron jobs)")
@click.option("--since", default="7d", show_default=True, help="jobs created in this window: 30m, 24h, 7d, 4w")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def usage_command(settings: FarmSettings, key_name: str | None, since: str, as_json: bool) -> None:
    """Jobs, videos, video-seconds, DiT-seconds and decode-seconds per API key and day, from the job records."""
    from scheduler.ops.usage import parse_since, usage_rows

    rows = usage_rows(connect_redis(settings), parse_since(since), key_name)
    if as_json:
        click.echo(json.dumps([row.as_json() for row in rows], indent=2))
        return
    if not rows:
        click.echo(f"no jobs in the last {since}" + (f" for key {key_name}" if key_name else ""))
        return
    header = ["day", "key", "jobs", "videos", "video s", "DiT s", "decode s"]
    body = [
        [
            r.day,
            r.key,
            str(r.jobs),
            str(r.videos),
            f"{r.video_seconds:.1f}",
            f"{r.dit_seconds:.1f}",
            f"{r.decode_seconds:.1f}",
        ]
        for r in rows
    ]
    click.echo(table([header, *body]))
