"""Running the HTTP front: uvicorn serving ``create_app``, plus the front's one background loop.

The loop (``Housekeeper``, one thread) does what must happen after a request
has been answered: remove deleted jobs' objects once they have stopped, turn
finished watched jobs and batches into webhook events, deliver due events, and admit user keys'
held-back batch lines as their windows free up (``admission``).
All of its state is in Redis, so a restarted server picks up where the last one
stopped, and several servers may run it at once (each step is claimed atomically).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import uvicorn

from scheduler.core.settings import FarmSettings
from scheduler.http.app import create_app
from scheduler.http.state import Front
from scheduler.ops.job_removal import sweep_deleted

log = logging.getLogger(__name__)


class Housekeeper(threading.Thread):
    def __init__(self, front: Front, tasks: list[Callable[[], object]], interval: float) -> None:
        super().__init__(name="reelfarm-http-housekeeper", daemon=True)
        self.tasks = tasks
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            for task in self.tasks:
                try:
                    task()
                except Exception:  # noqa: BLE001 - one failed pass (Redis or S3 away) must not end the loop
                    log.exception("background task %s failed; retrying next pass", getattr(task, "__name__", task))

    def stop(self) -> None:
        self.stopping.set()


def housekeeping_tasks(front: Front) -> list[Callable[[], object]]:
    from scheduler.http import admission, webhooks

    def sweep() -> int:
        return sweep_deleted(front.conn, front.settings, front.s3)

    def release() -> int:
        return admission.release_held(front)

    # Announce before sweeping: a job deleted after it ended still gets its event.
    return [release, *webhooks.background_tasks(front), sweep]


def serve(settings: FarmSettings, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and finishes open requests)."""
    front = Front.from_settings(settings)
    app = create_app(settings, front)
    keeper = Housekeeper(front, housekeeping_tasks(front), settings.http.watch_interval_seconds)
    keeper.start()
    try:
        uvicorn.run(
            app,
            host=host or settings.http.host,
            port=settings.http.port if port is None else port,
            log_level="info",
            access_log=False,
        )
    finally:
        keeper.stop()
