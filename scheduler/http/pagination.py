"""OpenAI's cursor pages: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``; the next page is
asked for with ``after=<last_id>`` (what the SDK's auto-paging does)."""

from __future__ import annotations

from typing import Any


def ids_after(ids: list[str], after: str | None) -> list[str]:
    """The ids that follow ``after`` (all of them without it; none for an id not in the list)."""
    if after is None:
        return ids
    return ids[ids.index(after) + 1 :] if after in ids else []


def cursor_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
