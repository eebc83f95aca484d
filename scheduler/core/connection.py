"""Opening the farm's Redis connection with an error a person can act on.

``redis_url`` is ``redis://`` / ``rediss://`` for one server, or
``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]`` for a primary behind
Redis Sentinel: the client asks the sentinels where the primary is for every new connection
(redis-py's ``SentinelConnectionPool``), so after a failover the farm reconnects to the promoted
replica by itself. The password is the primary's and, as most Sentinel deployments set it, the
sentinels' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from scheduler.core.errors import UserError
from scheduler.core.settings import FarmSettings


class FarmUnreachable(UserError, RuntimeError):
    pass


SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: the sentinels, the primary's name, the database, the credentials."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT,.../MASTER_NAME[/DB]``; a bad one is a one-line error."""
    parsed = urlsplit(url)
    creds, _, hosts = parsed.netloc.rpartition("@")
    user, _, password = creds.partition(":") if creds else ("", "", "")
    path = [part for part in parsed.path.split("/") if part]
    usage = "use redis+sentinel://[:PASSWORD@]HOST:26379,HOST:26379/MASTER_NAME/0"
    if parsed.scheme != SENTINEL_SCHEME or not hosts or not path or len(path) > 2:
        raise FarmUnreachable(f"redis_url {_redact(url)} is not a Sentinel URL: {usage}")
    sentinels = []
    for entry in hosts.split(","):
        host, _, port = entry.strip().rpartition(":") if ":" in entry else (entry.strip(), "", "")
        if not host or (port and not port.isdigit()):
            raise FarmUnreachable(f"redis_url {_redact(url)}: sentinel {entry!r} is not HOST:PORT; {usage}")
        sentinels.append((host.strip("[]"), int(port) if port else DEFAULT_SENTINEL_PORT))
    if len(path) == 2 and not path[1].isdigit():
        raise FarmUnreachable(f"redis_url {_redact(url)}: database {path[1]!r} is not a number; {usage}")
    return SentinelTarget(
        tuple(sentinels),
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(user) or None,
        unquote(password) or None,
    )


def redis_client(settings: FarmSettings, **options: Any) -> redis.Redis:
    """A client for the farm's Redis from its URL, with the TLS CA of ``redis_ca_file`` for ``rediss://``.

    Every connection the farm opens is made here, so TLS, auth and Sentinel settings apply to all of them.
    """
    url = settings.require_redis_url()
    if url.startswith(SENTINEL_SCHEME + "://"):
        return sentinel_client(parse_sentinel_url(url), **options)
    if settings.redis_ca_file is not None and url.startswith("rediss://"):
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    return redis.Redis.from_url(url, **options)


def sentinel_client(target: SentinelTarget, **options: Any) -> redis.Redis:
    """A client of the primary ``target`` names; each new connection asks the sentinels where the primary is now."""
    auth = {"username": target.username, "password": target.password}
    # The sentinels are asked with the client's own timeouts and retry policy: a probe must not wait for seconds.
    sentinel_options = {
        name: options[name] for name in ("socket_connect_timeout", "socket_timeout", "retry") if name in options
    }
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs={**auth, **sentinel_options}, **auth)
    return sentinel.master_for(target.master_name, db=target.db, **options)


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
                + (
                    ""
                    if url.startswith(("rediss://", SENTINEL_SCHEME))
                    else " (use rediss:// if the server only speaks TLS)"
                )
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
