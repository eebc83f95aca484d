"""Per-model options of a farm (settings ``model_options: {MODEL: {...}}``): the sampler a model's DiT denoises
with and the LoRAs always applied to its jobs -- what a step-distilled model or distillation LoRA needs.

A LightX2V-style 4-step distillation, for instance, is ``{sampler: {solver: euler, shift: 5.0}, loras:
[{name: distill}]}`` with jobs at ``steps: 4, guidance_scale: 1.0``. Workers build the sampler once per
model (`workers.stages.samplers`); submission adds the default LoRAs to the job's spec, so the record,
the batch key and the worker all see what the job runs with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.core.loras import LoraChoice

# unipc: Wan's own multistep solver (the model dir's scheduler); euler: the flow-matching Euler step that
# step-distilled Wan models are sampled with.
SolverName = Literal["unipc", "euler"]


class SamplerSettings(BaseModel):
    """The noise schedule and solver of a model's denoising loop (every job of that model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: the model dir's own scheduler class.
    solver: SolverName | None = None
    # The flow-matching shift of the schedule (Wan: 3.0 at 480p, 5.0 at 720p; distillations often 5.0);
    # None keeps the model dir's value. A job's flow_shift still overrides it for the unipc solver.
    shift: float | None = Field(default=None, gt=0.0, le=30.0)


# Where a Wan2.2 model's two experts run: "split" -- each on its own transform workers, the route
# encode -> transform@high -> transform@low -> decode (half the DiT memory per worker, each expert scaled on
# its own); "together" -- one transform worker holds both and switches at the boundary, as peers do.
ExpertPlacement = Literal["split", "together"]


class ModelOptions(BaseModel):
    """What a farm does for every job of one model beyond the model dir itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Two-expert (Wan2.2-A14B) models only; None: "split". Ignored for a one-expert model.
    experts: ExpertPlacement | None = None

    # The sampler of this model's DiT; None: the model dir's scheduler as it is.
    sampler: SamplerSettings | None = None
    # LoRAs added to every job of this model (a distillation LoRA, say), before the job's own ones.
    loras: tuple[LoraChoice, ...] = ()
