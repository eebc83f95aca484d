"""A real farm behind a real HTTP front, shared by a test module: Valkey, SeaweedFS, three workers serving
the tiny t2v and i2v models, and ``python -m scheduler.http`` on a loopback port (loaded by ``pytest_plugins``).

``http_farm`` (module scope) gives ``HttpFarm``: settings, a Redis connection, the base URL, the API key,
``client()`` (the official ``openai`` SDK pointed at the front) and ``restart_front()``. Its specs are small
(64x48, 2 steps) so a video renders in a few seconds on a CPU.
"""

from __future__ import annotations

import http.client
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from scheduler.core.keys import Stage
from scheduler.core.object_store import ensure_bucket, make_s3_client, remove_bucket
from scheduler.core.settings import FarmSettings, HttpSettings, api_key_hash
from scheduler.local.embedded import start_http_front
from scheduler.local.processes import free_port, stop_child
from tests.farm_harness import WorkerFleet, farm_settings
from tests.service_fixtures import S3Service, ValkeyService

HTTP_SPEC_DEFAULTS: dict[str, Any] = {"width": 64, "height": 48, "frames": 17, "steps": 2, "fps": 16}


@dataclass
class HttpFarm:
    settings: FarmSettings
    conn: redis.Redis
    api_key: str
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

    def front_log(self) -> str:
        path = self.settings.home / "logs" / "http.log"
        return path.read_text()[-4000:] if path.exists() else ""


def make_http_farm(
    valkey: ValkeyService, s3: S3Service, t2v: Path, i2v: Path, home: Path, **http_overrides: Any
) -> Iterator[HttpFarm]:
    conn = redis.Redis.from_url(valkey.url)
    conn.flushall()
    bucket = s3.config(f"http-{uuid.uuid4().hex[:12]}")
    client = make_s3_client(bucket)
    ensure_bucket(client, bucket.bucket)
    api_key = "rf-test-" + secrets.token_urlsafe(16)
    http = HttpSettings(port=free_port(), api_key_hashes=[api_key_hash(api_key)], watch_interval_seconds=0.2)
    settings = farm_settings(
        valkey.url,
        bucket,
        t2v,
        home,
        models={"i2v": i2v},
        spec_defaults=HTTP_SPEC_DEFAULTS,
        http=http.model_copy(update=http_overrides),
    )
    farm = HttpFarm(settings, conn, api_key, fleet=WorkerFleet(settings))
    try:
        farm.fleet.start(*Stage)  # type: ignore[union-attr]
        farm.start_front()
        yield farm
    finally:
        farm.stop_front()
        farm.fleet.stop_all()  # type: ignore[union-attr]
        remove_bucket(client, bucket.bucket)
        conn.close()


@pytest.fixture(scope="module")
def http_farm(
    valkey_server: ValkeyService,
    s3_server: S3Service,
    tiny_model_dir: Path,
    tiny_i2v_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HttpFarm]:
    yield from make_http_farm(
        valkey_server, s3_server, tiny_model_dir, tiny_i2v_model_dir, tmp_path_factory.mktemp("http-farm")
    )
