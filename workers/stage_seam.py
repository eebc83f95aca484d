"""The seam between a stage job and a model's compute: one typed call, the same for every stage.

`workers.stage_job` pulls a job's inputs, calls ``outputs_for`` on the model's
`StageCompute` and hands on what comes back, without knowing which stage it
runs. The implementations are thin adapters over the stage classes
(`workers.stage_compute`); this module holds only the contract, so the
runtime can name it without importing any model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import redis
    import torch

    from scheduler.core.keys import Hop, Stage
    from scheduler.core.settings import FarmSettings
    from scheduler.core.spec import JobSpec


class MalformedJob(ValueError):
    """A job record no retry can fix (e.g. written into Redis by something other than the farm)."""


class ComputeContext(Protocol):
    """What a stage's compute may use of the worker it runs in (``workers.runtime.StageRuntime`` is one):
    the record (Redis), the settings, the bucket, the one background I/O thread, the preemption flag.
    Declared here, so model code depends on this seam and never on the runtime that loads it."""

    @property
    def stage(self) -> Stage: ...

    @property
    def conn(self) -> redis.Redis: ...

    @property
    def settings(self) -> FarmSettings: ...

    @property
    def s3(self) -> Any: ...

    @property
    def background(self) -> ThreadPoolExecutor: ...

    @property
    def preempt(self) -> threading.Event: ...


@dataclass(frozen=True)
class StageJob:
    """One job as a stage computes it: the worker it runs in, its id, its spec, the attempt running, the hop of
    its route it runs and, for a transform hop covering part of the loop, the steps ``[k0, k1)`` it covers."""

    rt: ComputeContext
    job_id: str
    spec: JobSpec
    attempt: int = 1
    hop: Hop | None = None  # None: the worker's stage, unsplit
    steps: tuple[int, int] | None = None
    expert: str | None = None  # a Wan2.2 expert's hop: "high" or "low" (its steps follow from the boundary)

    @property
    def this_hop(self) -> Hop:
        return self.hop if self.hop is not None else self.rt.stage


# A producing stage's tensors for the next stage, or the last stage's result record.
StageOutputs = dict[str, Any]


class StageCompute(Protocol):
    """One model's share of one stage, loaded once per worker. Implementations subclass it to inherit the
    optional methods' defaults (nothing to report, nothing to close)."""

    def outputs_for(self, job: StageJob, inputs: Mapping[str, torch.Tensor]) -> StageOutputs:
        """What this stage makes of ``job`` given the upstream stage's ``inputs`` (empty for the first stage)."""
        ...

    def record_fields(self) -> dict[str, str]:
        """What the worker record shows of this compute (``reelfarm info``: a rank group's size and health)."""
        return {}

    def close(self) -> None:
        """Release what the compute started besides its model (a rank group's follower processes)."""
        return None
