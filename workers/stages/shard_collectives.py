"""The collectives a sharded decode's ranks use (``workers.stages.sharded_decode``): a seam (`Collectives`)
and its gloo implementation on a process group of its own.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Protocol

import torch
from torch.distributed import BroadcastOptions, GatherOptions, ProcessGroupGloo, Store

# How often an idle follower checks that its parent (rank 0) still lives.
IDLE_POLL_SECONDS = 5.0


class Collectives(Protocol):
    """The three collectives the sharded decoder needs (rank 0 is the root)."""

    rank: int
    size: int

    def announce(self, header: list[int]) -> None:
        """Rank 0: publish the next job's header."""
        ...

    def next_job(self) -> list[int] | None:
        """Ranks 1..N-1: wait, however long, for rank 0's next header; None once rank 0 is gone."""
        ...

    def broadcast(self, tensor: torch.Tensor) -> None: ...
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...
    def gather_start(self, tensor: torch.Tensor) -> PendingGather: ...


class PendingGather(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Every rank's tensor on rank 0; an empty list elsewhere."""
        ...


class _GlooGather:
    def __init__(self, work: Any, outputs: list[torch.Tensor], keep: torch.Tensor) -> None:
        self._work, self._outputs, self._keep = work, outputs, keep  # keep: the input must outlive the send

    def wait(self) -> list[torch.Tensor]:
        self._work.wait()
        return self._outputs


class GlooCollectives:
    """A gloo process group of its own (not torch.distributed's global one), so a group can be torn down and
    built again inside a long-lived worker process after a rank died."""

    def __init__(self, store: Store, rank: int, size: int, timeout_seconds: float) -> None:
        # The options and the collective methods of a bare process group are bound in C++ without stubs.
        options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # loopback: ranks share a host
        options._timeout = timedelta(seconds=timeout_seconds)
        self.group: Any = ProcessGroupGloo(store, rank, size, options)
        self.store, self.rank, self.size = store, rank, size
        self._jobs = 0

    # Jobs are announced through the store, not a collective: a follower waits between jobs for as
    # long as the worker stays idle, while every collective keeps the group's (short) timeout.
    def announce(self, header: list[int]) -> None:
        self.store.set(f"job/{self._jobs}", ",".join(str(v) for v in header))
        self._jobs += 1

    def next_job(self) -> list[int] | None:
        key, parent = f"job/{self._jobs}", os.getppid()
        while True:
            try:
                self.store.wait([key], timedelta(seconds=IDLE_POLL_SECONDS))
                break
            except RuntimeError:  # the poll timed out, or the store (rank 0's process) is gone
                if os.getppid() != parent:
                    return None
        self._jobs += 1
        return [int(v) for v in self.store.get(key).decode().split(",")]

    def broadcast(self, tensor: torch.Tensor) -> None:
        options = BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        outputs = [torch.empty_like(tensor) for _ in range(self.size)]
        self.group.allgather([outputs], [tensor]).wait()
        return outputs

    def gather_start(self, tensor: torch.Tensor) -> PendingGather:
        options = GatherOptions()
        options.rootRank = 0
        outputs = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else []
        work = self.group.gather([outputs] if self.rank == 0 else [], [tensor], options)
        return _GlooGather(work, outputs, tensor)
