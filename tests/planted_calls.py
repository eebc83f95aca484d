"""Functions a hostile Redis writer could name in a planted rq job; each leaves a marker file if it ever runs.

Worker processes in the side-door tests get this repository on PYTHONPATH, so if
a worker ever imported and called what a planted job names, the import would
succeed and the marker would appear: the tests can fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def touch(path: str) -> None:
    Path(path).write_text("the planted call ran")


def touch_from_meta(job: Any, *args: Any, **kwargs: Any) -> None:
    """An rq callback (success, failure or stopped): called with the job first."""
    Path(job.meta["marker"]).write_text("the planted callback ran")
