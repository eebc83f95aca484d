"""OpenAI's ``POST /v1/videos`` request, translated into a reelfarm job spec.

How OpenAI's parameters map (see README, "HTTP API"):

- ``size`` "WxH" -> ``width`` x ``height``, each a multiple of 16 (of 32 for a
  Wan2.2-TI2V model: 16x VAE x 2x2 patches) and within the farm's
  ``limits.max_width``/``max_height``; left out: the farm's default size.
- ``seconds`` -> ``frames = 4 * round(seconds * fps / 4) + 1`` (Wan's causal VAE
  makes 4k+1 frames), at most ``limits.max_frames``; left out: the farm's default frames.
- ``model`` -> one of the farm's models by name; left out: one that does the task.
- ``input_reference`` -> image-to-video: an uploaded image (multipart), or
  ``{"image_url": "https://..."}`` fetched under the farm's fetch policy, or an
  ``s3://`` URI in the farm's own bucket. Local paths are refused: the server's
  disk is not the caller's, and reading it would hand out whatever the server can read.
  Other buckets are refused for the same reason (the farm's S3 credentials are not the caller's).
- reelfarm's own spec fields (``seed``, ``steps``, ``guidance_scale``,
  ``negative_prompt``, ``flow_shift``, ``fps``, ``codec``, ``priority``,
  ``resize``, ``output_prefix``, ``loras``) may come as extra body fields.

Every refusal is a 400 naming the parameter.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scheduler.core.image_checks import ImageInputError, parse_image_source
from scheduler.core.model_catalog import model_for_task, read_size_multiple, size_off_grid
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import CodecOptions, JobSpec
from scheduler.http.errors import ApiError

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
# Form fields of nested values arrive as "codec[name]" (the openai SDK's multipart encoding).
_BRACKETS = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[[A-Za-z0-9_]*\])+)$")


class ImageReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(default=None, max_length=2048)
    file_id: str | None = None


# Spec fields a request sets through OpenAI's own parameters instead (size, seconds, input_reference, model).
_MAPPED_SPEC_FIELDS = {"width": "size", "height": "size", "frames": "seconds", "image": "input_reference"}


class VideoCreateRequest(BaseModel):
    """The JSON (or multipart) body of ``POST /v1/videos``.

    The spec fields listed here are documented in the schema; any other field of ``JobSpec`` (one a newer
    farm added) passes through as well, and anything else is refused, naming it.
    """

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, max_length=64)
    seconds: str | float | None = None
    size: str | None = Field(default=None, max_length=16)
    input_reference: ImageReference | str | None = None
    # reelfarm's own spec fields
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    # Wan2.2 two-expert models: the low-noise expert's guidance (refused with one line on a one-DiT model).
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    fps: int | None = None
    codec: CodecOptions | None = None
    priority: Literal["high", "default", "low"] | None = None
    resize: Literal["resize", "center_crop"] | None = None
    output_prefix: str | None = None
    # The farm's LoRAs for this video, e.g. [{"name": "style", "scale": 0.8}] (checked at submit, naming the field).
    loras: list[dict[str, Any]] | None = None


_PASSED_THROUGH = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "guidance_scale_2",
    "flow_shift",
    "fps",
    "priority",
    "resize",
    "output_prefix",
    "loras",
)


def parse_request(raw: dict[str, Any]) -> VideoCreateRequest:
    for name in raw:
        if name in _MAPPED_SPEC_FIELDS:
            raise ApiError(
                400, f"{name}: set it with the {_MAPPED_SPEC_FIELDS[name]} parameter", param=name, code="invalid_value"
            )
        if name not in VideoCreateRequest.model_fields and name not in JobSpec.model_fields:
            raise ApiError(
                400,
                f"{name}: unknown parameter (check the spelling; reelfarm's spec fields are listed in its README)",
                param=name,
                code="invalid_value",
            )
    try:
        return VideoCreateRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}", param=param, code="invalid_value") from None


def form_to_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Multipart fields as one nested dict: ``codec[name]=h264`` -> ``{"codec": {"name": "h264"}}``."""
    out: dict[str, Any] = {}
    for name, value in items:
        match = _BRACKETS.match(name)
        if not match:
            out[name] = value
            continue
        path = [match.group(1), *re.findall(r"\[([A-Za-z0-9_]*)\]", match.group(2))]
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ApiError(400, f"{name}: conflicts with field {part!r}", param=path[0], code="invalid_value")
            node = child
        node[path[-1]] = value
    return out


def parse_size(size: str, settings: FarmSettings, model: str | None = None) -> tuple[int, int]:
    """``size`` as (width, height) on the grid of ``model`` (16 pixels for Wan2.1, 32 for Wan2.2-TI2V)."""
    match = _SIZE.match(size)
    if not match:
        raise ApiError(
            400, f"size {size!r}: write it as WIDTHxHEIGHT, e.g. 832x480", param="size", code="invalid_value"
        )
    width, height = int(match.group(1)), int(match.group(2))
    limits = settings.limits
    if width % 16 or height % 16 or width < 16 or height < 16:
        raise ApiError(
            400,
            f"size {size!r}: width and height must be multiples of 16 (e.g. 832x480)",
            param="size",
            code="invalid_value",
        )
    model_dir = settings.model_dirs().get(model) if model is not None else None
    off_grid = None if model_dir is None else size_off_grid(width, height, read_size_multiple(model_dir))
    if off_grid is not None:
        raise ApiError(400, f"size {size!r}: model {model!r} {off_grid}", param="size", code="invalid_value")
    if width > limits.max_width or height > limits.max_height:
        raise ApiError(
            400,
            f"size {size!r} is over this farm's maximum {limits.max_width}x{limits.max_height}; ask for a smaller size",
            param="size",
            code="invalid_value",
        )
    return width, height


def frames_for(seconds: str | float, fps: int, settings: FarmSettings) -> int:
    try:
        value = float(seconds)
    except ValueError:
        raise ApiError(
            400, f"seconds {seconds!r}: give a number, e.g. 4", param="seconds", code="invalid_value"
        ) from None
    if not value > 0 or value > 3600:
        raise ApiError(
            400, f"seconds {seconds!r}: give a positive duration, e.g. 4", param="seconds", code="invalid_value"
        )
    frames = 4 * max(1, round(value * fps / 4)) + 1
    most = settings.limits.max_frames
    if frames > most:
        longest = (4 * ((most - 1) // 4)) / fps
        raise ApiError(
            400,
            f"seconds {seconds}: {frames} frames at {fps} fps is over this farm's maximum of {most} frames; "
            f"ask for at most {longest:g} seconds (or a lower fps)",
            param="seconds",
            code="invalid_value",
        )
    return frames


def image_source(reference: ImageReference | str, settings: FarmSettings) -> str:
    """The image source a reference names, if the API may use it (see the module docstring)."""
    if isinstance(reference, ImageReference):
        if reference.file_id is not None:
            raise ApiError(
                400,
                "input_reference.file_id is not supported; upload the image as input_reference (multipart) or give image_url",
                param="input_reference",
                code="unsupported_value",
            )
        if not reference.image_url:
            raise ApiError(400, "input_reference: give image_url or upload a file", param="input_reference")
        reference = reference.image_url
    try:
        kind, where = parse_image_source(reference)
    except ImageInputError as exc:
        raise ApiError(400, f"input_reference: {exc}", param="input_reference", code="invalid_value") from None
    if kind == "path":
        raise ApiError(
            400,
            "input_reference: local paths are refused over HTTP; upload the image (multipart input_reference) or give an https:// URL",
            param="input_reference",
            code="invalid_value",
        )
    if kind == "s3" and where.split("/", 1)[0] != settings.s3.bucket:
        raise ApiError(
            400,
            f"input_reference: only objects in this farm's bucket {settings.s3.bucket!r} may be named; upload the image instead",
            param="input_reference",
            code="invalid_value",
        )
    return reference


def to_spec(request: VideoCreateRequest, settings: FarmSettings) -> dict[str, Any]:
    """The raw job spec for ``reelfarm``'s ``submit`` (which validates the rest, naming the field)."""
    raw: dict[str, Any] = {
        name: getattr(request, name) for name in _PASSED_THROUGH if getattr(request, name) is not None
    }
    if request.codec is not None:
        raw["codec"] = request.codec.model_dump()
    if request.model is not None:
        if request.model not in settings.model_dirs():
            served = ", ".join(settings.model_dirs())
            raise ApiError(
                400,
                f"model {request.model!r} is not served by this farm; use one of: {served} (or leave model out)",
                param="model",
                code="model_not_found",
            )
        raw["model"] = request.model
    if request.size is not None:
        # The model that will render it (the one named, else the one submit picks for the task) sets the grid.
        task: Literal["t2v", "i2v"] = "t2v" if request.input_reference is None else "i2v"
        model = request.model if request.model is not None else model_for_task(settings, task)
        raw["width"], raw["height"] = parse_size(request.size, settings, model)
    if request.seconds is not None:
        fps = request.fps or int(settings.spec_defaults.get("fps", JobSpec.model_fields["fps"].default))
        raw["frames"] = frames_for(request.seconds, fps, settings)
    if request.input_reference is not None:
        raw["image"] = image_source(request.input_reference, settings)
    return raw


def new_video_id(idempotency_key: str | None, key_name: str) -> str:
    """A fresh job id, or, with an ``Idempotency-Key``, the same id for every retry of one create by one
    API key (``key_name``): two tenants' keys of the same spelling are two videos."""
    if idempotency_key is None:
        return "video_" + uuid.uuid4().hex[:24]
    if not 1 <= len(idempotency_key) <= 255:
        raise ApiError(400, "Idempotency-Key: give 1-255 characters", param="Idempotency-Key", code="invalid_value")
    scoped = json.dumps(["idempotency", key_name, idempotency_key]).encode()
    return "video_" + hashlib.sha256(scoped).hexdigest()[:24]


def request_digest(raw: dict[str, Any], image: bytes | None) -> str:
    """What a create asked for, as a digest: the body's fields (key order aside) and the uploaded image."""
    body = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str).encode()
    digest = hashlib.sha256(body)
    digest.update(b"\0" + hashlib.sha256(image or b"").digest())
    return digest.hexdigest()


def decode_json_body(body: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(body or b"{}")
    except ValueError as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object", code="invalid_json"
        ) from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return raw
