"""The layering the code relies on, read from the source (no imports run): a broken rule fails here, not in review.

- stage compute (workers/stages/) imports no queue, transport or storage code: stages turn tensors into tensors;
- the control plane (scheduler/) never imports workers/ or torch;
- workers.runtime is imported by what it runs, never the other way round at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUEUE_TRANSPORT_STORAGE = (
    "scheduler.queues",
    "scheduler.object_store",
    "workers.transfer",
    "workers.handoff",
    "rq",
    "boto3",
    "botocore",
    "mooncake",
)


def imported_modules(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Every module ``path`` imports, lazy imports included; ``runtime_only`` skips ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("path", sorted((REPO / "workers" / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stage_compute_imports_no_queue_transport_or_storage(path: Path) -> None:
    assert not {name for name in imported_modules(path) if under(name, QUEUE_TRANSPORT_STORAGE)}


@pytest.mark.parametrize("path", sorted((REPO / "scheduler").glob("*.py")), ids=lambda p: p.name)
def test_control_plane_imports_no_workers_or_torch(path: Path) -> None:
    assert not {name for name in imported_modules(path) if under(name, ("workers", "torch"))}


def test_nothing_the_runtime_imports_imports_it_back() -> None:
    workers = REPO / "workers"
    runtime_imports = {name for name in imported_modules(workers / "runtime.py") if under(name, ("workers",))}
    for name in runtime_imports:
        path = REPO / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO / name.replace(".", "/") / "__init__.py"
        assert "workers.runtime" not in imported_modules(path, runtime_only=True), name
