"""LoRAs as farm assets: the spec field and its bounds, the catalog (settings + ``reelfarm lora add``), the checks
at submit and in batch files, the CLI, the HTTP extra body field and the batch key. Registration runs against a
real Valkey and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from scheduler.cli import main
from scheduler.core import jobs, keys
from scheduler.core.lora_catalog import LoraError, lora_catalog, register_lora
from scheduler.core.object_store import get_bytes
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError, SpecLimits, parse_spec
from scheduler.http.video_requests import parse_request, to_spec
from scheduler.intake.submit import submit
from scheduler.local.embedded import write_settings_file
from scheduler.ops.batch_file import parse_batch
from tests.farm_harness import farm_settings
from workers.batch_take import batch_key
from workers.models.tiny_lora import build_tiny_lora

TINY: dict[str, Any] = {"prompt": "a kite over a beach", "width": 64, "height": 48, "frames": 17, "steps": 2}


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"name": "x", "scale": 4.5}], "loras.0.scale: Input should be less than or equal to 4"),
        ([{"name": "x", "scale": "nan"}], "loras.0.scale: Input should be a finite number"),
        ([{"name": "x"}, {"name": "x", "scale": 0.5}], "loras: x named more than once"),
        ([{"name": "../etc"}], "loras.0.name: String should match pattern"),
        ([{"name": "x", "weight": 1}], "loras.0.weight: unknown field"),
        ([{"name": str(i)} for i in range(5)], "loras: 5 LoRAs is over this farm's maximum 4"),
    ],
)
def test_spec_refuses_bad_lora_choices_in_one_line_naming_the_field(loras: list[Any], message: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec({**TINY, "loras": loras}, SpecLimits())
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_lora_choices_default_to_scale_one_and_the_limit_is_a_setting() -> None:
    spec = parse_spec({**TINY, "loras": [{"name": "style"}]}, SpecLimits(max_loras=1))
    assert [(c.name, c.scale) for c in spec.loras] == [("style", 1.0)]
    with pytest.raises(SpecError, match="loras: 1 LoRAs is over this farm's maximum 0"):
        parse_spec({**TINY, "loras": [{"name": "style"}]}, SpecLimits(max_loras=0))


def test_jobs_share_dit_calls_only_with_the_same_loras_at_the_same_scales() -> None:
    plain = JobSpec(**TINY)
    styled = JobSpec(**TINY, loras=[{"name": "style", "scale": 0.8}])
    assert batch_key(plain) != batch_key(styled)
    assert batch_key(styled) == batch_key(JobSpec(**{**TINY, "seed": 3}, loras=[{"name": "style", "scale": 0.8}]))
    assert batch_key(styled) != batch_key(JobSpec(**TINY, loras=[{"name": "style", "scale": 0.7}]))


def test_the_http_front_passes_loras_through_to_the_spec() -> None:
    settings = FarmSettings()
    request = parse_request({"prompt": "a fox", "loras": [{"name": "style", "scale": 0.5}]})
    assert to_spec(request, settings)["loras"] == [{"name": "style", "scale": 0.5}]


@pytest.fixture
def settings(redis_url: str, s3_config: Any, tiny_model_dir: Path, tmp_path: Path) -> FarmSettings:
    return farm_settings(redis_url, s3_config, tiny_model_dir, tmp_path, secret=secrets.token_hex(8))


def test_lora_add_copies_the_file_into_the_bucket_and_records_its_checksum(
    settings: FarmSettings, s3_client: Any, tmp_path: Path
) -> None:
    conn = redis.Redis.from_url(settings.require_redis_url())
    path = build_tiny_lora(tmp_path / "style", seed=1)
    entry = register_lora(conn, settings, "style", str(path))

    assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.source == f"s3://{settings.s3.bucket}/renders/loras/style/{entry.sha256}.safetensors"
    stored = get_bytes(s3_client, settings.s3.bucket, entry.source.split("/", 3)[3])
    assert stored == path.read_bytes()
    assert lora_catalog(settings, conn)["style"] == entry
    assert json.loads(conn.hget(keys.lora_registry_key(), "style"))["sha256"] == entry.sha256  # type: ignore[arg-type]


def test_lora_add_refuses_what_is_not_a_lora_and_names_the_settings_already_give(
    settings: FarmSettings, tmp_path: Path
) -> None:
    conn = redis.Redis.from_url(settings.require_redis_url())
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(LoraError, match=r"notes.safetensors: not a safetensors file \(bad header length\)"):
        register_lora(conn, settings, "notes", str(text))
    with pytest.raises(LoraError, match="cannot read it"):
        register_lora(conn, settings, "gone", str(tmp_path / "missing.safetensors"))
    configured = settings.model_copy(update={"loras": FarmSettings.model_validate({"loras": {"a": "/x"}}).loras})
    with pytest.raises(LoraError, match="'a' is already given in the settings"):
        register_lora(conn, configured, "a", str(build_tiny_lora(tmp_path / "a")))
    assert conn.hlen(keys.lora_registry_key()) == 0


def test_submit_refuses_an_unknown_lora_or_an_expert_lora_on_a_one_expert_model_and_writes_nothing(
    settings: FarmSettings, tmp_path: Path
) -> None:
    conn = redis.Redis.from_url(settings.require_redis_url())
    register_lora(conn, settings, "style", str(build_tiny_lora(tmp_path / "style")))
    high = FarmSettings.model_validate({"loras": {"high": {"source": "/l.safetensors", "expert": "high"}}}).loras
    settings = settings.model_copy(update={"loras": high})

    with pytest.raises(SpecError) as unknown:
        submit(conn, settings, {**TINY, "loras": [{"name": "styel"}]})
    assert str(unknown.value) == (
        "invalid job spec: loras.0.name: 'styel' is not a LoRA of this farm (it has: high, style; "
        "add one with `reelfarm lora add NAME FILE`)"
    )
    with pytest.raises(SpecError, match="loras.0.name: 'high' adapts the high-noise expert of a Wan2.2 model"):
        submit(conn, settings, {**TINY, "loras": [{"name": "high"}]})
    assert conn.exists(keys.jobs_index_key()) == 0  # nothing written for the refused jobs

    job_id = submit(conn, settings, {**TINY, "loras": [{"name": "style", "scale": 0.5}]})
    assert jobs.read_status(conn, job_id)["spec"]["loras"] == [{"name": "style", "scale": 0.5}]


def test_batch_lines_with_unknown_loras_are_refused_by_line_and_registered_ones_pass(
    settings: FarmSettings, tmp_path: Path
) -> None:
    conn = redis.Redis.from_url(settings.require_redis_url())
    register_lora(conn, settings, "style", str(build_tiny_lora(tmp_path / "style")))
    text = "\n".join(json.dumps({**TINY, "seed": i, "loras": [{"name": n}]}) for i, n in enumerate(["style", "nope"]))

    parsed = parse_batch(text, settings, name="styled", conn=conn)
    assert len(parsed.entries) == 1 and parsed.entries[0].spec.loras[0].name == "style"
    assert [e.line_no for e in parsed.errors] == [2] and "'nope' is not a LoRA of this farm" in parsed.errors[0].reason


def test_lora_ls_lists_settings_and_registered_loras(settings: FarmSettings, tmp_path: Path) -> None:
    conn = redis.Redis.from_url(settings.require_redis_url())
    added = register_lora(conn, settings, "style", str(build_tiny_lora(tmp_path / "style")))
    settings = settings.model_copy(
        update={"loras": FarmSettings.model_validate({"loras": {"local": "/loras/l.safetensors"}}).loras}
    )
    config = write_settings_file(settings, tmp_path / "farm.json")

    listed = CliRunner().invoke(main, ["lora", "ls", "--config", str(config), "--json"], catch_exceptions=False)
    rows = {row["name"]: row for row in json.loads(listed.output)}
    assert rows["style"]["sha256"] == added.sha256 and rows["style"]["registered"] is True
    assert rows["local"] == {
        "name": "local",
        "source": "/loras/l.safetensors",
        "sha256": None,
        "expert": None,
        "size": None,
        "registered": False,
    }
    table = CliRunner().invoke(main, ["lora", "ls", "--config", str(config)], catch_exceptions=False).output
    assert "style" in table and "registry" in table and "(at first load)" in table
    refused = CliRunner().invoke(main, ["lora", "add", "bad name", "/x", "--config", str(config)])
    assert refused.exit_code != 0 and "LoRA name 'bad name'" in refused.output
