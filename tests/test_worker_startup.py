"""A worker refuses to start, with one line saying what to fix, when it could only fail later on another host:
no farm secret, an advertised transfer address that is not its own, a Redis that needs credentials it lacks."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest

from scheduler.core.connection import FarmUnreachable, connect_redis
from scheduler.core.settings import FarmSettings
from workers.advertised_address import AdvertisedAddressError, check_advertised_address

# TEST-NET-1 (RFC 5737): never assigned to a real interface.
FOREIGN = "192.0.2.7"


def test_own_addresses_pass_and_foreign_ones_are_refused_unless_nat_is_allowed() -> None:
    assert check_advertised_address("127.0.0.1") is None
    assert check_advertised_address("localhost") is None
    with pytest.raises(AdvertisedAddressError, match="not an address of this host.*REELFARM_TRANSFER_ALLOW_NAT"):
        check_advertised_address(FOREIGN)
    warning = check_advertised_address(FOREIGN, allow_nat=True)
    assert warning is not None and "NAT must forward" in warning
    with pytest.raises(AdvertisedAddressError, match="wildcard"):
        check_advertised_address("0.0.0.0", allow_nat=True)
    with pytest.raises(AdvertisedAddressError, match="does not resolve"):
        check_advertised_address("no-such-host.invalid")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))


def test_redis_login_refusals_say_what_is_missing(redis_url: str) -> None:
    with pytest.raises(FarmUnreachable, match="requires authentication and REELFARM_REDIS_URL gives none"):
        connect_redis(FarmSettings(redis_url=_without_credentials(redis_url)))
    wrong = redis_url.replace("://:", "://:wrong", 1)
    with pytest.raises(FarmUnreachable, match="refused the password"):
        connect_redis(FarmSettings(redis_url=wrong))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REELFARM_SECRET": ""}, "no farm secret configured: set REELFARM_SECRET"),
        ({"REELFARM_TRANSFER_HOSTNAME": FOREIGN}, f"transfer hostname {FOREIGN} is not an address of this host"),
        ({"REELFARM_REDIS_URL": "no credentials"}, "requires authentication and REELFARM_REDIS_URL gives none"),
    ],
    ids=["no secret", "foreign address", "no credentials"],
)
def test_worker_refuses_to_start_with_one_line(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    expected: str,
) -> None:
    from workers.__main__ import main

    settings = {"REELFARM_REDIS_URL": redis_url, "REELFARM_SECRET": "s", **env}
    if settings["REELFARM_REDIS_URL"] == "no credentials":
        settings["REELFARM_REDIS_URL"] = _without_credentials(redis_url)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    # The worker's entry point in this process (a subprocess would pay the worker's imports once per case).
    assert main(["encode"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reelfarm worker encode: cannot start: "), lines
    assert expected in lines[0]
