"""Opening the farm's Redis connection with an error a person can act on."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scheduler.core.errors import UserError
from scheduler.core.settings import FarmSettings


class FarmUnreachable(UserError, RuntimeError):
    pass


def redis_client(settings: FarmSettings, **options: Any) -> redis.Redis:
    """A client for the farm's Redis from its URL, with the TLS CA of ``redis_ca_file`` for ``rediss://``.

    Every connection the farm opens is made here, so TLS and auth settings apply to all of them.
    """
    url = settings.require_redis_url()
    if settings.redis_ca_file is not None and url.startswith("rediss://"):
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    return redis.Redis.from_url(url, **options)


def connect_redis(settings: FarmSettings, check: bool = True) -> redis.Redis:
    url = settings.require_redis_url()
    if settings.redis_ca_file is not None and not settings.redis_ca_file.is_file():
        raise FarmUnreachable(
            f"redis_ca_file {settings.redis_ca_file} is not a readable file: fix REELFARM_REDIS_CA_FILE"
        )
    conn = redis_client(settings, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    if check:
        try:
            # One plain probe: redis-py's default retries would take seconds to report a wrong password.
            probe = redis_client(settings, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
            probe.ping()
            probe.close()
        except redis.AuthenticationError as exc:
            raise FarmUnreachable(_auth_problem(url, str(exc))) from None
        except redis.RedisError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
                raise FarmUnreachable(
                    f"Redis at {_redact(url)} presented a TLS certificate this host does not trust ({exc}): "
                    "set REELFARM_REDIS_CA_FILE to the CA that signed it"
                ) from None
            raise FarmUnreachable(
                f"cannot reach Redis at {_redact(url)}: {exc}; start it (`reelfarm up`) or fix REELFARM_REDIS_URL"
                + ("" if url.startswith("rediss://") else " (use rediss:// if the server only speaks TLS)")
            ) from None
    return conn


def _auth_problem(url: str, detail: str) -> str:
    """One line for a refused login: no credentials given at all, or wrong ones (password or ACL user)."""
    parsed = urlsplit(url)
    if not parsed.password and not parsed.username:
        return (
            f"Redis at {_redact(url)} requires authentication and REELFARM_REDIS_URL gives none: "
            "use redis://[USER]:PASSWORD@HOST:PORT/0"
        )
    who = f"user {parsed.username!r}" if parsed.username else "the password"
    return f"Redis at {_redact(url)} refused {who} ({detail}): check REELFARM_REDIS_URL"


def _redact(url: str) -> str:
    # Never print a password into logs or terminals.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def eviction_warning(conn: redis.Redis) -> str | None:
    """A warning when Redis may evict keys: an evicted job record or room is a lost job."""
    try:
        policy = conn.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:
        return None  # CONFIG is often disabled on managed Redis; nothing to check then
    if policy and policy != "noeviction":
        return (
            f"Redis maxmemory-policy is {policy!r}: it may evict job records and queues under memory pressure; "
            "set maxmemory-policy noeviction for a farm"
        )
    return None
