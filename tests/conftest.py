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

from tests import parallel_plan

pytest_plugins = [
    "tests.conftest_models",
    "tests.service_fixtures",
    "tests.farm_fixtures",
    "tests.stage_fixtures",
    "tests.http_fixtures",
]

# Under xdist several pytest processes share the cores, each with the worker processes it starts: one
# intra-op thread each, as the embedded farm's workers run, or OpenMP's spinning threads starve each other.
# Set before any test module imports torch (which reads it once); an operator's own setting is kept.
if parallel_plan.running_as_xdist_worker():
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# tryfirst: the groups must be marked before xdist's own hook reads them (tests/parallel_plan.py).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
    parallel_plan.mark_groups(items)
    if parallel_plan.running_under_xdist(config):
        parallel_plan.order_for_workers(items)
