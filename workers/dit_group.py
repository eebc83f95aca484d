"""One job's DiT over several devices: diffusers' context parallelism (Ulysses) across a rank group.

A transform worker with ``transform.context_parallel`` N owns N devices: rank 0 is the worker's own
process (its resident DiT), ranks 1..N-1 are child processes started once with the worker and kept
across jobs (``python -m workers.dit_group rank ...``). Every rank loads the DiT, joins one
torch.distributed group (nccl on GPUs, one device per rank; gloo on CPU) and calls diffusers'
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``: the DiT's sequence is split
across the ranks, attention exchanges heads with all-to-alls, and the output is gathered on every
rank. The denoising loop runs on rank 0 only; before each DiT call rank 0 sends the call's inputs to
the followers (a fixed int64 header, then the tensors: nothing is unpickled), and all ranks make
the call together.

Ulysses splits attention heads, so N must divide the DiT's head count; the sequence (latent frames x
patches) must split into N equal parts (checked per job, refused in one line).

CPU note: diffusers 0.42 picks each rank's device as ``rank % torch.accelerator.device_count()``,
which divides by zero on a host without an accelerator. On CPU every rank is the same device, so the
ranks here answer 1 there while it runs (``_one_cpu_device``); GPU ranks are untouched.

A rank that dies makes the next collective fail (or time out): the job's transform attempt fails
like any transform failure, and the worker restarts the group before its next job.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from workers import rank_processes
from workers.models.loading import load_transformer
from workers.stages.transform import call_dit

log = logging.getLogger("reelfarm.dit_group")
_REPO = Path(__file__).resolve().parents[1]

_STOP, _FORWARD = 0, 1
# Header: command, dtype code, has image, model input dims (5), text dims (3), image dims (3), timestep count.
_HEADER_LENGTH = 15
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _one_cpu_device() -> Iterator[None]:
    """On a CPU-only host, diffusers' rank-to-device mapping sees one device while it runs (module docstring)."""
    counted = torch.accelerator.device_count
    if counted() == 0:
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = counted  # type: ignore[assignment]


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Rank r of a GPU worker uses GPU r (the worker owns N devices); CPU ranks share the CPU."""
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


def check_heads(transformer: torch.nn.Module, size: int) -> None:
    heads = int(transformer.config["num_attention_heads"])  # type: ignore[index]
    if heads % size:
        raise ValueError(
            f"transform.context_parallel {size} must divide the DiT's {heads} attention heads (Ulysses splits "
            "heads); pick a divisor"
        )


def enable_context_parallel(transformer: torch.nn.Module, size: int) -> None:
    from diffusers import ContextParallelConfig

    check_heads(transformer, size)
    with _one_cpu_device():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size))  # type: ignore[operator]


class DitCallSender:
    """Rank 0's side of a call: the inputs go to every follower before all ranks run the DiT on them."""

    def __init__(self, device: torch.device, size: int) -> None:
        # gloo moves CPU tensors, nccl device tensors.
        self.device = device
        self.size = size

    def send_call(
        self, model_input: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor:
        """Send one call's inputs to the followers; returns the timesteps as they received them (float32),
        for rank 0's own call."""
        timestep = timestep.float()
        header = [_FORWARD, _DTYPES.index(model_input.dtype), int(image is not None)]
        header += [*model_input.shape, *text.shape, *(image.shape if image is not None else (0, 0, 0)), len(timestep)]
        dist.broadcast(torch.tensor(header, dtype=torch.int64, device=self.device), src=0)
        for tensor in (model_input, timestep, text, image):
            if tensor is not None:
                dist.broadcast(tensor.contiguous(), src=0)
        return timestep

    def stop(self) -> None:
        dist.broadcast(torch.tensor([_STOP] + [0] * (_HEADER_LENGTH - 1), dtype=torch.int64, device=self.device), src=0)


def follow_calls(transformer: torch.nn.Module, device: torch.device) -> None:
    """A follower's loop: take each call's inputs from rank 0 and make the call with it, until told to stop."""
    while True:
        header = torch.zeros(_HEADER_LENGTH, dtype=torch.int64, device=device)
        dist.broadcast(header, src=0)
        values = [int(v) for v in header.tolist()]
        if values[0] == _STOP:
            return
        dtype, has_image = _DTYPES[values[1]], bool(values[2])
        model_input = torch.empty(values[3:8], dtype=dtype, device=device)
        text = torch.empty(values[8:11], dtype=dtype, device=device)
        image = torch.empty(values[11:14], dtype=dtype, device=device) if has_image else None
        timestep = torch.empty(values[14], dtype=torch.float32, device=device)
        for tensor in (model_input, timestep, text, image):
            if tensor is not None:
                dist.broadcast(tensor, src=0)
        with torch.no_grad():
            call_dit(transformer, model_input, timestep, text, image)


@dataclass
class DitRankGroup:
    """Ranks 1..N-1 as child processes of the transform worker; rank 0 joins with the worker's DiT."""

    model_dir: Path
    size: int
    device: str = "cpu"
    dtype: str = "float32"
    timeout_seconds: float = 300.0
    threads_per_rank: int = 1
    startup_seconds: float = 900.0
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sender: DitCallSender | None = None
    restarts: int = 0

    def start(self, transformer: torch.nn.Module, *, already_parallel: bool = False) -> DitCallSender:
        """Start the followers, join the group as rank 0 and make ``transformer`` context-parallel."""
        check_heads(transformer, self.size)  # before any process starts
        store = dist.TCPStore(
            "127.0.0.1",
            0,
            self.size,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=self.timeout_seconds),
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads_per_rank), "PYTHONPATH": str(_REPO)}
        for rank in range(1, self.size):
            command = [sys.executable, "-m", "workers.dit_group", "rank", str(rank), str(self.size), str(store.port)]
            command += [str(self.model_dir), "--device", self.device, "--dtype", self.dtype]
            command += ["--timeout", str(self.timeout_seconds)]
            self.children.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
        try:
            rank_processes.wait_until_loaded(store, self.children, self.startup_seconds, "DiT")
            dist.init_process_group(
                backend_for(self.device),
                store=store,
                rank=0,
                world_size=self.size,
                timeout=timedelta(seconds=self.timeout_seconds),
            )
            if not already_parallel:
                enable_context_parallel(transformer, self.size)
        except BaseException:
            rank_processes.reap(self.children)
            raise
        self._store = store  # rank 0 hosts the store: it lives as long as the group
        self.sender = DitCallSender(torch.device(rank_device(self.device, 0)), self.size)
        return self.sender

    def healthy(self) -> bool:
        return self.sender is not None and all(child.poll() is None for child in self.children)

    def describe(self) -> dict[str, str]:
        """What the worker record shows about the group (``reelfarm info``)."""
        return {
            "dit_ranks": str(self.size),
            "dit_group": "up" if self.healthy() else "down",
            "dit_group_restarts": str(self.restarts),
            "dit_rank_pids": ",".join(str(child.pid) for child in self.children),
        }

    def restart(self, transformer: torch.nn.Module) -> DitCallSender:
        """After a failed call: drop the group, kill what is left of it, start it again.

        diffusers keeps the parallel config on the model, so rank 0 reloads nothing: the new group gets the
        same ranks, and the existing hooks run their collectives in the new default process group.
        """
        self.close()
        self.restarts += 1
        log.warning("DiT rank group of %d restarting (restart %d)", self.size, self.restarts)
        return self.start(transformer, already_parallel=True)

    def close(self) -> None:
        if self.sender is not None and self.healthy():
            try:
                self.sender.stop()
            except RuntimeError as exc:
                log.warning("DiT rank group stop failed: %s", exc)
        self.sender = None
        rank_processes.reap(self.children, grace_seconds=10.0)
        if dist.is_initialized():
            dist.destroy_process_group()


def follow(rank: int, size: int, port: int, model_dir: Path, device: str, dtype: str, timeout: float) -> int:
    """A follower rank's life: load the DiT, join the group, make rank 0's calls until it says stop."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    own_device = rank_device(device, rank)
    transformer = load_transformer(model_dir, own_device, getattr(torch, dtype))
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=timeout))
    store.set(f"loaded/{rank}", "1")
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout)
    )
    enable_context_parallel(transformer, size)
    follow_calls(transformer, torch.device(own_device))
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.dit_group")
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", help="one follower rank (started by the transform worker)")
    rank.add_argument("rank", type=int)
    rank.add_argument("size", type=int)
    rank.add_argument("port", type=int)
    rank.add_argument("model_dir", type=Path)
    rank.add_argument("--device", default="cpu")
    rank.add_argument("--dtype", default="float32")
    rank.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"DiT rank {args.rank}: %(message)s")
    try:
        return follow(args.rank, args.size, args.port, args.model_dir, args.device, args.dtype, args.timeout)
    except RuntimeError as exc:
        log.warning("leaving the DiT group: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
