"""Pytest fixtures backed by real servers: one Valkey and one SeaweedFS S3 server per test session.

``tests/conftest.py`` loads this module once for the whole suite through
``pytest_plugins`` (importing the fixtures in a second place, e.g. another
conftest, would make a second set of session servers).

- ``valkey_server`` (session): ``ValkeyService`` -- ``url`` (with the password),
  ``password``, ``server`` (the ``ManagedServer``).
- ``redis_url`` (function): the same URL, after a ``FLUSHALL``.
- ``tls_redis`` (session): ``TlsRedis`` -- Debian's redis-server on a TLS-only port with an ACL user
  (``url()``, ``ca_file``); the default user is off.
- ``s3_server`` (session): ``S3Service`` -- ``endpoint_url``, keys, ``server``,
  ``config(bucket)``.
- ``s3_config`` (function): an ``S3Config`` naming a fresh, empty bucket that is
  removed (objects, incomplete uploads and all) after the test.
- ``s3_client`` (function): a client for ``s3_config``.

A server is started the first time a test asks for it, and stopped at the end
of the session.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from scheduler.core.object_store import S3Config, ensure_bucket, make_s3_client, remove_bucket
from scheduler.local.processes import ManagedServer
from scheduler.local.seaweedfs import start_s3_server
from scheduler.local.valkey import start_valkey
from tests.tls_redis import TlsRedis, start_tls_redis


@dataclass(frozen=True)
class ValkeyService:
    url: str
    password: str
    server: ManagedServer


@dataclass(frozen=True)
class S3Service:
    endpoint_url: str
    access_key: str
    secret_key: str
    server: ManagedServer

    def config(self, bucket: str) -> S3Config:
        return S3Config(self.endpoint_url, bucket, self.access_key, self.secret_key)


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyService]:
    password = secrets.token_hex(16)
    server = start_valkey(tmp_path_factory.mktemp("valkey"), None, password)
    try:
        yield ValkeyService(f"redis://:{password}@127.0.0.1:{server.port}/0", password, server)
    finally:
        server.stop()


@pytest.fixture
def redis_url(valkey_server: ValkeyService) -> str:
    conn = redis.Redis.from_url(valkey_server.url)
    try:
        conn.flushall()
    finally:
        conn.close()
    return valkey_server.url


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A Redis that speaks only TLS (CA in ``ca_file``) and admits only its ACL user (``url()``)."""
    server = start_tls_redis(tmp_path_factory.mktemp("redis-tls"), secrets.token_hex(16))
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    access_key, secret_key = "reelfarm-test", secrets.token_hex(16)
    server = start_s3_server(tmp_path_factory.mktemp("s3"), None, access_key, secret_key)
    try:
        yield S3Service(server.url, access_key, secret_key, server)
    finally:
        server.stop()


@pytest.fixture
def s3_config(s3_server: S3Service) -> Iterator[S3Config]:
    # S3 bucket names: 3-63 characters, lowercase letters, digits and hyphens.
    cfg = s3_server.config(f"test-{uuid.uuid4().hex[:16]}")
    client = make_s3_client(cfg)
    ensure_bucket(client, cfg.bucket)
    try:
        yield cfg
    finally:
        remove_bucket(client, cfg.bucket)


@pytest.fixture
def s3_client(s3_config: S3Config) -> Any:
    return make_s3_client(s3_config)
