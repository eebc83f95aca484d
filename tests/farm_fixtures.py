"""The farm preamble integration tests share: settings for the test's Valkey, bucket and tiny model, a Redis
connection, and worker fleets that are always stopped at the end (loaded by ``pytest_plugins``).

``farm`` is a ready ``Farm``; ``make_farm(**setting_overrides)`` makes one with other settings.
``Farm.fleet(extra_env)`` gives a ``WorkerFleet`` the fixture stops, so tests need no try/finally.

A farm made here is the test's own (fresh settings, a flushed Valkey, an empty bucket, workers it starts):
for tests that change settings, inject faults, kill workers or count what each worker did, and each says
which next to where it starts its workers. Tests that only need a farm to answer share one: ``http_farm``
(``tests/http_fixtures.py``), started once per run (``tests/parallel_plan.py`` keeps its users together).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.core.object_store import S3Config
from scheduler.core.settings import FarmSettings
from tests.farm_harness import WorkerFleet, farm_settings


@dataclass
class Farm:
    settings: FarmSettings
    conn: redis.Redis
    fleets: list[WorkerFleet] = field(default_factory=list)

    def fleet(self, extra_env: dict[str, str] | None = None) -> WorkerFleet:
        made = WorkerFleet(self.settings, extra_env=extra_env)
        self.fleets.append(made)
        return made


@pytest.fixture
def make_farm(
    redis_url: str, s3_config: S3Config, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Farm]]:
    made: list[Farm] = []

    def make(**overrides: Any) -> Farm:
        model_dir = overrides.pop("model_dir", tiny_model_dir)
        settings = farm_settings(redis_url, s3_config, model_dir, tmp_path, **overrides)
        farm = Farm(settings, redis.Redis.from_url(redis_url))
        made.append(farm)
        return farm

    try:
        yield make
    finally:
        for farm in made:
            for fleet in farm.fleets:
                fleet.stop_all()


@pytest.fixture
def farm(make_farm: Callable[..., Farm]) -> Farm:
    return make_farm()
