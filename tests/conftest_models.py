"""Shared fixtures for model directories: one tiny Wan2.1 t2v and one tiny i2v model, built once per test session.

Loaded for the whole suite by ``pytest_plugins`` in ``tests/conftest.py``.
Workers code (torch, diffusers) is imported inside the fixture, so collecting
scheduler-only tests does not need the GPU stack.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# huggingface_hub reads this once, at import: set it before anything imports diffusers or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL_SEED = 0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny Wan2.1 t2v model directory in diffusers format (seed 0), shared by the whole session."""
    from workers.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "wan21-t2v-tiny", seed=TINY_MODEL_SEED)


@pytest.fixture(scope="session")
def tiny_i2v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny Wan2.1 image-to-video model directory in diffusers format (seed 0), shared by the session."""
    from workers.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "wan21-i2v-tiny", seed=TINY_MODEL_SEED, i2v=True)


@pytest.fixture(scope="session")
def tiny_two_expert_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.2-A14B-layout t2v model (two experts with distinct weights, boundary 0.875), seed 0."""
    from workers.models.presets import build_arch_model

    return build_arch_model(tmp_path_factory.mktemp("models") / "wan22-t2v-tiny-2expert", "tiny-2expert")


@pytest.fixture(scope="session")
def tiny_ti2v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.2-TI2V model directory indexed as text-to-video (WanPipeline, expand_timesteps), seed 0."""
    from workers.models.presets import build_arch_model

    return build_arch_model(tmp_path_factory.mktemp("models") / "wan22-ti2v-tiny", "tiny-ti2v", seed=TINY_MODEL_SEED)


@pytest.fixture(scope="session")
def tiny_ti2v_i2v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny TI2V weights indexed as image-to-video (WanImageToVideoPipeline, no image encoder), seed 0."""
    from workers.models.presets import build_arch_model

    directory = tmp_path_factory.mktemp("models") / "wan22-ti2v-i2v-tiny"
    return build_arch_model(directory, "tiny-ti2v-i2v", seed=TINY_MODEL_SEED)


@pytest.fixture(scope="session")
def tiny_two_expert_i2v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan2.2-I2V-A14B-layout model (two experts, the VAE condition without CLIP, boundary 0.9), seed 0."""
    from workers.models.presets import build_arch_model

    return build_arch_model(tmp_path_factory.mktemp("models") / "wan22-i2v-tiny-2expert", "tiny-2expert-i2v")
