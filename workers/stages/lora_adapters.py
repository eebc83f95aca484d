"""LoRA adapters on a resident Wan DiT: loaded once, kept in an LRU, switched per job, never leaking into the next.

diffusers does the work (the one library that already knows Wan's LoRA layouts):
``WanLoraLoaderMixin.lora_state_dict`` converts the original Wan / kohya / musubi /
LightX2V layouts to PEFT keys, ``load_lora_into_transformer`` injects the layers,
and the DiT's own ``set_adapters`` / ``disable_lora`` / ``delete_adapters``
switch them -- the same calls ``WanPipeline.load_lora_weights`` and
``set_adapters`` make, so a job's frames equal that pipeline's with the same
adapters and scales.

Lifecycle: 1. ``ensure_loaded`` (per job, for each adapter it names): a cache hit
costs nothing; a miss parses the file's bytes (safetensors only: nothing in a
LoRA file runs code), loads it as a PEFT adapter and, past ``capacity``,
deletes the least recently used one 2. ``activated(choices)`` around the
job's denoising: on entry the job's adapters at its scales, on exit LoRA
layers disabled, so the base model computes bit for bit as if none were ever
loaded. Jobs of one batch share the DiT and must ask for the same adapters and
scales (the worker's batch key says so); the activation is counted, and the
last of them to leave disables it. No farm imports: the caller fetches bytes.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scheduler.core.loras import NotSafetensors, safetensors_header

# diffusers keeps a saved adapter's PEFT config (rank, alpha, targets) under this header metadata key.
LORA_METADATA_KEY = "lora_adapter_metadata"


class LoraLoadError(ValueError):
    """A LoRA that cannot be applied to this DiT; the message is one line naming it and what to do."""


@dataclass(frozen=True)
class AdapterChoice:
    """One adapter a job asks for: its cache identity (name + a hex digest of its bytes or source) and scale."""

    name: str
    identity: str
    scale: float

    @property
    def adapter_name(self) -> str:
        # PEFT keys its layers by adapter name; the digest in it keeps a re-registered file apart.
        return f"{self.name}_{self.identity[:12]}"


def lora_state_dict_from_bytes(data: bytes, label: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors and diffusers adapter metadata of a safetensors LoRA file held in memory."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        header = safetensors_header(data)
        tensors = load(data)
    except NotSafetensors as exc:
        raise LoraLoadError(f"LoRA {label}: not a safetensors file ({exc}); register a .safetensors LoRA") from None
    except (ValueError, SafetensorError) as exc:
        raise LoraLoadError(f"LoRA {label}: not a readable safetensors file ({_short(exc)[:120]})") from None
    raw_metadata = (header.get("__metadata__") or {}).get(LORA_METADATA_KEY)
    try:
        metadata = json.loads(raw_metadata) if raw_metadata else None
    except ValueError:
        raise LoraLoadError(f"LoRA {label}: its {LORA_METADATA_KEY} header is not JSON") from None
    return tensors, metadata


class LoraAdapters:
    """The adapters loaded into one DiT, least recently used first, and which set is active now."""

    def __init__(self, transformer: Any, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a LoRA cache holds at least one adapter (got {capacity})")
        # A diffusers model (WanTransformer3DModel): its PEFT methods are not in torch.nn.Module's type.
        self.transformer = transformer
        self.capacity = capacity
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._active: tuple[tuple[str, float], ...] | None = None
        self._active_users = 0
        # What the worker counts for bench.lora and the job record: loads (cache misses) and evictions.
        self.loads = 0
        self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        """Adapter names in the cache, least recently used first."""
        return list(self._loaded)

    def has(self, choice: AdapterChoice) -> bool:
        return choice.adapter_name in self._loaded

    def ensure_loaded(self, choice: AdapterChoice, data: bytes | None) -> bool:
        """Load ``choice`` from ``data`` unless cached (then ``data`` may be None); True when it was loaded now."""
        with self._lock:
            name = choice.adapter_name
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return False
            if data is None:
                raise LoraLoadError(f"LoRA {choice.name}: not loaded on this worker and no bytes given")
            if self._active_users:
                raise LoraLoadError(f"LoRA {choice.name}: cannot load while another job's adapters are active")
            self._load(choice, data)
            self._loaded[name] = None
            self.loads += 1
            while len(self._loaded) > self.capacity:
                evicted, _ = self._loaded.popitem(last=False)
                self.transformer.delete_adapters(evicted)
                self.evictions += 1
            # A freshly injected adapter is active in PEFT: the base stays the default until a job asks.
            self.transformer.disable_lora()
            return True

    def _load(self, choice: AdapterChoice, data: bytes) -> None:
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        tensors, metadata = lora_state_dict_from_bytes(data, choice.name)
        # What WanPipeline.load_lora_weights does before injecting, minus the pipeline (no offloading here).
        try:
            state_dict = WanLoraLoaderMixin.lora_state_dict(tensors)
            state_dict = WanLoraLoaderMixin._maybe_expand_t2v_lora_for_i2v(self.transformer, state_dict)
        except (KeyError, ValueError, IndexError, RuntimeError) as exc:
            raise LoraLoadError(f"LoRA {choice.name}: not a Wan LoRA layout diffusers reads ({_short(exc)})") from None
        if not state_dict or not all("lora" in key for key in state_dict):
            raise LoraLoadError(f"LoRA {choice.name}: has tensors that are not LoRA weights; is it a Wan LoRA?")
        if choice.adapter_name in (getattr(self.transformer, "peft_config", None) or {}):
            raise LoraLoadError(f"LoRA {choice.name}: this DiT already has an adapter named {choice.adapter_name}")
        try:
            WanLoraLoaderMixin.load_lora_into_transformer(
                state_dict, transformer=self.transformer, adapter_name=choice.adapter_name, metadata=metadata
            )
        except Exception as exc:  # noqa: BLE001 - any failure to inject is this LoRA's fault, reported in one line
            self._forget_partial(choice.adapter_name)
            raise LoraLoadError(
                f"LoRA {choice.name}: does not fit this model's DiT ({_short(exc)}); use a LoRA trained for it"
            ) from None

    def _forget_partial(self, adapter_name: str) -> None:
        config = getattr(self.transformer, "peft_config", None) or {}
        if adapter_name in config:
            self.transformer.delete_adapters(adapter_name)

    @contextlib.contextmanager
    def activated(self, choices: Sequence[AdapterChoice]) -> Iterator[None]:
        """The job's adapters at its scales for the duration; then the base model again (LoRA layers off)."""
        if not choices:
            with self._lock:
                if self._active_users:
                    raise LoraLoadError("a job without LoRAs cannot share the DiT with jobs that have some")
            yield
            return
        wanted = tuple((c.adapter_name, c.scale) for c in choices)
        with self._lock:
            if self._active_users and self._active != wanted:
                raise LoraLoadError("jobs sharing the DiT must ask for the same LoRAs and scales")
            missing = [c.name for c in choices if c.adapter_name not in self._loaded]
            if missing:
                raise LoraLoadError(f"LoRA {', '.join(missing)}: not loaded on this worker")
            if not self._active_users:
                self.transformer.enable_lora()
                self.transformer.set_adapters([n for n, _ in wanted], [s for _, s in wanted])
                self._active = wanted
            self._active_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._active_users -= 1
                if not self._active_users:
                    self.transformer.disable_lora()
                    self._active = None


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's load_state_dict lists every mismatch under a generic first line: the first mismatch says more.
    telling = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
    return (telling or type(exc).__name__)[:200]
