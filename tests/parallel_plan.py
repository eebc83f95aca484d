"""How the suite is split between pytest-xdist workers (``make test`` runs ``-n 4 --dist loadgroup``).

Each xdist worker is a pytest session of its own: it starts its own Valkey and S3 server, builds its own tiny
models in its own temporary directory (``tmp_path_factory`` is per worker) and lets the OS choose every port, so
workers share nothing but the CPUs. Network namespaces of the multi-host test carry the worker process's pid
(``tests/netns_lab.py``), so two workers never make the same name.

What this module decides is which tests must run on the same worker (an ``xdist_group``), because running
them apart would build an expensive shared fixture once per worker:

- tests that use ``SHARED_FARM_FIXTURES`` (the HTTP front's farm: its own Valkey, three worker processes and
  the front, about 30 s to start) form one group, so the farm is started once for the whole run;
- tests that use a module- or class-scoped fixture (a model loaded, a denoise computed, a Mooncake engine
  opened once for the module) stay with the rest of their module, so the fixture is built once;
- every other test is a unit of its own, handed to whichever worker is free.

It also decides the order work is handed out: the longest work first, so the run does not end with one worker
busy on a long test while the others are idle. xdist hands out the groups with the most tests first (its
``--loadscope-reorder``, on by default) and singles in collection order; ``order_for_workers`` puts the slow
(``slow``-marked) singles ahead of the quick ones. Only under xdist: a plain ``pytest`` run keeps file order.
"""

from __future__ import annotations

import os

import pytest

# Session fixtures too costly to start once per xdist worker: the tests that use one share a worker.
SHARED_FARM_FIXTURES = ("http_farm",)
SHARED_SCOPES = ("module", "class", "package")


def _fixture_scopes(item: pytest.Item) -> set[str]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {defs[-1].scope for defs in info.name2fixturedefs.values() if defs}


def group_of(item: pytest.Item) -> str | None:
    """The ``xdist_group`` ``item`` must join, or None when it may run on any worker."""
    names = set(getattr(item, "fixturenames", ()))
    for fixture in SHARED_FARM_FIXTURES:
        if fixture in names:
            return fixture
    if _fixture_scopes(item) & set(SHARED_SCOPES):
        return item.nodeid.split("::", 1)[0]
    return None


def mark_groups(items: list[pytest.Item]) -> None:
    for item in items:
        group = group_of(item)
        # A test that names its own group (an explicit ``xdist_group`` mark) keeps it.
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))


def order_for_workers(items: list[pytest.Item]) -> None:
    """Slow tests first, in place; stable, so a module's tests keep their order among themselves."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def running_under_xdist(config: pytest.Config) -> bool:
    # ``workerinput`` exists on xdist's worker processes only; they all collect, and must order alike.
    return hasattr(config, "workerinput")


def running_as_xdist_worker() -> bool:
    """The same question before pytest's config exists (at conftest import): xdist sets this variable."""
    return "PYTEST_XDIST_WORKER" in os.environ
