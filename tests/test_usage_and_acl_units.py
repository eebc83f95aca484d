"""Small pure pieces of issue 26: ``--since`` durations, and the ACL file's shape (no clear passwords,
the default user off, no service role with server-wide commands)."""

from __future__ import annotations

import pytest

from scheduler.ops.redis_acl import ROLES, new_passwords, password_digest, render_acl, role_url
from scheduler.ops.usage import UsageError, parse_since


def test_since_durations() -> None:
    assert parse_since("7d") == 7 * 86400 and parse_since("24h") == 86400 and parse_since("1.5m") == 90
    with pytest.raises(UsageError, match="write a duration like 7d"):
        parse_since("a week")


def test_acl_file_holds_digests_only_and_switches_the_default_user_off() -> None:
    passwords = new_passwords()
    text = render_acl(passwords)
    assert all(p not in text and f"#{password_digest(p)}" in text for p in passwords.values())
    lines = text.splitlines()
    assert all(line.startswith("user ") for line in lines)  # an ACL file may hold nothing else
    assert lines[-1].startswith("user default off")
    services = [r for r in ROLES if r.name != "admin"]
    assert all("-@admin" in r.commands or "+@all" not in r.commands for r in services)
    keda = next(r for r in ROLES if r.name == "keda")
    assert keda.read_write == () and keda.read_only == ("reelfarm:demand:*",)
    assert role_url("redis://:old@h:6379/0", "http", "pw") == "redis://http:pw@h:6379/0"
