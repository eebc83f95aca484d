"""Webhooks from the HTTP front to a loopback receiver (issue 14): signed events, delivered at least once from
the Redis outbox -- each exactly once after de-duplication on ``webhook-id`` -- including when the front and
Valkey restart between a job's end and the delivery; a wrong secret fails the receiver's check."""

from __future__ import annotations

import json

import pytest

from scheduler.core import keys
from scheduler.http.webhooks import event_id
from scheduler.ops.job_admin import cancel_job
from tests.farm_harness import wait_until
from tests.http_fixtures import HttpFarm

pytestmark = pytest.mark.slow


def events_for(farm: HttpFarm, subject: str) -> list[tuple[dict[str, str], bytes]]:
    return [(h, b) for h, b in farm.receiver.received if json.loads(b)["data"]["id"] == subject]


def test_events_survive_a_front_and_valkey_restart_and_arrive_once_after_dedup(http_farm: HttpFarm) -> None:
    from openai import InvalidWebhookSignatureError

    client = http_farm.client()
    http_farm.receiver.accepting = False  # the receiver is down: deliveries stay in the outbox
    done = client.videos.create_and_poll(prompt="a fox for the hook", seconds="1", poll_interval_ms=200)
    stopped = client.videos.create(prompt="a fox that never renders", seconds="1", extra_body={"steps": 40})
    cancel_job(http_farm.conn, stopped.id)
    batch_file = client.files.create(
        file=(
            "one.jsonl",
            json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/videos", "body": {"prompt": "x"}}).encode(),
        ),
        purpose="batch",
    )
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/videos", completion_window="24h")
    assert done.status == "completed"
    subjects = {done.id: "video.completed", stopped.id: "video.failed", batch.id: "batch.completed"}
    events = [
        keys.webhook_event_key(event_id(f"{'batch' if s == batch.id else 'video'}:{s}", t)) for s, t in subjects.items()
    ]
    # Each ending is an event waiting in the outbox, none delivered yet.
    wait_until(lambda: all(http_farm.conn.exists(e) for e in events), 60, "three events in the outbox")
    assert not any(events_for(http_farm, s) for s in subjects)

    http_farm.stop_front()
    http_farm.restart_valkey()
    http_farm.start_front()
    http_farm.receiver.accepting = True

    wait_until(lambda: all(events_for(http_farm, s) for s in subjects), 60, "every event delivered")
    # Delivered means done: the event leaves the outbox with its last delivery.
    wait_until(
        lambda: not any(http_farm.conn.exists(e) for e in events), 10, "the delivered events to leave the outbox"
    )
    for subject, event_type in subjects.items():
        unique = {h["webhook-id"]: (h, b) for h, b in events_for(http_farm, subject)}
        assert len(unique) == 1, f"{subject}: {len(unique)} distinct events"
        headers, body = next(iter(unique.values()))
        event = client.webhooks.unwrap(body, headers, secret=http_farm.webhook_secret)
        assert (event.type, event.id) == (event_type, headers["webhook-id"])
        with pytest.raises(InvalidWebhookSignatureError):
            client.webhooks.verify_signature(body, headers, secret="whsec_" + "d3Jvbmcgc2VjcmV0IGtleQ==")
    # At least once, never lost: nothing is left to send for these events.
    assert not any(
        http_farm.conn.exists(keys.webhook_event_key(h["webhook-id"])) for h, _ in http_farm.receiver.received
    )
