"""Tenants on one farm (issue 26): named API keys, ownership, per-key idempotency, quotas and admission.

The front runs in-process (FastAPI's TestClient as the official ``openai`` SDK's HTTP client) against a real
Valkey and a real S3 server, with no workers: every job stays queued, so what a key may see, what a
quota refuses and what admission holds back are exact, not races against renders. The webhook scope and
the fairness of admission under real renders are in ``test_http_tenants_farm``.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from fastapi.testclient import TestClient

from scheduler.core import keys
from scheduler.core.settings import ApiKeyEntry, FarmSettings, HttpSettings, KeyQuota, api_key_hash
from scheduler.http.app import create_app
from scheduler.http.auth import legacy_key_name
from scheduler.intake.submit import submit
from tests.farm_harness import farm_settings
from tests.http_fixtures import HTTP_SPEC_DEFAULTS

# team-c's quota is small enough to hit in a few requests; 17 frames at 64x48 is the largest job it may ask for.
TEAM_C_QUOTA = KeyQuota(max_active_jobs=2, max_submits_per_minute=3, max_batch_lines=3, max_frame_pixels=17 * 64 * 48)


@dataclass
class Tenants:
    settings: FarmSettings
    conn: redis.Redis
    http: TestClient
    keys: dict[str, str]  # name -> key

    def client(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=self.keys[name], base_url="http://testserver/v1", http_client=self.http, max_retries=0
        )


@pytest.fixture
def tenants(redis_url: str, s3_config: Any, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Tenants]:
    named = {name: "rf-test-" + secrets.token_urlsafe(12) for name in ("team-a", "team-b", "team-c", "ops")}
    legacy = "rf-legacy-" + secrets.token_urlsafe(12)
    http = HttpSettings(
        api_key_hashes=[api_key_hash(legacy)],
        api_keys=[
            ApiKeyEntry(name="team-a", hash=api_key_hash(named["team-a"])),
            ApiKeyEntry(name="team-b", hash=api_key_hash(named["team-b"])),
            ApiKeyEntry(name="team-c", hash=api_key_hash(named["team-c"]), quota=TEAM_C_QUOTA),
            ApiKeyEntry(name="ops", hash=api_key_hash(named["ops"]), role="admin"),
        ],
    )
    settings = farm_settings(
        redis_url, s3_config, tiny_model_dir, tmp_path, http=http, spec_defaults=HTTP_SPEC_DEFAULTS
    )
    conn = redis.Redis.from_url(redis_url)
    with TestClient(create_app(settings)) as client:
        yield Tenants(settings, conn, client, {**named, "legacy": legacy})
    conn.close()


def _upload_batch(client: openai.OpenAI, prompts: list[str]) -> str:
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/videos", "body": {"prompt": p}})
        for i, p in enumerate(prompts)
    ]
    return client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch").id


def _queued_job_count(conn: redis.Redis) -> int:
    return int(conn.zcard(keys.jobs_index_key()))  # type: ignore[arg-type]


def _assert_all_not_found(client: openai.OpenAI, theirs: dict[str, str]) -> None:
    """Retrieve, content, cancel, delete and reuse of another key's ids: each a 404 like an unknown id's."""
    calls = (
        lambda: client.videos.retrieve(theirs["video"]),
        lambda: client.videos.download_content(theirs["video"]),
        lambda: client.videos.delete(theirs["video"]),
        lambda: client.files.retrieve(theirs["file"]),
        lambda: client.files.content(theirs["file"]),
        lambda: client.files.delete(theirs["file"]),
        lambda: client.batches.retrieve(theirs["batch"]),
        lambda: client.batches.cancel(theirs["batch"]),
        lambda: client.batches.create(input_file_id=theirs["file"], endpoint="/v1/videos", completion_window="24h"),  # type: ignore[arg-type]
    )
    with pytest.raises(openai.NotFoundError) as unknown:
        client.videos.retrieve("video_" + "0" * 24)
    for call in calls:
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert "not found" in refused.value.message
        assert refused.value.body["code"] == unknown.value.body["code"] == "not_found"  # type: ignore[index]


def test_each_user_key_sees_only_its_own_videos_files_and_batches(tenants: Tenants) -> None:
    made: dict[str, dict[str, str]] = {}
    for name in ("team-a", "team-b"):
        client = tenants.client(name)
        video = client.videos.create(prompt=f"a video of {name}", seconds="1")
        file_id = _upload_batch(client, [f"batch line of {name}"])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/videos", completion_window="24h")  # type: ignore[arg-type]
        made[name] = {"video": video.id, "file": file_id, "batch": batch.id}
    cli_job = submit(tenants.conn, tenants.settings, {"prompt": "from the CLI"})

    for name, other in (("team-a", "team-b"), ("team-b", "team-a")):
        client, mine, theirs = tenants.client(name), made[name], made[other]
        videos = {v.id for v in client.videos.list(limit=100)}
        # Its own video and its batch's job; never the other key's, never CLI work.
        assert mine["video"] in videos and theirs["video"] not in videos and cli_job not in videos
        assert all(tenants.conn.hget(keys.job_key(v), "owner") == name.encode() for v in videos)
        assert len(videos) == 2
        assert {f.id for f in client.files.list()} == {mine["file"]}
        assert {b.id for b in client.batches.list()} == {mine["batch"]}
        # The other key's ids are 404, in the words of an id that never existed.
        _assert_all_not_found(client, theirs)
    # Nothing of the other key's was touched by those refusals.
    assert tenants.client("team-b").videos.retrieve(made["team-b"]["video"]).status == "queued"
    assert tenants.client("team-b").batches.retrieve(made["team-b"]["batch"]).status == "in_progress"

    # Admin keys (named, or the older unnamed list) see both tenants and the CLI's job.
    for admin in ("ops", "legacy"):
        client = tenants.client(admin)
        videos = {v.id for v in client.videos.list(limit=100)}
        assert {made["team-a"]["video"], made["team-b"]["video"], cli_job} <= videos
        assert {made["team-a"]["batch"], made["team-b"]["batch"]} <= {b.id for b in client.batches.list()}
        assert client.videos.retrieve(cli_job).status == "queued"
    # The name is recorded, never the key.
    record = tenants.conn.hgetall(keys.job_key(made["team-a"]["video"]))
    assert record[b"owner"] == b"team-a" and tenants.keys["team-a"].encode() not in b"".join(record.values())
    assert legacy_key_name(api_key_hash(tenants.keys["legacy"])).startswith("admin-")

    # The status page shows a user key its own jobs only, an admin key everyone's.
    page_a = tenants.http.get("/", headers={"Authorization": f"Bearer {tenants.keys['team-a']}"}).text
    assert made["team-a"]["video"] in page_a and made["team-b"]["video"] not in page_a and cli_job not in page_a
    page_ops = tenants.http.get("/", headers={"Authorization": f"Bearer {tenants.keys['ops']}"}).text
    assert made["team-a"]["video"] in page_ops and made["team-b"]["video"] in page_ops and cli_job in page_ops


def test_idempotency_key_reused_with_another_body_is_422_and_keys_are_scoped_per_api_key(tenants: Tenants) -> None:
    team_a, team_b = tenants.client("team-a"), tenants.client("team-b")
    first = team_a.videos.create(prompt="one", seconds="1", extra_headers={"Idempotency-Key": "nightly-1"})
    again = team_a.videos.create(prompt="one", seconds="1", extra_headers={"Idempotency-Key": "nightly-1"})
    assert again.id == first.id
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        team_a.videos.create(prompt="another", seconds="1", extra_headers={"Idempotency-Key": "nightly-1"})
    assert reused.value.status_code == 422 and reused.value.param == "Idempotency-Key"
    assert "Idempotency-Key" in reused.value.message and reused.value.code == "idempotency_key_reused"
    assert team_a.videos.retrieve(first.id).prompt == "one"  # the first request's video is untouched
    # Another tenant's key of the same spelling is its own video, not a look at team-a's.
    theirs = team_b.videos.create(prompt="something else", seconds="1", extra_headers={"Idempotency-Key": "nightly-1"})
    assert theirs.id != first.id and theirs.prompt == "something else"
    assert _queued_job_count(tenants.conn) == 2


def test_quotas_answer_429_with_retry_after_and_enqueue_nothing(tenants: Tenants) -> None:
    team_c = tenants.client("team-c")
    with pytest.raises(openai.RateLimitError) as too_large:
        team_c.videos.create(prompt="too long for the quota", seconds="2")  # 33 frames at 64x48
    assert too_large.value.code == "job_too_large" and f"{17 * 64 * 48:,}" in too_large.value.message
    assert too_large.value.response.headers["x-should-retry"] == "false"
    file_id = _upload_batch(team_c, ["a", "b", "c", "d"])
    with pytest.raises(openai.RateLimitError) as long_batch:
        team_c.batches.create(input_file_id=file_id, endpoint="/v1/videos", completion_window="24h")  # type: ignore[arg-type]
    assert long_batch.value.code == "batch_too_large" and "quota of 3 lines" in long_batch.value.message
    assert _queued_job_count(tenants.conn) == 0 and not list(team_c.batches.list())

    # Two may be queued or running at once; the third waits for one to finish.
    for prompt in ("one", "two"):
        team_c.videos.create(prompt=prompt, seconds="1")
    with pytest.raises(openai.RateLimitError) as busy:
        team_c.videos.create(prompt="three", seconds="1")
    assert busy.value.code == "too_many_active_jobs" and int(busy.value.response.headers["retry-after"]) > 0
    assert _queued_job_count(tenants.conn) == 2
    # Another key is not limited by team-c's quota, and admin keys have none.
    tenants.client("team-a").videos.create(prompt="team-a is unaffected", seconds="1")
    tenants.client("ops").videos.create(prompt="ops too", seconds="2")
    assert _queued_job_count(tenants.conn) == 4

    # Creates per minute: team-c has used 2 of 3 (refused ones are not counted); a batch is one create.
    one_line = _upload_batch(team_c, ["held"])
    team_c.batches.create(input_file_id=one_line, endpoint="/v1/videos", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as rate:
        team_c.batches.create(input_file_id=one_line, endpoint="/v1/videos", completion_window="24h")  # type: ignore[arg-type]
    assert rate.value.code == "rate_limit_exceeded" and 1 <= int(rate.value.response.headers["retry-after"]) <= 60
    assert rate.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert len(list(team_c.batches.list())) == 1


def test_a_batch_beyond_the_admission_window_is_held_back_and_cancel_drops_it(tenants: Tenants) -> None:
    team_c = tenants.client("team-c")
    team_c.videos.create(prompt="already running", seconds="1")
    file_id = _upload_batch(team_c, ["x", "y", "z"])
    batch = team_c.batches.create(input_file_id=file_id, endpoint="/v1/videos", completion_window="24h")  # type: ignore[arg-type]
    # One slot of team-c's two was free: one line is queued, two wait outside the queues (and count as pending).
    assert _queued_job_count(tenants.conn) == 2
    assert tenants.conn.zcard(keys.api_owner_held_key("team-c")) == 2
    assert (batch.status, batch.request_counts.total, batch.request_counts.failed) == ("in_progress", 3, 0)  # type: ignore[union-attr]
    cancelled = team_c.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert tenants.conn.zcard(keys.api_owner_held_key("team-c")) == 0
    assert not tenants.conn.exists(keys.api_batch_held_key(batch.id))
    assert _queued_job_count(tenants.conn) == 2  # the held lines never became jobs
