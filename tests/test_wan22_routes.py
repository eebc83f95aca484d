"""The control plane's side of Wan2.2's experts, without servers: routes fixed at submit from the model dir
and its placement, guidance_scale_2 refused where it means nothing, the embedded farm's worker per expert."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.core.keys import Hop, Stage
from scheduler.core.model_catalog import ModelChooser
from scheduler.core.model_options import ModelOptions
from scheduler.core.route import EXPERT_HOPS, THREE_HOPS, parse_route, route_for
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError
from scheduler.local.embedded import plan_workers

SPEC = JobSpec(prompt="a fox", width=64, height=64, frames=9, steps=6)


def settings_for(model_dir: Path, **overrides: object) -> FarmSettings:
    return FarmSettings(model_dir=model_dir).model_copy(update=overrides)


def test_a_two_expert_model_gets_one_hop_per_expert_unless_placed_together(
    tiny_two_expert_model_dir: Path, tiny_model_dir: Path
) -> None:
    split = ModelChooser(settings_for(tiny_two_expert_model_dir)).route(SPEC)
    assert split == EXPERT_HOPS
    assert split.names == ("encode", "transform@high", "transform@low", "decode")
    assert split.expert_of(Hop("transform@low")) == "low" and split.steps_of(Hop("transform@low")) is None
    assert split.describe() == (
        "encode -> transform@high (high-noise expert) -> transform@low (low-noise expert) -> decode"
    )
    # Two DiTs, two caches: a step-cached job keeps its experts apart too.
    cached = SPEC.model_copy(update={"cache": {"method": "first_block", "threshold": 0.05}})
    assert ModelChooser(settings_for(tiny_two_expert_model_dir)).route(cached) == EXPERT_HOPS
    together = settings_for(tiny_two_expert_model_dir, model_options={"default": ModelOptions(experts="together")})
    assert ModelChooser(together).route(SPEC) == THREE_HOPS
    assert ModelChooser(settings_for(tiny_model_dir)).route(SPEC) == THREE_HOPS


def test_expert_hops_survive_the_record_and_bad_ones_are_refused() -> None:
    assert parse_route(EXPERT_HOPS.to_json()) == EXPERT_HOPS
    with pytest.raises(ValueError, match="expert 'middle'"):
        parse_route('[{"hop":"encode"},{"hop":"transform@high","expert":"middle"},{"hop":"decode"}]')
    with pytest.raises(ValueError, match="never with steps"):
        parse_route('[{"hop":"encode"},{"hop":"transform@high","expert":"high","steps":[0,2]},{"hop":"decode"}]')
    assert route_for(6, None, experts_split=True) == EXPERT_HOPS
    assert route_for(6, 3).names == ("encode", "transform@high", "transform@low", "decode")


def test_guidance_scale_2_is_refused_in_one_line_on_a_one_dit_model(
    tiny_model_dir: Path, tiny_two_expert_model_dir: Path
) -> None:
    with_second = SPEC.model_copy(update={"guidance_scale_2": 3.0})
    with pytest.raises(SpecError, match="guidance_scale_2: model 'default' has one DiT") as refused:
        ModelChooser(settings_for(tiny_model_dir)).resolve(with_second, named=True)
    assert "\n" not in str(refused.value)
    assert ModelChooser(settings_for(tiny_two_expert_model_dir)).resolve(with_second, named=True) == with_second


def test_the_embedded_farm_starts_a_worker_per_expert_and_counts_them_by_hop(
    tiny_two_expert_model_dir: Path, tiny_model_dir: Path
) -> None:
    settings = settings_for(tiny_two_expert_model_dir)
    assert settings.worker_layout() == {
        Stage.ENCODE: 1,
        Hop("transform@high"): 1,
        Hop("transform@low"): 1,
        Stage.DECODE: 1,
    }
    more_low = settings.with_worker_counts({"transform@low": 2}).worker_layout()
    assert more_low[Hop("transform@low")] == 2 and Stage.TRANSFORM not in more_low
    slots = plan_workers(more_low, [0, 1, 2, 3, 4, 5])
    assert [(s.stage, s.expert) for s in slots] == [
        (Stage.ENCODE, None),
        (Stage.TRANSFORM, "high"),
        (Stage.TRANSFORM, "low"),
        (Stage.TRANSFORM, "low"),
        (Stage.DECODE, None),
    ]
    assert slots[2].args == ("--expert", "low") and slots[2].name == "transform-low-0"
    # A one-DiT model beside it still needs a plain transform worker.
    mixed = settings.model_copy(update={"models": {"wan21": tiny_model_dir}})
    assert mixed.worker_layout()[Stage.TRANSFORM] == 1
    together = settings.model_copy(update={"model_options": {"default": ModelOptions(experts="together")}})
    assert together.worker_layout() == {Stage.ENCODE: 1, Stage.TRANSFORM: 1, Stage.DECODE: 1}
