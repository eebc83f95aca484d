"""The stage objects and the reference diffusers pipeline of a tiny model, built once per session and shared by
the stage tests (loaded by ``pytest_plugins``).

A test module says which model it tests with ``STAGE_TASK = "t2v"`` or ``"i2v"``; its tests then ask for
``encoder``, ``image_stage`` (i2v), ``denoiser``, ``decoder`` and ``pipeline`` by name (module-scoped,
so a module's own derived fixtures -- embeddings, latents, frames -- are computed once per module). Workers code (torch,
diffusers) is imported inside the fixtures, so collecting scheduler-only tests needs no GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class StageSet:
    encoder: Any  # TextEncodeStage
    denoiser: Any  # DenoiseStage
    decoder: Any  # StreamingVaeDecoder
    pipeline: Any  # WanPipeline / WanImageToVideoPipeline
    image_stage: Any = None  # ImageConditionStage (i2v)


def build_stage_set(model_dir: Path, i2v: bool) -> StageSet:
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.encode import TextEncodeStage
    from workers.stages.image_encode import ImageConditionStage
    from workers.stages.transform import DenoiseStage

    pipeline_class = WanImageToVideoPipeline if i2v else WanPipeline
    pipeline = pipeline_class.from_pretrained(model_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return StageSet(
        encoder=TextEncodeStage(model_dir),
        denoiser=DenoiseStage(model_dir),
        decoder=StreamingVaeDecoder(model_dir),
        pipeline=pipeline,
        image_stage=ImageConditionStage(model_dir) if i2v else None,
    )


@pytest.fixture(scope="session")
def t2v_stages(tiny_model_dir: Path) -> StageSet:
    return build_stage_set(tiny_model_dir, i2v=False)


@pytest.fixture(scope="session")
def i2v_stages(tiny_i2v_model_dir: Path) -> StageSet:
    return build_stage_set(tiny_i2v_model_dir, i2v=True)


@pytest.fixture(scope="module")
def stages(request: pytest.FixtureRequest) -> StageSet:
    task = getattr(request.module, "STAGE_TASK", None)
    assert task in ("t2v", "i2v"), f"{request.module.__name__} must set STAGE_TASK to 't2v' or 'i2v'"
    stage_set: StageSet = request.getfixturevalue(f"{task}_stages")
    return stage_set


@pytest.fixture(scope="module")
def encoder(stages: StageSet) -> Any:
    return stages.encoder


@pytest.fixture(scope="module")
def image_stage(stages: StageSet) -> Any:
    assert stages.image_stage is not None, "image_stage exists for i2v models only (STAGE_TASK = 'i2v')"
    return stages.image_stage


@pytest.fixture(scope="module")
def denoiser(stages: StageSet) -> Any:
    return stages.denoiser


@pytest.fixture(scope="module")
def decoder(stages: StageSet) -> Any:
    return stages.decoder


@pytest.fixture(scope="module")
def pipeline(stages: StageSet) -> Any:
    return stages.pipeline
