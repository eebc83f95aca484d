"""Webhooks: ``video.completed``, ``video.failed``, ``batch.completed`` and ``batch.cancelled`` events,
signed the Standard Webhooks way and delivered at least once from a durable Redis outbox.

Lifecycle (all state in Redis, so a restart of the front -- or of Valkey, with its AOF -- loses nothing):

1. a create through the API puts ``video:<id>`` / ``batch:<id>`` in the watch set;
2. ``announce_finished`` (the front's background loop) finds watched jobs and
   batches that have ended and, in one Lua script, takes the member out of the
   watch set, stores the event (id ``evt_`` + a digest of what ended, the same
   on every server) and puts one delivery per interested endpoint in the outbox
   -- at most once per event, however many fronts run the loop;
3. ``deliver_due`` claims each due delivery (a lease: another front will not
   send it meanwhile), POSTs it through the fetch policy (no private or
   link-local targets unless ``fetch.allow`` names them; redirects are not
   followed), and on a 2xx removes it; otherwise it is due again after a
   doubling backoff, up to ``http.webhook_max_attempts`` (then dropped, logged).

Each attempt carries ``webhook-id`` (the event id: receivers de-duplicate on
it), ``webhook-timestamp`` and ``webhook-signature`` = ``v1,`` + base64
HMAC-SHA256 of ``id.timestamp.body`` with the endpoint's secret (``whsec_``
+ base64 key), which ``openai``'s ``client.webhooks.unwrap`` verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from scheduler.core import keys
from scheduler.core.job_record import JobState, read_records
from scheduler.core.settings import WebhookEndpoint
from scheduler.http.errors import ApiError
from scheduler.http.state import Front
from scheduler.intake.fetch_policy import FetchPolicy, FetchRefused, post
from scheduler.intake.tenancy import OWNER_FIELD

log = logging.getLogger(__name__)

# A claimed delivery is not sent by another front for this long (longer than one POST may take).
CLAIM_SECONDS = 60.0
# At most this many deliveries per pass of the loop, so one pass stays short.
DELIVERIES_PER_PASS = 50
# A watched batch is counted (one HGET per job) at most this often: a 10,000-job batch is not read every pass.
BATCH_CHECK_SECONDS = 5.0
_MAX_ANSWER_BYTES = 64 * 1024

# KEYS: watch set, event key, outbox. ARGV: watch member, event JSON, due time, delivery members...
_ANNOUNCE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
for i = 4, #ARGV do redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[i]) end
return 1
"""
# KEYS: outbox. ARGV: delivery, now, lease end. Claims a delivery that is due.
_CLAIM = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
# KEYS: outbox, attempts, event key. ARGV: delivery, its sibling deliveries (other endpoints)...
# Ends a delivery; the event goes with its last delivery.
_FINISH = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then return 0 end
end
redis.call('DEL', KEYS[3])
return 1
"""


def event_id(subject: str, event_type: str) -> str:
    return "evt_" + hashlib.sha256(f"{subject}:{event_type}".encode()).hexdigest()[:24]


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _wants(endpoint: WebhookEndpoint, event_type: str, owner: str | None) -> bool:
    """Whether ``endpoint`` takes this event: its type is one it asked for, and, for an endpoint scoped to
    an API key (``key``), the video or batch is that key's."""
    if endpoint.key is not None and endpoint.key != owner:
        return False
    return not endpoint.events or event_type in endpoint.events


def _delivery(event: str, index: int) -> str:
    return f"{event}|{index}"


def _batch_ended(front: Front, ident: str) -> tuple[str | None, str | None]:
    """The event type of a batch that ended (None: still running) and the API key name that created it."""
    from scheduler.http.batches import batch_object

    status = batch_object(front, ident)["status"]
    owner = front.conn.hget(keys.api_batch_key(ident), OWNER_FIELD)
    event_type = {"completed": "batch.completed", "cancelled": "batch.cancelled"}.get(status)
    return event_type, owner.decode() if isinstance(owner, bytes) else None


def _video_ended_type(state: str | None) -> str | None:
    if state == JobState.SUCCEEDED:
        return "video.completed"
    return "video.failed" if state in (JobState.FAILED, JobState.CANCELLED) else None


def announce_finished(front: Front, batch_checked: dict[str, float] | None = None) -> int:
    """Turn watched jobs and batches that have ended into outbox deliveries; returns how many events.

    ``batch_checked`` (batch member -> when it was last counted) spaces out the checks of running batches.
    """
    conn, endpoints = front.conn, front.settings.http.webhooks
    checked = {} if batch_checked is None else batch_checked
    members = [m.decode() for m in conn.zrange(keys.api_watch_key(), 0, 999)]  # type: ignore[union-attr]
    videos = [m.split(":", 1)[1] for m in members if m.startswith("video:")]
    records = dict(read_records(conn, videos, ("state", OWNER_FIELD)))
    states = {job_id: (fields or {}).get("state") for job_id, fields in records.items()}
    announced = 0
    for member in members:
        kind, _, ident = member.partition(":")
        if kind == "video" and states.get(ident) is None:
            conn.zrem(keys.api_watch_key(), member)  # deleted or expired: nothing to announce
            continue
        if kind == "batch":
            if time.monotonic() - checked.get(member, float("-inf")) < BATCH_CHECK_SECONDS:
                continue
            checked[member] = time.monotonic()
        if kind == "video":
            event_type, owner = _video_ended_type(states.get(ident)), (records.get(ident) or {}).get(OWNER_FIELD)
        else:
            try:
                event_type, owner = _batch_ended(front, ident)
            except ApiError:  # the batch is gone: nothing to announce
                conn.zrem(keys.api_watch_key(), member)
                continue
        if event_type is None:
            continue
        checked.pop(member, None)
        event = event_id(member, event_type)
        body = {
            "id": event,
            "object": "event",
            "created_at": int(time.time()),
            "type": event_type,
            "data": {"id": ident},
        }
        deliveries = [_delivery(event, i) for i, e in enumerate(endpoints) if _wants(e, event_type, owner)]
        script_keys = (keys.api_watch_key(), keys.webhook_event_key(event), keys.webhook_outbox_key())
        announced += int(
            conn.eval(_ANNOUNCE, 3, *script_keys, member, json.dumps(body), repr(time.time()), *deliveries)
        )  # type: ignore[arg-type]
    return announced


def _finish(front: Front, delivery: str, event: str) -> None:
    siblings = [d for d in (_delivery(event, i) for i in range(len(front.settings.http.webhooks))) if d != delivery]
    script_keys = (keys.webhook_outbox_key(), keys.webhook_attempts_key(), keys.webhook_event_key(event))
    front.conn.eval(_FINISH, 3, *script_keys, delivery, *siblings)


def deliver_due(front: Front, send: Callable[..., int] = post) -> int:
    """Send the deliveries that are due; returns how many were accepted (2xx) by their receivers."""
    settings, conn = front.settings.http, front.conn
    now = time.time()
    due = [m.decode() for m in conn.zrangebyscore(keys.webhook_outbox_key(), "-inf", repr(now), 0, DELIVERIES_PER_PASS)]  # type: ignore[union-attr]
    policy = FetchPolicy.from_settings(front.settings.fetch, _MAX_ANSWER_BYTES)
    accepted = 0
    for delivery in due:
        claimed = conn.eval(_CLAIM, 1, keys.webhook_outbox_key(), delivery, repr(now), repr(now + CLAIM_SECONDS))
        if not int(claimed):  # type: ignore[arg-type]
            continue
        event, _, index_text = delivery.rpartition("|")
        body = conn.get(keys.webhook_event_key(event))
        if body is None or not index_text.isdigit() or int(index_text) >= len(settings.webhooks):
            _finish(front, delivery, event)  # its event or endpoint is gone (settings changed): nothing to send
            continue
        endpoint = settings.webhooks[int(index_text)]
        if _attempt(endpoint, event, body, policy, send):  # type: ignore[arg-type]
            _finish(front, delivery, event)
            accepted += 1
            continue
        attempts = int(conn.hincrby(keys.webhook_attempts_key(), delivery, 1))  # type: ignore[arg-type]
        if attempts >= settings.webhook_max_attempts:
            log.error("webhook %s to %s dropped after %d attempts", event, endpoint.url, attempts)
            _finish(front, delivery, event)
            continue
        delay = min(settings.webhook_backoff_seconds * 2 ** (attempts - 1), settings.webhook_max_backoff_seconds)
        conn.zadd(keys.webhook_outbox_key(), {delivery: time.time() + delay}, xx=True)
    return accepted


def _attempt(endpoint: WebhookEndpoint, event: str, body: bytes, policy: FetchPolicy, send: Callable[..., int]) -> bool:
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": event,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(endpoint.secret, event, timestamp, body),
    }
    try:
        status = send(endpoint.url, body, headers, policy)
    except FetchRefused as exc:
        log.warning("webhook %s not delivered: %s", event, exc)
        return False
    if not 200 <= status < 300:
        log.warning("webhook %s: %s answered HTTP %d; retrying later", event, endpoint.url, status)
    return 200 <= status < 300


def background_tasks(front: Front) -> list[Callable[[], Any]]:
    if not front.settings.http.webhooks:
        return []
    batch_checked: dict[str, float] = {}
    return [lambda: announce_finished(front, batch_checked), lambda: deliver_due(front)]
