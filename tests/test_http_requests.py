"""Unit tests of the HTTP front's own logic: request mapping, ranges, API keys, error shapes (no servers)."""

from __future__ import annotations

import pytest

from scheduler.core.settings import FarmSettings, HttpSettings, api_key_hash, load_settings
from scheduler.core.spec import SpecError
from scheduler.http.auth import ApiKeys
from scheduler.http.content import byte_range
from scheduler.http.errors import ApiError, from_user_error
from scheduler.http.video_objects import progress_of, video_object
from scheduler.http.video_requests import form_to_dict, frames_for, new_video_id, parse_request, parse_size, to_spec

SETTINGS = FarmSettings()


def test_seconds_become_four_k_plus_one_frames_within_the_farms_limit() -> None:
    assert frames_for("1", 16, SETTINGS) == 17
    assert frames_for(5, 16, SETTINGS) == 81
    assert frames_for("0.1", 16, SETTINGS) == 5  # never fewer than one latent step
    with pytest.raises(ApiError) as too_long:
        frames_for("8", 16, SETTINGS)
    assert too_long.value.param == "seconds" and "at most 5 seconds" in too_long.value.message
    for bad in ("soon", "-1", "0", "nan"):
        with pytest.raises(ApiError) as refused:
            frames_for(bad, 16, SETTINGS)
        assert refused.value.param == "seconds"


def test_size_is_width_x_height_in_multiples_of_16_within_limits() -> None:
    assert parse_size("832x480", SETTINGS) == (832, 480)
    for bad in ("832*480", "830x480", "2048x480", "x", "0x0"):
        with pytest.raises(ApiError) as refused:
            parse_size(bad, SETTINGS)
        assert (refused.value.status, refused.value.param) == (400, "size")


def test_request_maps_to_a_spec_and_refuses_what_the_api_must_not_read() -> None:
    request = parse_request(
        {"prompt": "a fox", "size": "64x48", "seconds": "1", "seed": 5, "codec": {"name": "lossless"}}
    )
    assert to_spec(request, SETTINGS) == {
        "prompt": "a fox",
        "seed": 5,
        "codec": {"name": "lossless", "crf": 18, "preset": "medium"},
        "width": 64,
        "height": 48,
        "frames": 17,
    }
    with pytest.raises(ApiError) as unknown:
        parse_request({"prompt": "a fox", "sede": 5})
    assert unknown.value.param == "sede" and "unknown parameter" in unknown.value.message
    with pytest.raises(ApiError) as mapped:
        parse_request({"prompt": "a fox", "frames": 17})
    assert mapped.value.param == "frames" and "seconds parameter" in mapped.value.message
    with pytest.raises(ApiError) as model:
        to_spec(parse_request({"prompt": "a fox", "model": "sora-2"}), SETTINGS)
    assert model.value.param == "model" and "default" in model.value.message
    for source, reason in (
        ({"image_url": "/etc/passwd"}, "local paths are refused"),
        ({"image_url": "file:///etc/passwd"}, "local paths are refused"),
        ({"image_url": "s3://someone-else/key.png"}, "only objects in this farm's bucket"),
        ({"file_id": "file-1"}, "not supported"),
    ):
        with pytest.raises(ApiError) as refused:
            to_spec(parse_request({"prompt": "a fox", "input_reference": source}), SETTINGS)
        assert refused.value.param == "input_reference" and reason in refused.value.message
    farm_object = to_spec(
        parse_request({"prompt": "a", "input_reference": {"image_url": "s3://reelfarm/in.png"}}), SETTINGS
    )
    assert farm_object["image"] == "s3://reelfarm/in.png"


def test_multipart_fields_nest_by_brackets() -> None:
    assert form_to_dict([("prompt", "a"), ("codec[name]", "h264"), ("codec[crf]", "20")]) == {
        "prompt": "a",
        "codec": {"name": "h264", "crf": "20"},
    }
    with pytest.raises(ApiError):
        form_to_dict([("codec", "h264"), ("codec[name]", "h264")])


def test_idempotency_key_gives_one_id_per_key() -> None:
    assert new_video_id("k1", "team-a") == new_video_id("k1", "team-a") != new_video_id("k2", "team-a")
    # Idempotency keys are scoped per API key: the same spelling from another key is another video.
    assert new_video_id("k1", "team-a") != new_video_id("k1", "team-b")
    assert new_video_id(None, "team-a") != new_video_id(None, "team-a")


def test_byte_ranges() -> None:
    assert byte_range(None, 100) is None
    assert byte_range("bytes=0-9", 100) == (0, 9)
    assert byte_range("bytes=90-", 100) == (90, 99)
    assert byte_range("bytes=-10", 100) == (90, 99)
    assert byte_range("bytes=50-1000", 100) == (50, 99)
    assert byte_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole object
    for unsatisfiable in ("bytes=100-", "bytes=5-4", "bytes=-0"):
        with pytest.raises(ApiError) as refused:
            byte_range(unsatisfiable, 100)
        assert refused.value.status == 416 and refused.value.headers == {"Content-Range": "bytes */100"}


def test_api_keys_are_stored_hashed_and_env_keys_hashed_at_load() -> None:
    keys = ApiKeys(HttpSettings(api_key_hashes=[api_key_hash("good-key"), api_key_hash("other")]))
    assert keys.accepts("good-key") and keys.accepts("other") and not keys.accepts("bad")
    settings = load_settings(env={"REELFARM_API_KEY": "from-env"})
    assert settings.http.api_key_hashes == [api_key_hash("from-env")]
    assert "from-env" not in settings.model_dump_json()


def test_spec_errors_name_the_openai_param() -> None:
    error = from_user_error(SpecError("invalid job spec: width: 2000 is over this farm's maximum 1280"))
    assert (error.status, error.param) == (400, "size")
    assert from_user_error(SpecError("invalid job spec: steps: 500 is over")).param == "steps"


def test_video_object_maps_states_and_progress() -> None:
    spec = '{"prompt": "a", "width": 64, "height": 48, "frames": 33, "fps": 16, "model": "default"}'
    running = {
        "state": "running",
        "spec": spec,
        "created_at": "10.5",
        "encode.state": "done",
        "transform.state": "running",
        "transform.progress": "3/6",
    }
    video = video_object("video_1", running)
    assert (video["status"], video["progress"], video["seconds"], video["size"]) == ("in_progress", 50, "2", "64x48")
    assert video["completed_at"] is None
    failed = video_object("video_1", {**running, "state": "cancelled", "error": "transform: cancelled by user"})
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "cancelled",
        "message": "transform: cancelled by user",
    }
    assert progress_of({"state": "succeeded"}) == 100


def test_webhook_signatures_follow_standard_webhooks() -> None:
    import time

    from openai import InvalidWebhookSignatureError, OpenAI

    from scheduler.http.webhooks import event_id, sign

    secret = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM="
    event = event_id("video:video_1", "video.completed")
    assert event == event_id("video:video_1", "video.completed") != event_id("video:video_1", "video.failed")
    body, now = b'{"id": "%s", "type": "video.completed"}' % event.encode(), int(time.time())
    headers = {"webhook-id": event, "webhook-timestamp": str(now), "webhook-signature": sign(secret, event, now, body)}
    checker = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1").webhooks
    checker.verify_signature(body, headers, secret=secret)
    with pytest.raises(InvalidWebhookSignatureError):
        checker.verify_signature(body + b" ", headers, secret=secret)
    with pytest.raises(InvalidWebhookSignatureError):
        checker.verify_signature(body, headers, secret="whsec_b3RoZXIta2V5")


def test_api_key_command_prints_a_key_and_its_digest() -> None:
    from click.testing import CliRunner

    from scheduler.cli import main

    out = CliRunner().invoke(main, ["api-key"]).output.splitlines()
    key = out[0].removeprefix("key:").strip()
    assert key.startswith("rf-") and len(key) > 30
    assert api_key_hash(key) in out[1]
