"""``python -m scheduler.http``: the HTTP front with the farm's settings (``REELFARM_CONFIG`` / env), as
``reelfarm up`` starts it."""

from __future__ import annotations

from scheduler.core.logging_setup import configure_logging
from scheduler.core.settings import load_settings
from scheduler.http.server import serve

if __name__ == "__main__":
    configure_logging()
    serve(load_settings())
