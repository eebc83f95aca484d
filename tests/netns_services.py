"""``python -m tests.netns_services DIR HOST``: the multi-host test's Valkey and S3 server, bound to HOST.

Run inside the test's server namespace (``ip netns exec``), so the servers' own readiness checks reach
them there. Writes ``DIR/ready.json`` (URLs, keys, pids) once both answer; stops both on SIGTERM.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import threading
from pathlib import Path

from scheduler.local.processes import write_private
from scheduler.local.seaweedfs import start_s3_server
from scheduler.local.valkey import start_valkey


def main(argv: list[str]) -> int:
    folder, host = Path(argv[0]), argv[1]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    password, access_key, secret_key = secrets.token_hex(16), "reelfarm-netns", secrets.token_hex(16)
    valkey = start_valkey(folder / "valkey", None, password, host=host, detach=False)
    try:
        s3 = start_s3_server(folder / "s3", None, access_key, secret_key, host=host, detach=False)
        try:
            ready = {
                "redis_url": f"redis://:{password}@{host}:{valkey.port}/0",
                "s3_endpoint": s3.url,
                "access_key": access_key,
                "secret_key": secret_key,
                "pids": [valkey.pid, s3.pid],
            }
            write_private(folder / "ready.json", json.dumps(ready))
            stop.wait()
        finally:
            s3.stop()
    finally:
        valkey.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
