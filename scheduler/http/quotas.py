"""Per-key quotas of user API keys (``http.api_keys[].quota``, else ``http.user_quota``); admin keys have none.

Over a quota a create answers 429 in OpenAI's error shape and nothing is written or enqueued:

- ``max_frame_pixels`` (frames x width x height of one job) and ``max_batch_lines``: retrying the same
  request can never pass, so the 429 says ``x-should-retry: false`` (the openai SDK then does not retry)
  and names the limit;
- ``max_submits_per_minute`` (video and batch creates): a fixed one-minute window per key, counted in
  one Lua script (check and count together, so concurrent creates cannot both take the last one);
  ``Retry-After`` is the seconds to the next window;
- ``max_active_jobs`` (queued + running): a single create over it gets ``Retry-After``; a batch is not
  refused for it but held back at admission (``admission``), so the limit is also the most of one key's
  jobs any other key's job can find queued ahead of it. Two creates racing for the last slot may both
  pass (count, then submit, is not one transaction): the window can be exceeded by the number of a key's
  concurrent creates, never by a batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

from scheduler.core import keys
from scheduler.core.settings import KeyQuota
from scheduler.core.spec import parse_spec
from scheduler.http.auth import Caller
from scheduler.http.errors import ApiError
from scheduler.http.state import Front
from scheduler.intake.tenancy import count_active

RATE_LIMIT_ERROR = "rate_limit_error"
# A full admission window frees up as the key's jobs finish; ask again after about one short job.
ACTIVE_RETRY_SECONDS = 10
# KEYS: the minute's counter. ARGV: the limit. Counts the create only if it is within the limit.
_TAKE_SUBMIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], 120) end
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return 0 end
return 1
"""


def _refused(message: str, code: str, retry_after: int | None, param: str | None = None) -> ApiError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {"x-should-retry": "false"}
    return ApiError(429, message, param=param, code=code, error_type=RATE_LIMIT_ERROR, headers=headers)


def _take_submit(front: Front, caller: Caller, quota: KeyQuota) -> None:
    now = time.time()
    minute = int(now // 60)
    taken = front.conn.eval(_TAKE_SUBMIT, 1, keys.api_owner_rate_key(caller.name, minute), quota.max_submits_per_minute)
    if not int(taken):  # type: ignore[arg-type]
        wait = max(1, math.ceil((minute + 1) * 60 - now))
        raise _refused(
            f"API key {caller.name!r} is over its quota of {quota.max_submits_per_minute} creates per minute; "
            f"retry after {wait} s",
            "rate_limit_exceeded",
            wait,
        )


def check_job_quota(front: Front, caller: Caller, raw_spec: dict[str, Any]) -> None:
    """Refuse one video create over ``caller``'s quota (429); counts it against the per-minute quota."""
    quota = caller.quota
    if quota is None:
        return
    settings = front.settings
    spec = parse_spec(raw_spec, settings.limits, settings.spec_defaults)
    pixels = spec.frames * spec.width * spec.height
    if pixels > quota.max_frame_pixels:
        raise _refused(
            f"a {spec.frames}-frame {spec.width}x{spec.height} job is {pixels:,} frame-pixels, over API key "
            f"{caller.name!r}'s quota of {quota.max_frame_pixels:,}; ask for fewer seconds or a smaller size",
            "job_too_large",
            None,
            param="size",
        )
    active = count_active(front.conn, caller.name)
    if active >= quota.max_active_jobs:
        raise _refused(
            f"API key {caller.name!r} has {active} jobs queued or running, its quota is {quota.max_active_jobs}; "
            f"retry once some finish (or submit a batch, which waits its turn)",
            "too_many_active_jobs",
            ACTIVE_RETRY_SECONDS,
        )
    _take_submit(front, caller, quota)


def check_batch_lines(caller: Caller, lines: int) -> None:
    """Refuse a whole batch of more lines than ``caller``'s quota (429), before any line is parsed."""
    quota = caller.quota
    if quota is not None and lines > quota.max_batch_lines:
        raise _refused(
            f"the batch has {lines:,} requests, over API key {caller.name!r}'s quota of {quota.max_batch_lines:,} "
            "lines per batch; split the input file",
            "batch_too_large",
            None,
            param="input_file_id",
        )


def check_batch_quota(front: Front, caller: Caller, largest_pixels: int) -> None:
    """Refuse a whole parsed batch over ``caller``'s quota (429): a line too large, or too many creates."""
    quota = caller.quota
    if quota is None:
        return
    if largest_pixels > quota.max_frame_pixels:
        raise _refused(
            f"a line of the batch is {largest_pixels:,} frame-pixels, over API key {caller.name!r}'s quota of "
            f"{quota.max_frame_pixels:,} per job; ask for fewer seconds or a smaller size",
            "job_too_large",
            None,
            param="input_file_id",
        )
    _take_submit(front, caller, quota)
