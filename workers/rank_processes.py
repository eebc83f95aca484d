"""Follower processes of a rank group (the decode group's, the DiT group's): started once by the worker,
waited for while they load their model, and reaped or killed -- exactly the worker's own children."""

from __future__ import annotations

import subprocess
import time

from torch.distributed import TCPStore


def wait_until_loaded(
    store: TCPStore, children: list[subprocess.Popen[bytes]], startup_seconds: float, what: str
) -> None:
    """Wait for follower r (rank r, from 1) to set ``loaded/r`` in ``store``, as long as it lives, up to
    ``startup_seconds`` in all: on a busy host loading can outlast the collectives' timeout by far."""
    deadline = time.monotonic() + startup_seconds
    for rank, child in enumerate(children, start=1):
        while not store.check([f"loaded/{rank}"]):
            if child.poll() is not None:
                raise RuntimeError(
                    f"{what} rank {rank} exited with status {child.returncode} while starting; see its log"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} rank {rank} did not load its model in {startup_seconds:.0f} s")
            time.sleep(0.1)


def reap(children: list[subprocess.Popen[bytes]], grace_seconds: float = 0.0) -> None:
    """Wait up to ``grace_seconds`` in all for the followers to exit, then kill the rest; ``children`` is emptied."""
    deadline = time.monotonic() + grace_seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    children.clear()
