"""The settings file shipped in configs/ loads, so an operator copying it starts from something valid."""

from __future__ import annotations

from pathlib import Path

from scheduler.core.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def test_shipped_farm_config_loads_with_its_documented_values() -> None:
    settings = load_settings(REPO / "configs" / "farm.yaml", env={})
    assert settings.transfer.protocol == "tcp" and settings.transfer.direct_receive
    assert settings.transfer.slot_mb is None  # sized from the model configs unless set
    assert settings.worker.device == "cuda" and settings.worker.max_attempts == 3


def test_environment_overrides_the_file() -> None:
    settings = load_settings(REPO / "configs" / "farm.yaml", env={"REELFARM_DEVICE": "cpu"})
    assert settings.worker.device == "cpu"
