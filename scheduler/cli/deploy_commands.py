"""Commands for running the farm elsewhere: ``settings-doc`` (the settings reference) and ``worker-ready``
(the readiness probe of a worker container, see ``deploy/kubernetes``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from scheduler.cli.common import fail
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
