"""The transform stage's speed options, taken from diffusers rather than written again.

- attention backend: ``set_attention_backend`` on the DiT (once, at load);
- compilation: ``compile_repeated_blocks`` -- ``torch.compile`` of each ``WanTransformerBlock``, set up
  once at load and compiled lazily by dynamo on the first call of each latent shape (never per job);
- step caching: diffusers' cache hooks (``enable_cache`` / ``disable_cache``), applied around one job
  and removed after it, because the transformer stays resident and serves the next job uncached;
- counting DiT calls and the ones a cache skipped, for the job's stage result: per thread, because the
  jobs of a batch (`workers.stages.step_batcher`) denoise in threads of their own and share calls.

One-pass guidance lives in the denoising loop itself (`workers.stages.transform`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from scheduler.core.spec import CacheOptions

# diffusers' name for FirstBlockCache's hook on the first block, whose state says whether a call skipped the rest.
_FBC_LEADER_HOOK = "fbc_leader_block_hook"


class SpeedOptionError(ValueError):
    """A transform setting this worker cannot honour; the message says which and what to use instead."""


def prepare_transformer(
    transformer: WanTransformer3DModel, *, compile_blocks: bool, attention_backend: str | None
) -> None:
    """Apply the worker-wide options once, before the first job."""
    if attention_backend is not None:
        set_attention_backend(transformer, attention_backend)
    if compile_blocks:
        # Not fullgraph: a job's cache hooks decide per call whether to run the rest of the blocks,
        # which dynamo can only do with a graph break.
        transformer.compile_repeated_blocks(fullgraph=False)


def set_attention_backend(transformer: WanTransformer3DModel, name: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [backend.value for backend in AttentionBackendName]
    if name not in known:
        raise SpeedOptionError(
            f"transform.attention_backend {name!r} is not a diffusers attention backend; use one of {', '.join(known)}"
        )
    try:
        transformer.set_attention_backend(name)
    except (ImportError, RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpeedOptionError(
            f"transform.attention_backend {name!r} cannot run here ({first_line}); "
            "leave it unset for PyTorch SDPA or install what it needs"
        ) from None


@dataclass
class DitCalls:
    """DiT forward calls of one job, and how many of them a step cache cut short after the first block."""

    calls: int = 0
    full: int = 0
    # Per cached DiT (by id): whether the call that just ended on it ran every block (a cache may have
    # skipped the rest). Empty without a cache: every call runs every block.
    checks: dict[int, Callable[[], bool]] = field(default_factory=dict, repr=False)

    def ran_every_block(self, dit: torch.nn.Module | None) -> bool:
        if not self.checks:
            return True
        check = self.checks.get(id(dit)) if dit is not None else None
        return (check or next(iter(self.checks.values())))()

    @property
    def skipped(self) -> int:
        return self.calls - self.full

    def as_record(self) -> dict[str, int]:
        return {"dit_calls": self.calls, "dit_calls_skipped": self.skipped}


def cache_config(options: CacheOptions) -> Any:
    """The diffusers hook config for a job's ``cache`` (the spec allows only methods listed here)."""
    if options.method == "first_block":
        return FirstBlockCacheConfig(threshold=options.threshold)
    raise SpeedOptionError(f"cache method {options.method!r} has no diffusers hook here; use first_block")


@contextlib.contextmanager
def step_cache(
    transformer: WanTransformer3DModel | Sequence[WanTransformer3DModel], options: CacheOptions | None
) -> Iterator[DitCalls]:
    """Count the DiT calls of the block inside, with ``options``' cache hooks on for it (none when None).

    A two-expert worker passes both DiTs: each gets its own hooks and so its own cache state, as diffusers'
    pipelines keep one per expert; a call counts as full when the DiT it ran on ran every block.
    """
    dits = [transformer] if isinstance(transformer, torch.nn.Module) else list(transformer)
    counted = DitCalls()
    if options is not None:
        for dit in dits:
            dit.enable_cache(cache_config(options))
            counted.checks[id(dit)] = _computed_every_block(dit)
    # The denoising loop reports its calls (count_dit_calls) in this thread: a forward hook would
    # count a batch-mate's calls too, and compiled blocks run no Python hooks.
    token = _COUNTED.set(counted)
    try:
        yield counted
    finally:
        _COUNTED.reset(token)
        if options is not None:
            for dit in dits:
                dit.disable_cache()


_COUNTED: contextvars.ContextVar[DitCalls | None] = contextvars.ContextVar("reelfarm_dit_calls", default=None)


def count_dit_calls(calls: int, dit: torch.nn.Module | None = None) -> None:
    """The job in this thread's ``step_cache`` block took part in ``calls`` more DiT calls (no-op outside one).

    Called right after the call, inside its cache context, so a step cache's state says whether it ran in
    full (``dit``: the DiT that ran it, on a worker holding two experts).
    """
    counted = _COUNTED.get()
    if counted is not None:
        counted.calls += calls
        counted.full += calls * int(counted.ran_every_block(dit))


def _computed_every_block(transformer: WanTransformer3DModel) -> Callable[[], bool]:
    """Whether the DiT call that just ended ran past the first block, read from the FirstBlockCache's state.

    Asked from the transformer's forward hook, so still inside the call's cache context (cond / uncond).
    """
    from diffusers.hooks import HookRegistry

    leader = HookRegistry.check_if_exists_or_initialize(transformer.blocks[0]).get_hook(_FBC_LEADER_HOOK)
    if leader is None:
        raise RuntimeError("FirstBlockCache is on but its leader hook is missing: diffusers changed its hook names")
    state_manager = leader.state_manager  # type: ignore[attr-defined]
    return lambda: bool(state_manager.get_state().should_compute)


def cache_context(transformer: WanTransformer3DModel, name: str) -> contextlib.AbstractContextManager[None]:
    """diffusers' named cache state for one kind of call (cond / uncond / both); nothing when no cache is on."""
    if transformer.is_cache_enabled:
        context: contextlib.AbstractContextManager[None] = transformer.cache_context(name)
        return context
    return contextlib.nullcontext()
