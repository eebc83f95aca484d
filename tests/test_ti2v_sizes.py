"""Wan2.2-TI2V's 32-pixel size grid (16x VAE x 2x2 DiT patches), checked where the control plane maps sizes.

No torch: model directories here are their JSON configs only, which is all the scheduler reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.core.model_catalog import check_job_model, read_size_multiple
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError
from scheduler.http.errors import ApiError, from_user_error
from scheduler.http.video_requests import parse_request, parse_size, to_spec


def config_dir(path: Path, *, ti2v: bool) -> Path:
    """A model dir's configs as published: Wan2.2-TI2V-5B's (16x VAE) or Wan2.1-T2V-1.3B's (no scale keys)."""
    index = {"_class_name": "WanPipeline", "expand_timesteps": ti2v}
    vae = {"z_dim": 48, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4} if ti2v else {}
    for name, content in (
        ("model_index.json", index),
        ("vae/config.json", {"_class_name": "AutoencoderKLWan", **vae}),
        ("transformer/config.json", {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2]}),
    ):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content))
    return path


@pytest.fixture
def settings(tmp_path: Path) -> FarmSettings:
    # The TI2V model is the default (so a request naming no model gets it); Wan2.1 beside it as "wan21".
    ti2v = config_dir(tmp_path / "ti2v", ti2v=True)
    return FarmSettings(model_dir=ti2v, models={"wan21": config_dir(tmp_path / "wan21", ti2v=False)})


def test_the_grid_comes_from_the_vae_and_dit_configs(settings: FarmSettings) -> None:
    dirs = settings.model_dirs()
    assert (read_size_multiple(dirs["default"]), read_size_multiple(dirs["wan21"])) == (32, 16)
    assert read_size_multiple(Path("/nonexistent")) == 16  # a dir the scheduler cannot see: Wan2.1's grid


def test_http_sizes_off_the_ti2v_grid_are_refused_in_one_line(settings: FarmSettings) -> None:
    assert parse_size("1280x704", settings, "default") == (1280, 704)
    assert parse_size("720x1280", settings, "wan21") == (720, 1280)  # Wan2.1's 16-pixel grid takes it
    with pytest.raises(ApiError) as refused:
        parse_size("720x1280", settings, "default")
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, "size", "invalid_value")
    assert refused.value.message == (
        "size '720x1280': model 'default' needs width and height in multiples of 32 (got 720x1280; e.g. 704x1280)"
    )
    # Naming no model: the one submit would pick for the task sets the grid.
    with pytest.raises(ApiError, match="multiples of 32"):
        to_spec(parse_request({"prompt": "a fox", "size": "720x1280"}), settings)
    assert to_spec(parse_request({"prompt": "a fox", "size": "720x1280", "model": "wan21"}), settings)["width"] == 720


def test_submit_refuses_specs_off_the_ti2v_grid(settings: FarmSettings) -> None:
    check_job_model(settings, JobSpec(prompt="a fox", width=704, height=1280, model="default"))
    check_job_model(settings, JobSpec(prompt="a fox", width=720, height=1280, model="wan21"))
    with pytest.raises(SpecError) as refused:
        check_job_model(settings, JobSpec(prompt="a fox", width=720, height=1280, model="default"))
    assert str(refused.value) == (
        "invalid job spec: width: model 'default' needs width and height in multiples of 32 (got 720x1280; "
        "e.g. 704x1280)"
    )
    assert from_user_error(refused.value).param == "size"  # what the HTTP front names
