"""The job spec: what a user may ask the farm to render, and the checks at the door.

A spec is validated completely at submit time -- before anything is written to
Redis -- so a bad request costs one line of error and leaves nothing behind.
Static bounds live on the model; farm-specific maxima (``SpecLimits``) come from
settings because a CPU test farm and an H100 farm allow very different sizes.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scheduler.core.errors import UserError
from scheduler.core.loras import DEFAULT_MAX_LORAS, LoraChoice

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}$")


class SpecError(UserError, ValueError):
    """A spec the farm refuses; the message is one line saying what to change."""


# The codec choices a job may make; the video encoder takes its rules from here, so what a spec
# accepts is exactly what gets encoded. "lossless" is RGB H.264 at qp 0: bit-exact frames for
# masters and for the farm's own correctness checks; "h264" is the compact delivery format.
CodecName = Literal["h264", "lossless"]
CODEC_NAMES: tuple[CodecName, ...] = get_args(CodecName)
# The x264 presets a job may pick (x264's slower ones are not offered).
X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]
X264_PRESETS: tuple[X264Preset, ...] = get_args(X264Preset)
MAX_CRF = 51  # the top of x264's constant-quality scale
DEFAULT_CRF = 18  # visually lossless for x264; generated video has fine detail worth keeping
DEFAULT_PRESET: X264Preset = "medium"


class CodecOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CodecName = "h264"
    crf: int = Field(default=DEFAULT_CRF, ge=0, le=MAX_CRF)
    preset: X264Preset = DEFAULT_PRESET


# Step caching methods a job may ask for: diffusers' cache hooks that apply to Wan's DiT and are
# steered by one threshold. first_block: FirstBlockCache -- skip every block after the first when the
# first block's residual changed by less than ``threshold`` (relative mean absolute change) since the
# last full call. Others (TaylorSeer, MagCache, FasterCache, PAB) need per-model calibration or
# several knobs and are not offered yet.
CacheMethod = Literal["first_block"]
CACHE_METHODS: tuple[CacheMethod, ...] = get_args(CacheMethod)
MAX_CACHE_THRESHOLD = 1.0  # a relative change: above 1 every call after the first would be skipped


class CacheOptions(BaseModel):
    """A job's step caching: off unless the spec has ``cache``; its frames then deviate from the uncached ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: CacheMethod
    threshold: float = Field(default=0.05, gt=0.0, le=MAX_CACHE_THRESHOLD)


class SpecLimits(BaseModel):
    """Farm-wide maxima; configured in ``configs/farm.yaml`` under ``limits``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Widest video a job may ask for, in pixels (with the two below: what slots are sized for).
    max_width: int = Field(default=1280, ge=16)
    # Tallest video a job may ask for, in pixels.
    max_height: int = Field(default=1280, ge=16)
    # Most frames a job may ask for.
    max_frames: int = Field(default=81, ge=1)
    # Most denoising steps per job.
    max_steps: int = Field(default=100, ge=1)
    # Longest prompt (and negative prompt), in characters.
    max_prompt_chars: int = Field(default=2000, ge=1)
    # Largest conditioning image file, in bytes.
    max_image_bytes: int = Field(default=20 * 2**20, ge=1)
    # Largest conditioning image, in pixels (read from its header, checked before decoding).
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # Most LoRAs one job may stack (each adds a low-rank update to every adapted layer of every DiT call).
    max_loras: int = Field(default=DEFAULT_MAX_LORAS, ge=0, le=16)


class JobSpec(BaseModel):
    """One video to render. Unknown fields are refused (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int = Field(default=832, ge=16)
    height: int = Field(default=480, ge=16)
    frames: int = Field(default=81, ge=1)
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = Field(default=5.0, ge=0.0, le=30.0)
    # Wan2.2 two-expert models: the guidance of the low-noise expert's steps (None: guidance_scale, as in
    # diffusers). Whether guidance runs at all follows guidance_scale alone, as in WanPipeline.
    guidance_scale_2: float | None = Field(default=None, ge=0.0, le=30.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    flow_shift: float | None = Field(default=None, gt=0.0, le=30.0)
    fps: int = Field(default=16, ge=1, le=120)
    codec: CodecOptions = CodecOptions()
    priority: Literal["high", "default", "low"] = "default"
    output_prefix: str | None = None
    # Which of the farm's models renders this job ("default" = settings.model_dir).
    model: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Image-to-video: the conditioning image (a local path, s3://bucket/key or http(s) URL at submit;
    # rewritten to the job's input object in the bucket before anything is enqueued).
    image: str | None = Field(default=None, min_length=1, max_length=2048)
    resize: Literal["resize", "center_crop"] = "resize"
    # Step caching (diffusers' cache hooks on the DiT), e.g. {"method": "first_block", "threshold": 0.05}.
    cache: CacheOptions | None = None
    # LoRAs of the farm (settings ``loras``, ``reelfarm lora add``) applied to the DiT for this job only,
    # e.g. [{"name": "style", "scale": 0.8}]; names are checked against the farm's at submit.
    loras: tuple[LoraChoice, ...] = ()

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain text, not only whitespace")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        # The VAE downsamples by 8 and the DiT patchifies by 2 more.
        if value % 16:
            raise ValueError(f"must be a multiple of 16 (got {value})")
        return value

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, value: int) -> int:
        # The causal VAE maps 1 + 4k frames onto 1 + k latent frames.
        if (value - 1) % 4:
            raise ValueError(f"must be 4k+1, e.g. 17, 33, 49, 81 (got {value})")
        return value

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, value: tuple[LoraChoice, ...]) -> tuple[LoraChoice, ...]:
        names = [choice.name for choice in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named more than once; give each LoRA once with its scale")
        return value

    @field_validator("output_prefix")
    @classmethod
    def _safe_prefix(cls, value: str | None) -> str | None:
        if value is not None and not PREFIX_PATTERN.match(value):
            raise ValueError("must be path segments of A-Z a-z 0-9 _ - separated by '/'")
        return value

    @property
    def task(self) -> Literal["t2v", "i2v"]:
        return "i2v" if self.image is not None else "t2v"

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def to_json(self) -> str:
        return self.model_dump_json()


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        # Field names come from the user: quote odd ones so the message stays one readable line.
        where = ".".join(p if isinstance(p, str) and p.isidentifier() else repr(p)[:40] for p in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see `reelfarm submit --help`)"
        parts.append(f"{where}: {message}")
    return "invalid job spec: " + "; ".join(parts)


def parse_spec(raw: dict[str, Any], limits: SpecLimits, defaults: dict[str, Any] | None = None) -> JobSpec:
    """Validate ``raw`` (after farm defaults) against the spec and the farm's limits."""
    merged = {**(defaults or {}), **raw}
    try:
        spec = JobSpec.model_validate(merged)
    except ValidationError as exc:
        raise SpecError(_one_line(exc)) from None
    problems = []
    if spec.width > limits.max_width:
        problems.append(f"width: {spec.width} is over this farm's maximum {limits.max_width}")
    if spec.height > limits.max_height:
        problems.append(f"height: {spec.height} is over this farm's maximum {limits.max_height}")
    if spec.frames > limits.max_frames:
        problems.append(f"frames: {spec.frames} is over this farm's maximum {limits.max_frames}")
    if len(spec.loras) > limits.max_loras:
        problems.append(f"loras: {len(spec.loras)} LoRAs is over this farm's maximum {limits.max_loras}")
    if spec.steps > limits.max_steps:
        problems.append(f"steps: {spec.steps} is over this farm's maximum {limits.max_steps}")
    for field in ("prompt", "negative_prompt"):
        length = len(getattr(spec, field))
        if length > limits.max_prompt_chars:
            problems.append(f"{field}: {length} characters is over the maximum {limits.max_prompt_chars}")
    if problems:
        raise SpecError("invalid job spec: " + "; ".join(problems))
    return spec
