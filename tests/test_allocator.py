"""workers.allocator: glibc's trim threshold is set where it can be, and an operator's choice is kept."""

from __future__ import annotations

import platform

import pytest

from workers.allocator import ENV_OVERRIDE, return_freed_memory_promptly


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; this C library is not")
def test_the_trim_threshold_is_set_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)
    assert return_freed_memory_promptly() is True


def test_an_operators_malloc_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_OVERRIDE, "131072")
    assert return_freed_memory_promptly() is False
