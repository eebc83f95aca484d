"""What every route of the HTTP front shares: the farm's settings, one Redis connection pool, one S3 client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis
from fastapi import Request

from scheduler.core.connection import connect_redis
from scheduler.core.settings import FarmSettings
from scheduler.http.auth import ApiKeys, Caller


@dataclass
class Front:
    settings: FarmSettings
    conn: redis.Redis
    keys: ApiKeys
    _s3: Any = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: FarmSettings) -> Front:
        return cls(settings, connect_redis(settings), ApiKeys(settings.http))

    @property
    def s3(self) -> Any:
        # Made on first use: a front whose store is down still answers /healthz and status reads.
        if self._s3 is None:
            self._s3 = self.settings.s3.client()
        return self._s3


def front_of(request: Request) -> Front:
    return request.app.state.front  # type: ignore[no-any-return]


def require_key(request: Request) -> None:
    """Route dependency: a 401 in OpenAI's shape unless the request carries an accepted API key;
    the key's caller is kept on the request for the route (``caller_of``)."""
    request.state.caller = front_of(request).keys.check(request)


def caller_of(request: Request) -> Caller:
    return request.state.caller  # type: ignore[no-any-return]
