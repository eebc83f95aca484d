"""``redis+sentinel://`` URLs: what the one connection factory makes of them, and one-line refusals of bad ones.

The failover itself runs against real Sentinels in ``tests/test_failover.py``.
"""

from __future__ import annotations

import pytest

from scheduler.core.connection import FarmUnreachable, SentinelTarget, parse_sentinel_url, redis_client
from scheduler.core.settings import FarmSettings


def test_a_sentinel_url_names_the_sentinels_the_primary_the_database_and_the_password() -> None:
    url = "redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/farm-primary/2"
    assert parse_sentinel_url(url) == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        master_name="farm-primary",
        db=2,
        username=None,
        password="s@cret",
    )
    assert parse_sentinel_url("redis+sentinel://farmer:pw@h:1/m").username == "farmer"
    assert parse_sentinel_url("redis+sentinel://h:1/m").db == 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://:pw@h:26379", "not a Sentinel URL"),
        ("redis+sentinel://:pw@h:port/m/0", "is not HOST:PORT"),
        ("redis+sentinel://:pw@h:26379/m/zero", "is not a number"),
    ],
)
def test_a_bad_sentinel_url_is_refused_in_one_line_without_its_password(url: str, says: str) -> None:
    with pytest.raises(FarmUnreachable) as refused:
        parse_sentinel_url(url)
    message = str(refused.value)
    assert says in message and "\n" not in message and "pw" not in message
    assert "redis+sentinel://[:PASSWORD@]HOST:26379" in message


def test_the_connection_factory_builds_a_client_that_asks_the_sentinels() -> None:
    settings = FarmSettings(redis_url="redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/farm/0")
    client = redis_client(settings, socket_connect_timeout=0.2)
    pool = client.connection_pool
    assert type(pool).__name__ == "SentinelConnectionPool" and pool.service_name == "farm"  # type: ignore[attr-defined]
    assert [(c.connection_pool.connection_kwargs["port"]) for c in pool.sentinel_manager.sentinels] == [1, 2]  # type: ignore[attr-defined]
