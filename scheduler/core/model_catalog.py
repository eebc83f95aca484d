"""Which models a farm serves and what task each does, read without torch.

The scheduler checks a job against its model before enqueueing: an image job
for a text-to-video model (or the reverse) is refused at submit, not at the
worker. The task comes from the model dir's ``model_index.json`` when the
scheduler can see the dir; otherwise workers check it when they load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from scheduler.core.lora_catalog import LoraEntry, check_job_loras, lora_catalog
from scheduler.core.model_dirs import model_has_two_experts
from scheduler.core.route import Route, route_for
from scheduler.core.settings import FarmSettings
from scheduler.core.spec import JobSpec, SpecError

PIPELINE_TASKS: dict[str, Literal["t2v", "i2v"]] = {
    "WanPipeline": "t2v",
    "WanImageToVideoPipeline": "i2v",
}


def read_model_task(model_dir: Path) -> Literal["t2v", "i2v"] | None:
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return PIPELINE_TASKS.get(index.get("_class_name", ""))


# Wan2.1's grid: 8x VAE x (1, 2, 2) DiT patches. Every job spec is already held to it.
WAN21_SIZE_MULTIPLE = 16


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_size_multiple(model_dir: Path) -> int:
    """The pixel grid a model's videos must lie on: its VAE's spatial compression x its DiT's spatial patch.

    16 for Wan2.1 (8 x 2); 32 for Wan2.2-TI2V (its VAE compresses 16x). Read from the dir's configs
    (diffusers' defaults where a key is absent); Wan2.1's 16 when the scheduler cannot see the dir.
    """
    vae = _json(model_dir / "vae" / "config.json")
    transformer = _json(model_dir / "transformer" / "config.json")
    spatial = vae.get("scale_factor_spatial") or 8
    patch = transformer.get("patch_size") or (1, 2, 2)
    try:
        multiple = int(spatial) * int(patch[1])
    except (TypeError, ValueError, IndexError):
        return WAN21_SIZE_MULTIPLE
    return max(WAN21_SIZE_MULTIPLE, multiple)


def size_off_grid(width: int, height: int, multiple: int) -> str | None:
    """Why ``width`` x ``height`` is off a ``multiple``-pixel grid, with the nearest size below it; None if on it."""
    if not width % multiple and not height % multiple:
        return None
    fitted = f"{max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}"
    return f"needs width and height in multiples of {multiple} (got {width}x{height}; e.g. {fitted})"


def check_job_model(settings: FarmSettings, spec: JobSpec) -> None:
    models = settings.model_dirs()
    if spec.model not in models:
        raise SpecError(
            f"invalid job spec: model: {spec.model!r} is not served by this farm (it serves: {', '.join(models)})"
        )
    task = read_model_task(models[spec.model])
    if task is not None and task != spec.task:
        need = "an image (--image)" if task == "i2v" else "no image"
        raise SpecError(f"invalid job spec: model {spec.model!r} is a {task} model and needs {need}")
    # Wan2.2-TI2V's 16x VAE puts its videos on a 32-pixel grid, coarser than the spec's own 16.
    multiple = read_size_multiple(models[spec.model])
    off_grid = size_off_grid(spec.width, spec.height, multiple)
    if off_grid is not None:
        field = "width" if spec.width % multiple else "height"
        raise SpecError(f"invalid job spec: {field}: model {spec.model!r} {off_grid}")


def with_model_loras(settings: FarmSettings, spec: JobSpec) -> JobSpec:
    """``spec`` with its model's default LoRAs (settings ``model_options``) before its own; one the job names wins."""
    options = settings.model_options.get(spec.model)
    if options is None or not options.loras:
        return spec
    named = {choice.name for choice in spec.loras}
    defaults = tuple(choice for choice in options.loras if choice.name not in named)
    merged = (*defaults, *spec.loras)
    if len(merged) > settings.limits.max_loras:
        raise SpecError(
            f"invalid job spec: loras: with model {spec.model!r}'s {len(defaults)} default LoRAs this job has "
            f"{len(merged)}, over this farm's maximum {settings.limits.max_loras}"
        )
    return spec.model_copy(update={"loras": merged})


def model_for_task(settings: FarmSettings, task: Literal["t2v", "i2v"]) -> str | None:
    """The first configured model that does ``task`` (for a job that named no model)."""
    for name, model_dir in settings.model_dirs().items():
        if read_model_task(model_dir) == task:
            return name
    return None


class ModelChooser:
    """The model rules of submission: a job naming no model gets one that does its task, and the model must
    be served and do the job's task, and its LoRAs must be the farm's (the registered ones are read from
    ``conn``; without one, the settings' only). Answers are kept per model and task (they read model dirs
    from disk) and the LoRA catalog is read once, so one chooser serves a whole batch."""

    def __init__(self, settings: FarmSettings, conn: Any | None = None) -> None:
        self.settings = settings
        self.conn = conn
        self._for_task: dict[str, str | None] = {}
        self._refusals: dict[tuple[str, str], str | None] = {}
        self._loras: dict[str, LoraEntry] | None = None
        self._two_experts: dict[str, bool] = {}

    def has_two_experts(self, model: str) -> bool:
        """Whether ``model`` is a Wan2.2 two-expert one (False when its dir is not readable here)."""
        if model not in self._two_experts:
            model_dir = self.settings.model_dirs().get(model)
            self._two_experts[model] = model_dir is not None and model_has_two_experts(model_dir)
        return self._two_experts[model]

    def route(self, spec: JobSpec) -> Route:
        """The route a new job of ``spec`` takes: one hop per expert for a two-expert model placed ``split``
        (the default), else three hops or the farm's ``transform.split_at_step`` split."""
        options = self.settings.model_options.get(spec.model)
        split = self.has_two_experts(spec.model) and (options is None or options.experts in (None, "split"))
        return route_for(
            spec.steps, self.settings.transform.split_at_step, step_cached=spec.cache is not None, experts_split=split
        )

    def resolve(self, spec: JobSpec, named: bool) -> JobSpec:
        """``spec`` with its model chosen (unless ``named``) and checked; raises ``SpecError`` if refused."""
        if not named:
            if spec.task not in self._for_task:
                self._for_task[spec.task] = model_for_task(self.settings, spec.task)
            chosen = self._for_task[spec.task]
            if chosen is not None:
                spec = spec.model_copy(update={"model": chosen})
        key = (spec.model, spec.task)
        if key not in self._refusals:
            try:
                check_job_model(self.settings, spec)
                self._refusals[key] = None
            except SpecError as exc:
                self._refusals[key] = str(exc)
        refusal = self._refusals[key]
        if refusal is not None:
            raise SpecError(refusal)
        if spec.guidance_scale_2 is not None and not self.has_two_experts(spec.model):
            raise SpecError(
                f"invalid job spec: guidance_scale_2: model {spec.model!r} has one DiT, and guidance_scale_2 sets the "
                "low-noise expert's guidance of a Wan2.2 two-expert model; drop it or pick such a model"
            )
        spec = with_model_loras(self.settings, spec)
        if spec.loras:
            if self._loras is None:
                self._loras = lora_catalog(self.settings, self.conn)
            check_job_loras(spec, self._loras, self.settings.model_dirs().get(spec.model))
        return spec
