"""Batch files: one JSON job spec per line, every line validated before anything is written anywhere.

Blank lines and lines starting with ``#`` are skipped; an optional first line
``{"batch": {...}}`` holds defaults for every line (and may name the batch with
``"name"``). Defaults layer as: farm ``spec_defaults`` < file header <
``--default key=value`` < the line itself. Bad lines are collected with their
line numbers and one-line reasons. Each valid line gets a deterministic job id,
``b-<batch>-<sha256[:16]>`` of its canonical spec, so running the same file
again finds the same ids. Submission is ``scheduler.ops.batch``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.core import keys
from scheduler.core.errors import UserError
from scheduler.core.model_catalog import ModelChooser
from scheduler.core.settings import FarmSettings, deep_merge
from scheduler.core.spec import JobSpec, SpecError, parse_spec

# Priority only orders the queue; it does not change the video, so it is not part of a job's identity.
_NOT_IDENTITY: set[str] = {"priority"}


class BatchError(UserError, ValueError):
    """A batch that cannot be read or submitted at all; the message is one line saying what to do."""


@dataclass(frozen=True)
class LineError:
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


@dataclass(frozen=True)
class BatchEntry:
    line_no: int
    job_id: str
    spec: JobSpec


@dataclass
class ParsedBatch:
    name: str
    entries: list[BatchEntry]
    errors: list[LineError]
    # (line, first line with the same spec): identical lines render identical videos, so they share a job.
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    lines: int = 0

    @property
    def job_ids(self) -> list[str]:
        return [e.job_id for e in self.entries]


def batch_name_from_path(path: str) -> str:
    """A batch name from a file name: ``prompts/Nightly Run.jsonl`` -> ``Nightly_Run``."""
    stem = Path(path.rstrip("/").rsplit("/", 1)[-1]).name.split(".", 1)[0]
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:64]
    return cleaned or "batch"


def job_id_for(batch_name: str, spec: JobSpec) -> str:
    """The job id of ``spec`` in ``batch_name``: the same spec in the same batch always gets the same id."""
    # pydantic writes fields in declaration order with defaults filled in, so equal specs give equal bytes
    # however the line spelled them (key order, defaults written out or left implicit).
    # A job without LoRAs hashes as it did before specs had them, so re-running an older batch file
    # still finds its jobs.
    exclude = _NOT_IDENTITY if spec.loras else _NOT_IDENTITY | {"loras"}
    digest = hashlib.sha256(spec.model_dump_json(exclude=exclude).encode()).hexdigest()
    return keys.check_id(f"b-{keys.check_batch_name(batch_name)}-{digest[:16]}", "job id")


def parse_default_options(options: Iterable[str]) -> dict[str, Any]:
    """``["width=64", "codec.name=lossless", "prompt=a cat"]`` -> spec defaults.

    Values are JSON when they parse as JSON (numbers, booleans, objects), else plain strings.
    """
    out: dict[str, Any] = {}
    for option in options:
        name, sep, text = option.partition("=")
        if not sep or not name.strip():
            raise BatchError(f"--default {option!r} must look like key=value, e.g. --default width=64")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        path = name.strip().split(".")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BatchError(f"--default {option!r} sets a field inside {part!r}, which is not an object")
        node[path[-1]] = value
    return out


def _check_default_fields(defaults: dict[str, Any], where: str) -> None:
    # An unknown field in the defaults would fail every line with the same message: say it once.
    unknown = sorted(set(defaults) - set(JobSpec.model_fields))
    if unknown:
        raise BatchError(f"{where} has unknown spec field(s) {', '.join(map(repr, unknown))}: check the spelling")


def _numbered_lines(text: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def parse_batch(
    text: str,
    settings: FarmSettings,
    *,
    name: str | None = None,
    source: str = "batch",
    defaults: dict[str, Any] | None = None,
    spec_overrides: dict[str, Any] | None = None,
    conn: Any | None = None,
) -> ParsedBatch:
    """Parse and validate every line of a batch file; nothing is written anywhere.

    ``defaults`` are ``--default`` options (below each line); ``spec_overrides``
    are forced onto every line (cron's priority and output prefix).
    """
    lines = list(_numbered_lines(text))
    header: dict[str, Any] = {}
    if lines:
        first_no, first = lines[0]
        try:
            first_obj = json.loads(first)
        except ValueError:
            first_obj = None
        if isinstance(first_obj, dict) and set(first_obj) == {"batch"}:
            if not isinstance(first_obj["batch"], dict):
                raise BatchError(f'line {first_no}: the batch header must be {{"batch": {{...defaults}}}}')
            header = dict(first_obj["batch"])
            lines = lines[1:]
    header_name = header.pop("name", None)
    batch_name = name or (str(header_name) if header_name else batch_name_from_path(source))
    try:
        keys.check_batch_name(batch_name)
    except ValueError as exc:
        raise BatchError(f"{exc} (choose one with --name)") from None
    _check_default_fields(header, "the batch header")
    _check_default_fields(defaults or {}, "--default")
    layered = deep_merge(deep_merge(dict(settings.spec_defaults), header), defaults or {})

    parsed = ParsedBatch(name=batch_name, entries=[], errors=[], lines=len(lines))
    # With ``conn``, LoRAs registered by `reelfarm lora add` are known too (without: the settings' only).
    models = ModelChooser(settings, conn)
    first_line_of: dict[str, int] = {}
    for line_no, line in lines:
        try:
            raw = json.loads(line)
        except ValueError as exc:
            parsed.errors.append(LineError(line_no, f"not valid JSON ({_json_reason(exc)})"))
            continue
        if not isinstance(raw, dict):
            parsed.errors.append(LineError(line_no, f"must be a JSON object (a job spec), not {type(raw).__name__}"))
            continue
        if spec_overrides:
            raw = {**raw, **spec_overrides}
        try:
            spec = models.resolve(parse_spec(raw, settings.limits, layered), named="model" in raw or "model" in layered)
        except SpecError as exc:
            parsed.errors.append(LineError(line_no, str(exc).removeprefix("invalid job spec: ")))
            continue
        job_id = job_id_for(batch_name, spec)
        if job_id in first_line_of:
            parsed.duplicates.append((line_no, first_line_of[job_id]))
            continue
        first_line_of[job_id] = line_no
        parsed.entries.append(BatchEntry(line_no, job_id, spec))
    return parsed


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return str(exc).splitlines()[0]


def specs_to_text(specs: list[dict[str, Any]]) -> str:
    """Inline specs (cron.yaml) as batch-file text, so they take the same validation path as a file."""
    return "\n".join(json.dumps(spec) for spec in specs)


def read_source(settings: FarmSettings, source: str) -> str:
    """The text of a batch file at a local path or an ``s3://bucket/key`` URI."""
    if source.startswith("s3://"):
        from scheduler.core.object_store import ObjectStoreError, get_bytes

        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise BatchError(f"{source!r} is not an s3://bucket/key URI")
        try:
            data = get_bytes(settings.s3.client(), bucket, key)
        except ObjectStoreError as exc:
            raise BatchError(f"cannot read batch file {source}: {exc}") from None
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BatchError(f"cannot read batch file {source}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchError(f"batch file {source} is not UTF-8 text (expected JSON lines)") from None
