"""Opening the farm's Redis connection with an error a person can act on."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scheduler.core.errors import UserError
from scheduler.core.settings import FarmSettings


class FarmUnreachable(UserError, RuntimeError):
    pass


def connect_redis(settings: FarmSettings, check: bool = True) -> redis.Redis:
    url = settings.require_redis_url()
    conn = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    if check:
        try:
            # One plain probe: redis-py's default retries would take seconds to report a wrong password.
            probe = redis.Redis.from_url(url, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))
            probe.ping()
            probe.close()
        except redis.AuthenticationError:
            raise FarmUnreachable(f"Redis at {_redact(url)} refused the password: check REELFARM_REDIS_URL") from None
        except redis.RedisError as exc:
            raise FarmUnreachable(
                f"cannot reach Redis at {_redact(url)}: {exc}; start it (`reelfarm up`) or fix REELFARM_REDIS_URL"
            ) from None
    return conn


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
