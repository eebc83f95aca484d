"""Which LoRAs a farm offers, where their bytes are, and the checks at submit: the catalog of adapters.

Two sources, one catalog: the settings' ``loras`` (a path on every transform
host or an s3:// object, optionally with its SHA-256) and the registry
``reelfarm lora add`` writes -- the file copied into the farm's bucket and its
checksum recorded in one Redis hash (``keys.lora_registry_key``), so every
worker fetches the same bytes and refuses any others. A name is in one source
only: ``lora add`` refuses a name the settings already give.

Submission asks `check_job_loras` before anything is written: unknown names and
an expert-only (Wan2.2) adapter on a one-expert model are refused in one line
naming the field. Workers resolve the same catalog per job (`workers.lora_assets`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scheduler.core import keys
from scheduler.core.loras import LORA_NAME_PATTERN, LoraExpert, LoraSource, NotSafetensors, safetensors_header
from scheduler.core.model_dirs import model_has_two_experts
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError

# The largest adapter `lora add` copies: rank-128 LoRAs of a 14B DiT are about 1.2 GB.
MAX_LORA_BYTES = 4 * 2**30
LORA_KEY_DIR = "loras"


class LoraError(SpecError):
    """A LoRA that cannot be registered or named; the message is one line saying what to change."""


@dataclass(frozen=True)
class LoraEntry:
    """One adapter of the catalog: its name, its bytes' location and checksum, the Wan2.2 expert it is for."""

    name: str
    source: str
    sha256: str | None
    expert: LoraExpert | None = None
    size: int | None = None
    registered: bool = False  # by `reelfarm lora add` (in the bucket) rather than in the settings

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k not in ("name", "registered")}, sort_keys=True)


def lora_catalog(settings: FarmSettings, conn: Any | None = None) -> dict[str, LoraEntry]:
    """Every LoRA jobs may name: the settings' first, then the registered ones (``conn`` None: settings only)."""
    catalog = {name: LoraEntry(name, s.source, s.sha256, s.expert) for name, s in settings.loras.items()}
    if conn is None:
        return catalog
    for raw_name, raw in conn.hgetall(keys.lora_registry_key()).items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        if name in catalog:
            continue  # the settings win; `lora add` refuses such a name, so only a hand-written entry gets here
        try:
            fields = json.loads(raw)
            catalog[name] = LoraEntry(
                name, str(fields["source"]), fields.get("sha256"), fields.get("expert"), fields.get("size"), True
            )
        except (ValueError, KeyError, TypeError):
            continue  # not written by the farm: never offered
    return catalog


def check_job_loras(spec: JobSpec, catalog: dict[str, LoraEntry], model_dir: Path | None) -> None:
    """Refuse (one line, naming the field) a spec whose LoRAs this farm does not offer for its model."""
    for index, choice in enumerate(spec.loras):
        entry = catalog.get(choice.name)
        if entry is None:
            offered = ", ".join(sorted(catalog)) or "none"
            raise LoraError(
                f"invalid job spec: loras.{index}.name: {choice.name!r} is not a LoRA of this farm "
                f"(it has: {offered}; add one with `reelfarm lora add NAME FILE`)"
            )
        if entry.expert in ("high", "low") and (model_dir is None or not model_has_two_experts(model_dir)):
            raise LoraError(
                f"invalid job spec: loras.{index}.name: {choice.name!r} adapts the {entry.expert}-noise expert of a "
                f"Wan2.2 model, and model {spec.model!r} has one DiT; pick a LoRA for this model"
            )


def lora_file_keys(data: bytes | memoryview) -> list[str]:
    """The tensor names of a safetensors file from its header alone (torch-free); LoraError if it is none."""
    try:
        header = safetensors_header(data)
    except NotSafetensors as exc:
        raise LoraError(f"not a safetensors file ({exc}); give a .safetensors LoRA") from None
    names = [name for name in header if name != "__metadata__"]
    if not any("lora" in name for name in names):
        raise LoraError("has no LoRA weights (no tensor name contains 'lora'); is it a LoRA file?")
    return names


def read_lora_bytes(
    settings: FarmSettings, source: str, client: Any | None = None, max_bytes: int = MAX_LORA_BYTES
) -> bytes:
    """The bytes at a LoRA source: a local path, or s3://bucket/key through the farm's S3 settings."""
    if source.startswith("s3://"):
        from scheduler.core.object_store import get_bytes

        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise LoraError(f"{source}: write an object as s3://bucket/key.safetensors")
        return get_bytes(client if client is not None else settings.s3.client(), bucket, key, max_bytes=max_bytes)
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise LoraError(f"{source}: {size} bytes is over the {max_bytes} a LoRA may have")
        return path.read_bytes()
    except OSError as exc:
        raise LoraError(f"{source}: cannot read it ({exc.strerror}); give a readable .safetensors file") from None


def lora_object_key(settings: FarmSettings, name: str, sha256: str) -> str:
    """Where `lora add` puts an adapter in the farm's bucket: by name and checksum, never overwritten in place."""
    prefix = settings.s3.key_prefix.strip("/")
    return "/".join(p for p in (prefix, LORA_KEY_DIR, keys.check_id(name, "LoRA name"), f"{sha256}.safetensors") if p)


def register_lora(
    conn: Any,
    settings: FarmSettings,
    name: str,
    source: str,
    *,
    expert: LoraExpert | None = None,
    client: Any | None = None,
) -> LoraEntry:
    """Copy the LoRA at ``source`` into the farm's bucket and register it under ``name`` (checksum recorded).

    Re-adding a name replaces the registration (jobs queued before it keep whatever bytes
    their worker loads next: the checksum travels in the catalog, not the job).
    """
    import re

    from scheduler.core.object_store import put_bytes, s3_uri

    if not re.match(LORA_NAME_PATTERN, name):
        raise LoraError(f"LoRA name {name!r}: use 1-64 of A-Z a-z 0-9 _ -")
    if name in settings.loras:
        raise LoraError(f"LoRA {name!r} is already given in the settings (loras); pick another name or edit it there")
    LoraSource(source=source, expert=expert)  # the same bounds as a settings entry
    client = client if client is not None else settings.s3.client()
    data = read_lora_bytes(settings, source, client)
    try:
        lora_file_keys(data)
    except LoraError as exc:
        raise LoraError(f"{source}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    key = lora_object_key(settings, name, digest)
    put_bytes(
        client, settings.s3.bucket, key, data, "application/octet-stream", retry_seconds=settings.s3.retry_seconds
    )
    entry = LoraEntry(name, s3_uri(settings.s3.bucket, key), digest, expert, len(data), True)
    conn.hset(keys.lora_registry_key(), name, entry.to_json())
    return entry
