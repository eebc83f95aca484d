"""A model's sampler (``model_options.MODEL.sampler``): the scheduler template its DiT denoises every job with.

The template replaces the model dir's scheduler once at worker start; every job
still gets a fresh copy (`workers.models.loading.fresh_scheduler`). ``unipc``
is Wan's own UniPC multistep solver on flow sigmas (``shift`` is its
``flow_shift``); ``euler`` is diffusers' ``FlowMatchEulerDiscreteScheduler``,
the plain flow-matching Euler step step-distilled Wan models are sampled with.
"""

from __future__ import annotations

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from scheduler.core.model_options import SamplerSettings


def sampler_template(template: Any, sampler: SamplerSettings | None) -> Any:
    """The scheduler ``sampler`` asks for, built from ``template``'s config (``template`` itself for None)."""
    if sampler is None or (sampler.solver is None and sampler.shift is None):
        return template
    solver = sampler.solver or ("euler" if isinstance(template, FlowMatchEulerDiscreteScheduler) else "unipc")
    if solver == "euler":
        shift = {} if sampler.shift is None else {"shift": sampler.shift}
        return FlowMatchEulerDiscreteScheduler.from_config(template.config, **shift)
    flow_shift = {} if sampler.shift is None else {"flow_shift": sampler.shift}
    return UniPCMultistepScheduler.from_config(template.config, **flow_shift)
