"""A transform worker's LoRAs: which bytes a job's adapter names mean, fetched once, verified, applied per job.

Per job (``WorkerLoras.for_job``): 1. resolve each name in the farm's catalog
(`scheduler.core.lora_catalog`: settings, then ``reelfarm lora add``'s registry)
2. for an adapter not in the worker's cache, fetch its bytes (a local path or
the bucket) and check their SHA-256 against the catalog's 3. load it into the
DiT (`workers.stages.lora_adapters`, least recently used evicted past
``transform.lora_cache``) 4. activate the job's adapters at its scales for
the denoising loop, and turn them off after it. What ran -- names, scales,
checksums -- goes into the job's ``dit`` record.

A LoRA that cannot be used (unknown by now, wrong checksum, not a Wan LoRA, not
this DiT's shape) fails only its job, in one line (``MalformedJob``: no retry
fixes it); an object store that is down is an ordinary stage error, retried.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from scheduler.core.lora_catalog import LoraEntry, LoraError, lora_catalog, read_lora_bytes
from scheduler.core.spec import JobSpec
from workers.stage_seam import MalformedJob
from workers.stages.lora_adapters import AdapterChoice, LoraAdapters, LoraLoadError

if TYPE_CHECKING:
    from workers.stage_seam import ComputeContext


class WorkerLoras:
    """The adapters of one transform worker's DiT and the checksums of the bytes each was loaded from."""

    def __init__(self, transformer: torch.nn.Module, capacity: int, expert: str | None = None) -> None:
        self.adapters = LoraAdapters(transformer, capacity)
        # A Wan2.2 expert's DiT ("high"/"low"): adapters made for the other expert are not applied to it.
        self.expert = expert
        # adapter name -> SHA-256 of the bytes loaded (for entries whose catalog gives none: computed here).
        self.digests: dict[str, str] = {}

    @contextlib.contextmanager
    def for_job(self, rt: ComputeContext, spec: JobSpec) -> Iterator[list[dict[str, object]]]:
        """The job's adapters active for the duration; yields what the job's record says ran."""
        try:
            choices = self._load_all(rt, spec) if spec.loras else []
            with self.adapters.activated(choices):
                yield [
                    {
                        "name": c.name,
                        "scale": c.scale,
                        "sha256": self.digests.get(c.adapter_name, ""),
                        **({"expert": self.expert} if self.expert is not None else {}),
                    }
                    for c in choices
                ]
        except LoraLoadError as exc:
            raise MalformedJob(str(exc)) from None

    def _load_all(self, rt: ComputeContext, spec: JobSpec) -> list[AdapterChoice]:
        catalog = lora_catalog(rt.settings, rt.conn)
        choices = []
        for choice in spec.loras:
            entry = catalog.get(choice.name)
            if entry is None:
                raise MalformedJob(
                    f"LoRA {choice.name!r} is no longer offered by this farm (removed since submit); "
                    "register it again with `reelfarm lora add` and retry the job"
                )
            if self.expert is not None and entry.expert in ("high", "low") and entry.expert != self.expert:
                continue  # trained for the other expert's DiT
            adapter = AdapterChoice(choice.name, _identity(entry), choice.scale)
            if not self.adapters.has(adapter):
                data = self._fetch_verified(rt, entry)
                self.adapters.ensure_loaded(adapter, data)
                self.digests[adapter.adapter_name] = hashlib.sha256(data).hexdigest()
            else:
                self.adapters.ensure_loaded(adapter, None)  # marks it most recently used
            choices.append(adapter)
        return choices

    def _fetch_verified(self, rt: ComputeContext, entry: LoraEntry) -> bytes:
        try:
            data = read_lora_bytes(rt.settings, entry.source, rt.s3 if entry.source.startswith("s3://") else None)
        except LoraError as exc:
            raise MalformedJob(f"LoRA {entry.name!r}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if entry.sha256 is not None and digest != entry.sha256:
            raise MalformedJob(
                f"LoRA {entry.name!r}: the bytes at {entry.source} hash to {digest[:16]}..., not the registered "
                f"{entry.sha256[:16]}...; register the file again with `reelfarm lora add`"
            )
        return data


def _identity(entry: LoraEntry) -> str:
    """What names an adapter's bytes in the cache: its checksum, or (none configured) a digest of where it is."""
    if entry.sha256 is not None:
        return entry.sha256
    return hashlib.sha256(entry.source.encode()).hexdigest()
