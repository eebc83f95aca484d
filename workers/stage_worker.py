"""The rq worker class of a stage: non-forking, and it takes a job only when a slot is free.

Non-forking (rq's SimpleWorker) keeps the model resident across jobs. The
backpressure rule sits in front of rq's dequeue: a producer whose slots are all
held for consumers does not pop a job it could not hand off, leaving it queued
for a worker that can.
"""

from __future__ import annotations

from typing import Any

from scheduler.queues import SimpleWorker
from workers.runtime import StageRuntime


class WarmExit(SystemExit):
    """SIGTERM on an idle worker: leave now (after draining held outputs); there is no job to finish."""


class StageWorker(SimpleWorker):  # type: ignore[misc]
    runtime: StageRuntime

    def request_stop(self, signum: int, frame: Any) -> None:
        # rq signals an idle stop with an Exception subclass, which redis-py turns into a
        # ConnectionError when it lands inside a reconnect during a Redis outage -- rq then
        # retries forever and the stop is lost. A SystemExit passes through both.
        if self.get_state() != "busy":
            # Remembered too: rq's teardown may replace the exit with a ConnectionError during an outage.
            self._stop_requested = True
            raise WarmExit(0)
        super().request_stop(signum, frame)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        while self.runtime.produces and not self.runtime.wait_for_free_slot(timeout=1.0):
            self.heartbeat()
            if self._stop_requested:
                return None
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
