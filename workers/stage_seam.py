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
    import torch

    from scheduler.core.keys import Hop
    from scheduler.core.spec import JobSpec
    from workers.runtime import StageRuntime


class MalformedJob(ValueError):
    """A job record no retry can fix (e.g. written into Redis by something other than the farm)."""


@dataclass(frozen=True)
class StageJob:
    """One job as a stage computes it: the worker it runs in, its id, its spec, the attempt running, the hop of
    its route it runs and, for a transform hop covering part of the loop, the steps ``[k0, k1)`` it covers."""

    rt: StageRuntime
    job_id: str
    spec: JobSpec
    attempt: int = 1
    hop: Hop | None = None  # None: the worker's stage, unsplit
    steps: tuple[int, int] | None = None

    @property
    def this_hop(self) -> Hop:
        return self.hop if self.hop is not None else self.rt.stage


# A producing stage's tensors for the next stage, or the last stage's result record.
StageOutputs = dict[str, Any]


class StageCompute(Protocol):
    """One model's share of one stage, loaded once per worker."""

    def outputs_for(self, job: StageJob, inputs: Mapping[str, torch.Tensor]) -> StageOutputs:
        """What this stage makes of ``job`` given the upstream stage's ``inputs`` (empty for the first stage)."""
        ...
