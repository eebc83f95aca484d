"""Commands about the farm's tenants and its own least privilege: ``usage`` (per API key and day) and
``redis-acl`` (the Redis ACL file of the farm's roles)."""

from __future__ import annotations

import json
from pathlib import Path

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


@click.command("redis-acl")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="the ACL file to write (Valkey/Redis aclfile)"
)
@click.option(
    "--url", default="redis://127.0.0.1:6379/0", show_default=True, help="the server the printed role URLs point at"
)
def redis_acl_command(out: Path, url: str) -> None:
    """Write a Redis ACL file with one user per farm role (worker, http, scheduler, keda, admin) and print
    each role's redis_url once (the file holds only password digests)."""
    from scheduler.local.processes import write_private
    from scheduler.ops.redis_acl import ROLES, new_passwords, render_acl, role_url

    passwords = new_passwords()
    write_private(out, render_acl(passwords))
    click.echo(f"wrote {out}: load it with `aclfile {out}` in valkey.conf (or redis.conf), then ACL LOAD")
    for role in ROLES:
        click.echo(f"{role.name:10} {role_url(url, role.name, passwords[role.name])}   # {role.what}")
