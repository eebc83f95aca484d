"""``reelfarm lora add|ls``: LoRA adapters as farm assets (`scheduler.core.lora_catalog`)."""

from __future__ import annotations

import json
from typing import get_args

import click

from scheduler.cli.common import farm_command, table
from scheduler.core.connection import connect_redis
from scheduler.core.loras import LoraExpert
from scheduler.core.settings import FarmSettings


@click.group("lora")
def lora() -> None:
    """LoRA adapters jobs may name (spec field loras)."""


@lora.command("add")
@click.argument("name")
@click.argument("source")
@click.option(
    "--expert",
    type=click.Choice(get_args(LoraExpert)),
    default=None,
    help="Wan2.2 models: the expert it adapts (high or low noise; both by default)",
)
@farm_command
def lora_add(settings: FarmSettings, name: str, source: str, expert: LoraExpert | None) -> None:
    """Copy the LoRA file SOURCE (a path or s3://bucket/key) into the farm's bucket and register it as NAME."""
    from scheduler.core.lora_catalog import register_lora

    entry = register_lora(connect_redis(settings), settings, name, source, expert=expert)
    click.echo(f"{entry.name}: {entry.source} ({entry.size} bytes, sha256 {entry.sha256})")


@lora.command("ls")
@click.option("--json", "as_json", is_flag=True)
@farm_command
def lora_ls(settings: FarmSettings, as_json: bool) -> None:
    """Every LoRA this farm offers: from the settings and registered with `reelfarm lora add`."""
    from scheduler.core.lora_catalog import lora_catalog

    catalog = lora_catalog(settings, connect_redis(settings))
    if as_json:
        entries = [{"name": e.name, **json.loads(e.to_json()), "registered": e.registered} for e in catalog.values()]
        click.echo(json.dumps(entries, indent=2))
        return
    if not catalog:
        click.echo("no LoRAs: add one with `reelfarm lora add NAME FILE` or under loras in the settings")
        return
    rows = [["NAME", "FROM", "EXPERT", "BYTES", "SHA256", "SOURCE"]]
    for e in catalog.values():
        where = "registry" if e.registered else "settings"
        size = "" if e.size is None else str(e.size)
        rows.append([e.name, where, e.expert or "", size, (e.sha256 or "(at first load)")[:16], e.source])
    click.echo(table(rows))
