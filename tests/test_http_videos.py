"""OpenAI's Videos API on a real farm, driven by the official ``openai`` SDK over loopback (issue 14).

One farm and one front for the module (``http_farm``): create_and_poll, download with frames and size
checked, the thumbnail, ranged reads, list/retrieve/delete, image-to-video with an uploaded
``input_reference``, idempotent creates, and the refusals (401, 400 naming ``size``, 413).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.farm_harness import worker_logs
from tests.http_fixtures import HttpFarm
from tests.video_probe import decode_video_frames

pytestmark = pytest.mark.slow


def png_bytes(size: tuple[int, int] = (80, 60)) -> bytes:
    ramp = np.linspace(0, 255, size[0] * size[1] * 3).astype(np.uint8).reshape(size[1], size[0], 3)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def logs(farm: HttpFarm) -> str:
    return worker_logs(farm.settings) + "\n== front\n" + farm.front_log()


def test_create_and_poll_then_download_video_thumbnail_and_ranges(http_farm: HttpFarm) -> None:
    client = http_farm.client()
    video = client.videos.create_and_poll(
        prompt="a red fox running through snow", seconds="1", size="64x48", poll_interval_ms=200, extra_body={"seed": 3}
    )
    assert video.status == "completed", logs(http_farm)
    assert (video.progress, video.size, video.seconds, video.object) == (100, "64x48", "1", "video")
    assert video.completed_at is not None and video.completed_at >= video.created_at

    mp4 = client.videos.download_content(video.id).read()
    frames = decode_video_frames(mp4)
    # 1 s at 16 fps: 4 * round(16 / 4) + 1 = 17 frames (Wan's 4k+1).
    assert frames.shape == (17, 48, 64, 3)

    poster = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").read()))
    assert (poster.format, poster.size) == ("JPEG", (64, 48))

    path = f"/v1/videos/{video.id}/content"
    status, headers, body = http_farm.request("GET", path, headers={**http_farm.headers(), "Range": "bytes=10-109"})
    assert (status, body) == (206, mp4[10:110])
    assert headers["content-range"] == f"bytes 10-109/{len(mp4)}"
    status, _, body = http_farm.request("GET", path, headers={**http_farm.headers(), "Range": "bytes=-5"})
    assert (status, body) == (206, mp4[-5:])
    status, headers, body = http_farm.request(
        "GET", path, headers={**http_farm.headers(), "Range": f"bytes={len(mp4)}-"}
    )
    assert status == 416 and headers["content-range"] == f"bytes */{len(mp4)}"
    assert json.loads(body)["error"]["code"] == "range_not_satisfiable"


def test_list_retrieve_delete_and_idempotent_create(http_farm: HttpFarm) -> None:
    client = http_farm.client()
    first = client.videos.create(prompt="one", seconds="1", extra_headers={"Idempotency-Key": "retry-me"})
    again = client.videos.create(prompt="one", seconds="1", extra_headers={"Idempotency-Key": "retry-me"})
    second = client.videos.create(prompt="two", seconds="1")
    assert again.id == first.id and second.id != first.id
    assert client.videos.retrieve(first.id).prompt == "one"

    newest_first = [v.id for v in client.videos.list(limit=1)]  # the SDK follows last_id page by page
    assert newest_first[:2] == [second.id, first.id]
    oldest_first = [v.id for v in client.videos.list(order="asc")]
    assert oldest_first.index(first.id) < oldest_first.index(second.id)

    deleted = client.videos.delete(second.id)
    assert (deleted.id, deleted.deleted) == (second.id, True)
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        client.videos.retrieve(second.id)
    assert second.id in missing.value.message
    assert second.id not in [v.id for v in client.videos.list(limit=100)]
    # The deleted (cancelled) job's record goes once it has stopped; its objects with it.
    finished = client.videos.poll(first.id, poll_interval_ms=200)
    assert finished.status == "completed", logs(http_farm)


def test_image_to_video_with_uploaded_input_reference(http_farm: HttpFarm) -> None:
    client = http_farm.client()
    video = client.videos.create_and_poll(
        prompt="the fox turns its head",
        input_reference=("fox.png", png_bytes(), "image/png"),
        seconds="1",
        size="64x48",
        poll_interval_ms=200,
    )
    assert video.status == "completed", logs(http_farm)
    assert video.model == "i2v"  # no model named: the farm picked the one that does image-to-video
    assert decode_video_frames(client.videos.download_content(video.id).read()).shape == (17, 48, 64, 3)


def test_refusals_in_openai_error_shape(http_farm: HttpFarm) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError) as no_key:
        http_farm.client(api_key="rf-wrong").videos.list()
    assert no_key.value.status_code == 401 and no_key.value.code == "invalid_api_key"
    status, headers, body = http_farm.request("GET", "/v1/videos")
    assert status == 401 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert headers["www-authenticate"].startswith("Bearer")
    assert http_farm.request("GET", "/openapi.json")[0] == 401
    # Only the liveness probe answers without a key.
    status, _, body = http_farm.request("GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"ok": True, "redis": True})
    status, _, body = http_farm.request("GET", "/metrics", headers=http_farm.headers())
    assert status == 200 and b"reelfarm_up 1.0" in body and b'reelfarm_workers_live{stage="transform"} 1.0' in body
    # FastAPI's own validation answers in the same shape, as a 400 naming the param.
    status, _, body = http_farm.request("GET", "/v1/videos?limit=1000", headers=http_farm.headers())
    assert (status, json.loads(body)["error"]["param"]) == (400, "limit")

    client = http_farm.client()
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.videos.create(prompt="a fox", size="65x48")
    assert bad_size.value.param == "size" and "multiples of 16" in bad_size.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.videos.create(prompt="a fox", seconds="12")
    assert too_long.value.param == "seconds"
    with pytest.raises(openai.BadRequestError) as bad_seed:
        client.videos.create(prompt="a fox", extra_body={"seed": -1})
    assert bad_seed.value.param == "seed"
    headers = {**http_farm.headers(), "Content-Type": "application/json"}
    local = json.dumps({"prompt": "a fox", "input_reference": {"image_url": "/etc/passwd"}}).encode()
    status, _, body = http_farm.request("POST", "/v1/videos", body=local, headers=headers)
    error = json.loads(body)["error"]
    assert (status, error["param"]) == (400, "input_reference") and "local paths are refused" in error["message"]

    huge = json.dumps({"prompt": "x" * (http_farm.settings.http.max_json_bytes + 1)}).encode()
    status, _, body = http_farm.request("POST", "/v1/videos", body=huge, headers=headers)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
