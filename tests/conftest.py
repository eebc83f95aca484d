"""Fixtures shared by the suite: real Valkey, real SeaweedFS S3, the tiny model directories -- and isolation.

Every test runs away from the user's farm: ``REELFARM_*`` variables are cleared
(``REELFARM_TEST_*`` ones, which only the tests read, are kept), the farm home
points into a fresh temporary directory, and the working directory is another
one, so settings' relative defaults (``.reelfarm/...``) never resolve to a farm
that ``make demo`` or ``reelfarm up`` left in the checkout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.conftest_models", "tests.service_fixtures", "tests.farm_fixtures", "tests.stage_fixtures"]

# Kept: knobs of the test suite itself, not farm settings.
TEST_ONLY_PREFIX = "REELFARM_TEST_"


@pytest.fixture(autouse=True)
def isolated_from_the_users_farm(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith("REELFARM_") and not name.startswith(TEST_ONLY_PREFIX):
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("farm-home")
    monkeypatch.setenv("REELFARM_HOME", str(home))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield home


# A test that asks for one of these needs a real server; it is an integration test (`make test-fast` skips it).
SERVER_FIXTURES = frozenset({"valkey_server", "redis_url", "s3_server", "s3_config", "s3_client", "tls_redis"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
