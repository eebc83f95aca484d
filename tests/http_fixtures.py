"""A real farm behind a real HTTP front, shared by the HTTP test modules: its own Valkey (so other tests'
FLUSHALLs never touch it, and a test may restart it), SeaweedFS, three workers serving the tiny t2v and i2v
models, ``python -m scheduler.http`` on a loopback port, and a webhook receiver on loopback that the front's
settings name (allowlisted in ``fetch.allow``). Loaded by ``pytest_plugins``.

``http_farm`` (session scope: started once, ~30 s, for every HTTP test module) gives ``HttpFarm``: settings,
a Redis connection, the base URL, the (admin) API key, user keys (team-a and team-b; team-c for the usage test, team-fuzz for the fuzz test; ``extra["user_keys"]``, a webhook
receiver scoped to team-a in ``extra["team_a_receiver"]``), ``client()`` (the official ``openai`` SDK pointed at the
front), ``request()`` for raw HTTP, ``restart_front()``, ``restart_valkey()`` and ``receiver``. Its specs are
small (64x48, 2 steps) so a video renders in a few seconds on a CPU.
"""

from __future__ import annotations

import base64
import http.client
import secrets
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.core.keys import Stage
from scheduler.core.object_store import ensure_bucket, make_s3_client, remove_bucket
from scheduler.core.settings import (
    ApiKeyEntry,
    FarmSettings,
    FetchSettings,
    HttpSettings,
    KeyQuota,
    WebhookEndpoint,
    api_key_hash,
)
from scheduler.local.embedded import start_http_front
from scheduler.local.processes import ManagedServer, free_port, stop_child
from scheduler.local.valkey import start_valkey
from tests.farm_harness import WorkerFleet, farm_settings
from tests.service_fixtures import S3Service

HTTP_SPEC_DEFAULTS: dict[str, Any] = {"width": 64, "height": 48, "frames": 17, "steps": 2, "fps": 16}
# The shared farm's user keys and their quotas (the unnamed api_key is its admin key).
TENANTS = {"team-a": KeyQuota(max_active_jobs=1), "team-b": KeyQuota(), "team-c": KeyQuota(), "team-fuzz": KeyQuota()}


class WebhookReceiver:
    """A loopback HTTP endpoint that records every POST; ``accepting = False`` makes it answer 503 (down)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.accepting = True
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.accepting:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200 if receiver.accepting else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/reelfarm"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class HttpFarm:
    settings: FarmSettings
    conn: redis.Redis
    api_key: str
    valkey: ManagedServer
    receiver: WebhookReceiver
    webhook_secret: str
    front: subprocess.Popen[bytes] | None = None
    fleet: WorkerFleet | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.http.host}:{self.settings.http.port}"

    def client(self, api_key: str | None = None, **options: Any) -> Any:
        from openai import OpenAI

        return OpenAI(api_key=api_key or self.api_key, base_url=self.base_url + "/v1", max_retries=0, **options)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request (for what an SDK does not send: ranges, bad keys, oversized bodies)."""
        conn = http.client.HTTPConnection(self.settings.http.host, self.settings.http.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def start_front(self) -> None:
        self.front = start_http_front(self.settings, self.settings.home / "logs")

    def stop_front(self) -> None:
        if self.front is not None:
            stop_child(self.front, 20.0)
            self.front = None

    def restart_front(self) -> None:
        self.stop_front()
        self.start_front()

    def restart_valkey(self) -> None:
        """Stop Valkey (a clean shutdown writes its AOF) and start it again on the same port and data."""
        self.valkey.stop()
        self.valkey = start_valkey(self.valkey.data_dir, self.valkey.port, self.extra["valkey_password"])

    def front_log(self) -> str:
        path = self.settings.home / "logs" / "http.log"
        return path.read_text()[-4000:] if path.exists() else ""


def make_http_farm(s3: S3Service, t2v: Path, i2v: Path, home: Path) -> Iterator[HttpFarm]:
    password = secrets.token_hex(16)
    valkey = start_valkey(home / "valkey", None, password)
    url = f"redis://:{password}@127.0.0.1:{valkey.port}/0"
    conn = redis.Redis.from_url(url)
    bucket = s3.config(f"http-{uuid.uuid4().hex[:12]}")
    client = make_s3_client(bucket)
    ensure_bucket(client, bucket.bucket)
    receiver = WebhookReceiver()
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    api_key = "rf-test-" + secrets.token_urlsafe(16)
    # Two tenants beside the admin key: team-a's window of one job is what the fairness test needs.
    user_keys = {name: "rf-test-" + secrets.token_urlsafe(16) for name in TENANTS}
    team_a_receiver = WebhookReceiver()
    http = HttpSettings(
        port=free_port(),
        api_key_hashes=[api_key_hash(api_key)],
        api_keys=[
            ApiKeyEntry(name=name, hash=api_key_hash(key), quota=TENANTS[name]) for name, key in user_keys.items()
        ],
        watch_interval_seconds=0.2,
        webhooks=[
            WebhookEndpoint(url=receiver.url, secret=webhook_secret),
            WebhookEndpoint(url=team_a_receiver.url, secret=webhook_secret, key="team-a"),
        ],
        webhook_backoff_seconds=0.2,
        webhook_max_backoff_seconds=1.0,
        # Retries every second or so; enough attempts to outlast the restarts a test puts in between.
        webhook_max_attempts=300,
    )
    settings = farm_settings(
        url,
        bucket,
        t2v,
        home,
        models={"i2v": i2v},
        spec_defaults=HTTP_SPEC_DEFAULTS,
        http=http,
        fetch=FetchSettings(allow=["127.0.0.1"]),
    )
    farm = HttpFarm(settings, conn, api_key, valkey, receiver, webhook_secret, fleet=WorkerFleet(settings))
    farm.extra.update(valkey_password=password, user_keys=user_keys, team_a_receiver=team_a_receiver)
    try:
        farm.fleet.start(*Stage)  # type: ignore[union-attr]
        farm.start_front()
        yield farm
    finally:
        farm.stop_front()
        farm.fleet.stop_all()  # type: ignore[union-attr]
        receiver.stop()
        team_a_receiver.stop()
        remove_bucket(client, bucket.bucket)
        conn.close()
        farm.valkey.stop()


@pytest.fixture(scope="session")
def http_farm(
    s3_server: S3Service, tiny_model_dir: Path, tiny_i2v_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpFarm]:
    yield from make_http_farm(s3_server, tiny_model_dir, tiny_i2v_model_dir, tmp_path_factory.mktemp("http-farm"))
