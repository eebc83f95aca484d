"""OpenAI's Files and Batch APIs for ``/v1/videos`` on a real farm, with the official ``openai`` SDK (issue 14).

A batch file mixing good and invalid lines completes: the output file has one result per valid line and
the error file one per invalid line, keyed by ``custom_id`` in OpenAI's batch output format.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.http_fixtures import HttpFarm
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow


def request_line(custom_id: str, body: dict[str, object], url: str = "/v1/videos") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_batch_with_invalid_lines_completes_with_output_and_error_files(http_farm: HttpFarm) -> None:
    client = http_farm.client()
    lines = [
        request_line("fox", {"prompt": "a fox", "seconds": "1", "size": "64x48", "seed": 1}),
        request_line("bad-size", {"prompt": "a fox", "size": "65x48"}),
        request_line("hare", {"prompt": "a hare", "seconds": "1", "seed": 2}),
        "this line is not JSON",
        request_line("wrong-endpoint", {"prompt": "a fox"}, url="/v1/chat/completions"),
        request_line("bad-steps", {"prompt": "a fox", "steps": 100000}),
    ]
    uploaded = client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
    assert (uploaded.purpose, uploaded.bytes) == ("batch", len("\n".join(lines).encode()))
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h", metadata={"run": "nightly"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 6

    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", http_farm.front_log()
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 4)
    assert batch.metadata == {"run": "nightly"}
    assert batch.id in [b.id for b in client.batches.list()]

    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in output] == ["fox", "hare"]
    for result in output:
        assert result["response"]["status_code"] == 200 and result["error"] is None
        video = result["response"]["body"]
        assert (video["object"], video["status"], video["size"]) == ("video", "completed", "64x48")
    fox = client.videos.download_content(output[0]["response"]["body"]["id"]).read()
    assert decode_video_frames(fox).shape == (17, 48, 64, 3)

    errors = {
        json.loads(line)["custom_id"]: json.loads(line)
        for line in client.files.content(batch.error_file_id).text.splitlines()
    }
    assert set(errors) == {"bad-size", "line-4", "wrong-endpoint", "bad-steps"}
    assert errors["bad-size"]["response"]["status_code"] == 400
    assert errors["bad-size"]["response"]["body"]["error"]["param"] == "size"
    assert errors["wrong-endpoint"]["response"]["body"]["error"]["param"] == "url"
    assert "steps" in errors["bad-steps"]["response"]["body"]["error"]["message"]
    assert all(r["id"].startswith("batch_req_") for r in [*output, *errors.values()])


def test_cancelled_batch_stops_its_jobs(http_farm: HttpFarm) -> None:
    client = http_farm.client()
    body = "\n".join(
        request_line(f"r{i}", {"prompt": f"a slow fox {i}", "seconds": "1", "steps": 30}) for i in range(4)
    )
    uploaded = client.files.create(file=("slow.jsonl", body.encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    deadline = time.monotonic() + 90
    while cancelled.status != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.3)
        cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts.failed >= 1
