"""Denoising steps of several jobs as one DiT call: how a transform worker batches compatible jobs.

Each job of a batch runs its whole stage in its own thread -- pull, start fence, progress,
cancellation, checkpoints, hand-off, failure handling: exactly the solo path -- and only the DiT
call of each step goes through a ``StepBatcher``. The batcher is a rendezvous: a job *joins*
when its denoising loop starts and *leaves* when the loop ends for any reason (finished,
cancelled, failed, preempted). Once every joined job has a step waiting, one of the waiting
threads runs them all as one batched DiT call and hands each job its slice of the output.

Jobs need not be at the same step: the Wan DiT takes one timestep per batch row, and each job
keeps its own scheduler (its multistep memory). So a job that joins late (its pull took longer),
resumes from a checkpoint, or has a different step count or guidance scale still shares the
DiT call; one that leaves (cancelled at a step boundary, a bad input refused before it joined)
simply stops being waited for. Requests are grouped by their tensor shapes before the call, so a
job that does not fit its batch-mates' shapes runs beside them in its own call instead of failing.

The rows of a job's requests stay together in the batch: (cond, uncond) for one-pass guidance,
as the solo loop stacks them, so one job's maths is the solo maths with a larger batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# (model input [B, C, T, H, W], timesteps [B], text [B, L, D], image [B, N, D] or None) -> noise [B, C_out, T, H, W]
DitForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class StepRequest:
    """One job's DiT inputs for one step: its model input once, run against each of ``texts``."""

    model_input: torch.Tensor  # [1, C, T, H, W], in the DiT's dtype
    timestep: torch.Tensor  # [1]
    texts: tuple[torch.Tensor, ...]  # (cond,) or (cond, uncond), each [1, L, D]
    image: torch.Tensor | None  # i2v: [1, N, D] CLIP features, the same for every text

    def shape_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one DiT call."""
        return (
            tuple(self.model_input.shape),
            self.model_input.dtype,
            tuple(tuple(text.shape) for text in self.texts),
            None if self.image is None else tuple(self.image.shape),
        )


class Member:
    """A job's place in the batcher while its denoising loop runs (see ``StepBatcher.member``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Member({self.name!r})"


class StepBatcher:
    """Runs the pending steps of all joined jobs as batched DiT calls (thread-safe)."""

    def __init__(self, forward: DitForward, *, one_pass: bool) -> None:
        self._forward = forward
        # One-pass: a job's texts are rows of one call; otherwise one call per text (cond, then uncond),
        # each batched over the jobs -- the solo loop's two calls, batched.
        self._one_pass = one_pass
        self._cond = threading.Condition()
        self._joined: set[Member] = set()
        self._pending: dict[Member, StepRequest] = {}
        self._results: dict[Member, tuple[torch.Tensor, ...] | BaseException] = {}
        self._running = False
        self.calls = 0  # batched DiT calls run (for tests and the bench)
        self.largest_batch = 0  # most jobs seen in one call

    @contextlib.contextmanager
    def member(self, name: str) -> Iterator[Member]:
        """Join for the body (a job's denoising loop); leaving, however the body ends, stops others waiting on it."""
        joined = Member(name)
        with self._cond:
            self._joined.add(joined)
        try:
            yield joined
        finally:
            with self._cond:
                self._joined.discard(joined)
                self._pending.pop(joined, None)
                self._results.pop(joined, None)
                self._cond.notify_all()

    def joined(self) -> int:
        with self._cond:
            return len(self._joined)

    def step(self, member: Member, request: StepRequest) -> tuple[torch.Tensor, ...]:
        """The DiT's output for each of ``request.texts``, computed in a call with every other waiting job."""
        with self._cond:
            if member not in self._joined:
                raise RuntimeError(f"{member} asked for a step outside its member() block")
            self._pending[member] = request
            while member not in self._results:
                if self._running or not self._joined <= self._pending.keys():
                    self._cond.wait()
                    continue
                batch, self._pending = self._pending, {}
                self._running = True
                self._cond.release()
                try:
                    results = self._run(batch)
                except BaseException as exc:  # noqa: BLE001 - e.g. a forced shutdown: nobody may wait forever
                    results = dict.fromkeys(batch, exc)
                finally:
                    self._cond.acquire()
                    self._running = False
                self._results.update(results)
                self._cond.notify_all()
            result = self._results.pop(member)
        if isinstance(result, BaseException):
            raise result
        return result

    def _run(self, batch: dict[Member, StepRequest]) -> dict[Member, tuple[torch.Tensor, ...] | BaseException]:
        groups: dict[tuple[object, ...], list[Member]] = {}
        for member, request in batch.items():
            groups.setdefault(request.shape_key(), []).append(member)
        results: dict[Member, tuple[torch.Tensor, ...] | BaseException] = {}
        for members in groups.values():
            requests = [batch[m] for m in members]
            try:
                outputs = self._run_group(requests)
            except Exception as exc:  # noqa: BLE001 - each job of the call fails with it, in its own thread
                results.update(dict.fromkeys(members, exc))
                continue
            results.update(zip(members, outputs, strict=True))
            self.largest_batch = max(self.largest_batch, len(members))
        return results

    def _run_group(self, requests: list[StepRequest]) -> list[tuple[torch.Tensor, ...]]:
        texts = len(requests[0].texts)
        if self._one_pass:
            # Rows: job 1's (cond, uncond), job 2's (cond, uncond), ... -- each job's rows as the solo loop stacks them.
            inputs = torch.cat([r.model_input for r in requests for _ in r.texts])
            steps = torch.cat([r.timestep for r in requests for _ in r.texts])
            text = torch.cat([t for r in requests for t in r.texts])
            images = [r.image for r in requests for _ in r.texts]
            image = None if images[0] is None else torch.cat(images)  # type: ignore[arg-type]
            self.calls += 1
            rows = self._forward(inputs, steps, text, image).split(1)
            return [tuple(rows[i * texts : (i + 1) * texts]) for i in range(len(requests))]
        inputs = torch.cat([r.model_input for r in requests])
        steps = torch.cat([r.timestep for r in requests])
        image = None if requests[0].image is None else torch.cat([r.image for r in requests])  # type: ignore[misc]
        per_text = []
        for index in range(texts):
            self.calls += 1
            per_text.append(self._forward(inputs, steps, torch.cat([r.texts[index] for r in requests]), image).split(1))
        return [tuple(per_text[index][i] for index in range(texts)) for i in range(len(requests))]
