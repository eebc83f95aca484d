"""The decode rank group: rank 0 in the decode worker's process, ranks 1..N-1 as child processes.

Lifecycle: 1. ``start(base)``: a TCP store on loopback (rank 0 hosts it), one
child per extra rank (``python -m workers.decode_group rank ...``: loads the
VAE, joins the gloo group, then follows rank 0's decodes until told to stop),
then rank 0 joins with the decode worker's own VAE and gets a
``ShardedVaeDecoder``. 2. jobs: ``decoder.iter_frames(latents)`` on rank 0.
3. a rank that died makes the next collective fail (gloo sees the closed
connection, or the group's timeout): the job's decode attempt fails like any
decode failure and ``restart()`` kills what is left and starts the group again.
4. ``close()`` stops the followers and reaps them.

Children are plain subprocesses (not torch.multiprocessing) so the worker owns
their pids: it can tell whether each is alive for its heartbeat and kill
exactly its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed import TCPStore

from workers import rank_processes
from workers.stages.decode import StreamingVaeDecoder
from workers.stages.sharded_decode import GlooCollectives, ShardedVaeDecoder, ShardGrid

log = logging.getLogger("reelfarm.decode_group")
_REPO = Path(__file__).resolve().parents[1]


@dataclass
class DecodeRankGroup:
    model_dir: Path
    grid: ShardGrid
    timeout_seconds: float = 120.0  # a collective (or the group's start) waiting longer fails the attempt
    threads_per_rank: int = 1
    dtype: str = "float32"  # the followers' VAE dtype: rank 0's (the worker's) own
    startup_seconds: float = 900.0  # followers loading their VAE (imports included) on a busy host
    halo: int | None = None  # None: from the decoder's receptive field (tests pass a smaller one on purpose)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    decoder: ShardedVaeDecoder | None = None
    restarts: int = 0
    base: StreamingVaeDecoder | None = None

    def start(self, base: StreamingVaeDecoder) -> ShardedVaeDecoder:
        """Start ranks 1..N-1 and join them as rank 0 with ``base`` (the worker's resident VAE)."""
        size = self.grid.size
        store = TCPStore(
            "127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=_seconds(self.timeout_seconds)
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads_per_rank), "PYTHONPATH": str(_REPO)}
        for rank in range(1, size):
            command = [
                sys.executable,
                "-m",
                "workers.decode_group",
                "rank",
                str(rank),
                str(self.grid),
                str(store.port),
                str(self.model_dir),
                "--dtype",
                self.dtype,
                "--timeout",
                str(self.timeout_seconds),
            ]
            if self.halo is not None:
                command += ["--halo", str(self.halo)]
            self.children.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
        try:
            rank_processes.wait_until_loaded(store, self.children, self.startup_seconds, "decode")
            comm = GlooCollectives(store, 0, size, self.timeout_seconds)
        except BaseException:
            rank_processes.reap(self.children)
            raise
        self._store = store  # rank 0 hosts the store: it lives as long as the group
        self.base = base
        self.decoder = ShardedVaeDecoder(base, self.grid, comm, halo=self.halo)
        return self.decoder

    def healthy(self) -> bool:
        """Every follower is still running (rank 0 is this process)."""
        return self.decoder is not None and all(child.poll() is None for child in self.children)

    def describe(self) -> dict[str, str]:
        """What the worker record shows about the group (``reelfarm info``); refreshed by every heartbeat."""
        return {
            "decode_ranks": str(self.grid.size),
            "decode_grid": str(self.grid),
            "decode_group": "up" if self.healthy() else "down",
            "decode_group_restarts": str(self.restarts),
            "decode_rank_pids": ",".join(str(child.pid) for child in self.children),
        }

    def restart(self) -> ShardedVaeDecoder:
        """After a failed decode: drop the group, kill what is left of it, start it again."""
        assert self.base is not None, "restart() needs a group that was started"
        base = self.base
        rank_processes.reap(self.children)
        self.decoder = None
        self.restarts += 1
        log.warning("decode rank group %s restarting (restart %d)", self.grid, self.restarts)
        return self.start(base)

    def close(self) -> None:
        """Stop the followers (they exit their loops) and reap them; kill any that do not exit."""
        if self.decoder is not None and self.healthy():
            try:
                self.decoder.stop()
            except RuntimeError as exc:  # a rank died meanwhile: nothing to stop politely
                log.warning("decode rank group stop failed: %s", exc)
        self.decoder = None
        rank_processes.reap(self.children, grace_seconds=10.0)


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=value)


def follow(
    rank: int, grid: ShardGrid, port: int, model_dir: Path, timeout: float, halo: int | None, dtype: str = "float32"
) -> int:
    """A follower rank's life: load the VAE, join the group, decode shards until rank 0 says stop."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = StreamingVaeDecoder(model_dir, dtype=getattr(torch, dtype))
    store = TCPStore("127.0.0.1", port, grid.size, is_master=False, timeout=_seconds(timeout))
    store.set(f"loaded/{rank}", "1")  # rank 0 now joins the group, which must then form within the timeout
    decoder = ShardedVaeDecoder(base, grid, GlooCollectives(store, rank, grid.size, timeout), halo=halo)
    while decoder.follow():
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.decode_group")
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", help="one follower rank (started by the decode worker)")
    rank.add_argument("rank", type=int)
    rank.add_argument("grid", type=ShardGrid.parse)
    rank.add_argument("port", type=int)
    rank.add_argument("model_dir", type=Path)
    rank.add_argument("--timeout", type=float, default=120.0)
    rank.add_argument("--halo", type=int)
    rank.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"decode rank {args.rank}: %(message)s")
    try:
        return follow(args.rank, args.grid, args.port, args.model_dir, args.timeout, args.halo, args.dtype)
    except RuntimeError as exc:
        # rank 0 went away or another rank died: this follower's group is over; the worker starts a new one.
        log.warning("leaving the decode group: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
