"""The vocabulary of LoRAs as farm assets: a configured source, a job's choice, the bounds on both.

Settings name each adapter (``loras: {NAME: SOURCE}`` or ``{NAME: {source, sha256,
expert}}``); a job picks some by name with a scale (``loras: [{"name", "scale"}]``
in its spec). Nothing here touches Redis or storage (`scheduler.core.lora_catalog`
does), so the spec and settings modules can use it without import cycles.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Names become PEFT adapter names and object keys: plain segments only.
LORA_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# A scale far outside what any LoRA is trained for only blows the frames up: refuse it at the door.
MAX_LORA_SCALE = 4.0
DEFAULT_MAX_LORAS = 4
# A LoRA file's safetensors header must parse within this (the format's own cap).
MAX_HEADER_BYTES = 100 * 2**20
# Which Wan2.2 expert an adapter is trained for; "both" (or none) applies to every DiT of the model.
LoraExpert = Literal["high", "low", "both"]


class LoraSource(BaseModel):
    """One adapter the farm offers: where its file is, and what its bytes must hash to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A local path (on every transform host) or s3://bucket/key.safetensors.
    source: str = Field(min_length=1, max_length=2048)
    # SHA-256 of the file; workers refuse bytes that differ. None: computed at first load and recorded.
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    # Wan2.2 (two experts): the expert it adapts. A one-expert model refuses "high" and "low" at submit.
    expert: LoraExpert | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        # ``name: path`` is the common case; the mapping form adds a checksum or an expert.
        return {"source": value} if isinstance(value, str) else value


class LoraChoice(BaseModel):
    """One adapter a job asks for, by its farm name, at a scale (1.0 = as trained)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=LORA_NAME_PATTERN)
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)


def check_lora_names(cls: type, value: dict[str, LoraSource]) -> dict[str, LoraSource]:
    """Settings validator: every configured LoRA name is one a spec can name."""
    bad = [name for name in value if not re.match(LORA_NAME_PATTERN, name)]
    if bad:
        raise ValueError(f"LoRA name {bad[0]!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return value


class NotSafetensors(ValueError):
    """Bytes that are not a safetensors file; the message says why, in a few words."""


def safetensors_header(data: bytes | memoryview) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names -> dtype/shape/offsets, ``__metadata__``), torch-free."""
    if len(data) < 8:
        raise NotSafetensors("too short")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise NotSafetensors("bad header length")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except ValueError:
        raise NotSafetensors("its header is not JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("its header is not a mapping")
    return header
