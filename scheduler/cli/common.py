"""What every ``reelfarm`` command shares: the ``--config`` option, one-line errors, spec options, table output.

Every error a user can fix is a ``scheduler.core.errors.UserError``; ``farm_command`` turns any of them
into one ``reelfarm: ...`` line on stderr and the error's exit code, so no command handles them itself.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from scheduler.core.errors import UserError
from scheduler.core.settings import load_settings

DEFAULT_OUTPUTS = Path("outputs")


SPEC_OPTIONS: list[tuple[str, Any, str]] = [
    ("negative_prompt", str, "what to steer away from"),
    ("width", int, "multiple of 16"),
    ("height", int, "multiple of 16"),
    ("frames", int, "4k+1, e.g. 17, 33, 81"),
    ("steps", int, "denoising steps"),
    ("guidance_scale", float, "classifier-free guidance (<= 1 turns CFG off)"),
    ("guidance_scale_2", float, "Wan2.2 two-expert models: the low-noise expert's guidance (default: guidance-scale)"),
    ("seed", int, "noise seed (same seed, same video)"),
    ("flow_shift", float, "override the scheduler's flow shift"),
    ("fps", int, "frames per second of the MP4"),
    ("priority", click.Choice(["high", "default", "low"]), "queue priority"),
    ("output_prefix", str, "extra key prefix, e.g. nightly/2026-11-23"),
    ("image", str, "image-to-video: conditioning image (path, s3://bucket/key or http(s) URL)"),
    ("resize", click.Choice(["resize", "center_crop"]), "how the image is fitted to width x height"),
    ("model", str, "which of the farm's models renders it (default: one that does the task)"),
]


def fail(message: str, code: int = 2) -> None:
    click.echo(f"reelfarm: {message}", err=True)
    sys.exit(code)


def farm_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--config`` (the farm's settings are passed as ``settings``) and turns every ``UserError``
    into one ``reelfarm: ...`` line and its exit code."""

    @click.option("--config", type=click.Path(path_type=Path), envvar="REELFARM_CONFIG", help="farm settings YAML")
    @functools.wraps(func)
    def wrapper(*args: Any, config: Path | None, **kwargs: Any) -> Any:
        try:
            return func(*args, settings=load_settings(config), **kwargs)
        except UserError as exc:
            # KeyError-style reprs quote their whole message; the user wants the words. Only a message
            # wrapped in one pair of quotes is unwrapped: "should be 'h264' or 'lossless'" keeps its last quote.
            message = str(exc)
            if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
                message = message[1:-1]
            fail(message, code=exc.exit_code)

    return wrapper


def spec_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name, kind, help_text in reversed(SPEC_OPTIONS):
        func = click.option("--" + name.replace("_", "-"), name, type=kind, default=None, help=help_text)(func)
    func = click.option(
        "--codec", type=click.Choice(["h264", "lossless"]), default=None, help="h264, or lossless RGB for masters"
    )(func)
    func = click.option("--crf", type=int, default=None, help="h264 quality (0-51, lower is better)")(func)
    func = click.option(
        "--cache",
        default=None,
        metavar="METHOD[:THRESHOLD]",
        help="step caching for this job, e.g. first_block:0.05 (off by default; skips DiT calls, moves the frames)",
    )(func)
    func = click.option(
        "--lora",
        "loras",
        multiple=True,
        metavar="NAME[:SCALE]",
        help="a LoRA of the farm for this job (repeatable), e.g. --lora style:0.8 (`reelfarm lora ls` lists them)",
    )(func)
    return func


def spec_from_options(prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"prompt": prompt}
    raw.update({name: options.pop(name) for name, _, _ in SPEC_OPTIONS if options.get(name) is not None})
    codec = {
        k: v for k, v in (("name", options.pop("codec", None)), ("crf", options.pop("crf", None))) if v is not None
    }
    if codec:
        raw["codec"] = codec
    cache = options.pop("cache", None)
    if cache is not None:
        # The spec checks both parts (unknown method, threshold out of range or not a number), in one line.
        method, has_threshold, threshold = cache.partition(":")
        raw["cache"] = {"method": method, **({"threshold": threshold} if has_threshold else {})}
    loras = options.pop("loras", None) or ()
    if loras:
        # The spec checks the parts (name pattern, scale a number within bounds) and says which, in one line.
        pairs = [lora.partition(":") for lora in loras]
        raw["loras"] = [{"name": name, **({"scale": scale} if has_scale else {})} for name, has_scale, scale in pairs]
    return raw


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
