"""Which videos, files and batches a caller may see: its own (user keys), or all of them (admin keys).

Every object the front creates records the creating key's name (``owner``); a user key's lists read its
own per-key index, and a lookup of an id it does not own answers the same 404 as an id that never existed
(not 403: an id must not be an oracle for what other tenants made). Admin keys read the farm-wide indexes,
which hold CLI and cron work too.
"""

from __future__ import annotations

from typing import Literal

from scheduler.core import keys
from scheduler.http.auth import Caller
from scheduler.http.errors import ApiError

Kind = Literal["videos", "files", "batches"]
_FARM_INDEX = {"videos": keys.jobs_index_key, "files": keys.api_files_index_key, "batches": keys.api_batches_index_key}


def index_for(caller: Caller, kind: Kind) -> str:
    """The sorted set of ids ``caller``'s list of ``kind`` reads."""
    return _FARM_INDEX[kind]() if caller.admin else keys.api_owner_index_key(caller.name, kind)


def indexes_to_write(owner: str | None, kind: Kind) -> list[str]:
    """Where a new object of ``kind`` is listed: the farm-wide index, and its owner's."""
    return [_FARM_INDEX[kind](), *([keys.api_owner_index_key(owner, kind)] if owner else [])]


def ensure_visible(caller: Caller | None, owner: str | None, error: ApiError) -> None:
    """Raise ``error`` (the kind's 404) unless ``caller`` may see an object ``owner`` created.

    ``caller`` None: the front's own background work (webhooks, finalizing), which sees everything.
    """
    if caller is not None and not caller.may_see(owner):
        raise error
