"""Loading one model component at a time from a Wan2.1 model directory in diffusers format.

A stage worker keeps only its own stage's component(s) resident, so each
loader opens exactly one part of the directory (``text_encoder/``,
``transformer/``, ``vae/``, ``scheduler/``, and for image-to-video
``image_encoder/`` with ``image_processor/``). The same code opens real
``Wan2.1-T2V-1.3B-Diffusers`` / ``Wan2.1-I2V-14B-480P-Diffusers`` checkouts and
tiny models written by ``workers.models.tiny``; `model_task` says which task a
directory serves. Everything is read with ``local_files_only=True``: nothing
here ever reaches a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import diffusers
import torch
import transformers
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_accelerate_available
from transformers import AutoTokenizer, BaseImageProcessor, CLIPVisionModel, PreTrainedTokenizerBase, UMT5EncoderModel
from transformers.utils import logging as transformers_logging

from scheduler.core.model_catalog import PIPELINE_TASKS
from workers.models.ti2v import check_expand_timesteps

Component = Literal[
    "tokenizer", "text_encoder", "transformer", "transformer_2", "vae", "scheduler", "image_encoder", "image_processor"
]
ModelTask = Literal["t2v", "i2v"]
# A Wan2.2-A14B expert and the folder its DiT is in: "high" runs the timesteps at or above
# boundary_ratio * num_train_timesteps, "low" the rest (diffusers' transformer / transformer_2).
Expert = Literal["high", "low"]
EXPERT_FOLDERS: dict[Expert, Component] = {"high": "transformer", "low": "transformer_2"}

# What each task's directory holds (diffusers' save_pretrained layout).
TASK_COMPONENTS: dict[ModelTask, tuple[Component, ...]] = {
    "t2v": ("tokenizer", "text_encoder", "transformer", "vae", "scheduler"),
    "i2v": ("tokenizer", "text_encoder", "transformer", "vae", "scheduler", "image_encoder", "image_processor"),
}
MODEL_INDEX_FILE = "model_index.json"

TINY_MODEL_HINT = (
    "point it at a Wan2.1 diffusers checkout, or build a tiny test model with `python -m workers.models tiny DIR`"
)

# What must exist in each component folder before a loader is worth starting:
# a config, and (for models) at least one weights file or a shard index.
_CONFIG_FILE: dict[Component, str] = {
    "tokenizer": "tokenizer_config.json",
    "text_encoder": "config.json",
    "transformer": "config.json",
    "transformer_2": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
    "image_encoder": "config.json",
    "image_processor": "preprocessor_config.json",
}
_WEIGHT_PATTERNS: dict[Component, tuple[str, ...]] = {
    "tokenizer": ("tokenizer.json", "spiece.model"),
    "text_encoder": ("*.safetensors", "*.safetensors.index.json", "*.bin"),
    "transformer": ("*.safetensors", "*.safetensors.index.json", "*.bin"),
    "transformer_2": ("*.safetensors", "*.safetensors.index.json", "*.bin"),
    "vae": ("*.safetensors", "*.safetensors.index.json", "*.bin"),
    "scheduler": (),
    "image_encoder": ("*.safetensors", "*.safetensors.index.json", "*.bin"),
    "image_processor": (),
}


class DenoisingScheduler(Protocol):
    """What the denoising loop uses of a diffusers scheduler (their base class declares none of it)."""

    config: Mapping[str, Any]
    timesteps: torch.Tensor

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> DenoisingScheduler: ...

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None: ...

    def set_begin_index(self, begin_index: int = 0) -> None: ...

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True
    ) -> Any: ...


class ModelDirError(ValueError):
    """A model directory that cannot serve a stage; the message is one line saying what is missing and what to do."""


def check_model_dir(model_dir: Path, components: Iterable[Component]) -> None:
    """Raise `ModelDirError` naming the first missing folder or file among ``components``."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelDirError(f"model dir {model_dir} does not exist; {TINY_MODEL_HINT}")
    if not model_dir.is_dir():
        raise ModelDirError(f"model dir {model_dir} is a file, not a directory; {TINY_MODEL_HINT}")
    for component in components:
        folder = model_dir / component
        if not folder.is_dir():
            raise ModelDirError(f"model dir {model_dir} has no {component}/ folder; {TINY_MODEL_HINT}")
        config = folder / _CONFIG_FILE[component]
        if not config.is_file():
            raise ModelDirError(f"model dir {model_dir} is missing {component}/{config.name}; {TINY_MODEL_HINT}")
        patterns = _WEIGHT_PATTERNS[component]
        if patterns and not any(any(folder.glob(pattern)) for pattern in patterns):
            wanted = " or ".join(patterns)
            raise ModelDirError(f"model dir {model_dir} has no {wanted} in {component}/; {TINY_MODEL_HINT}")


def model_task(model_dir: Path) -> ModelTask:
    """Which task a model directory serves, from the pipeline class its ``model_index.json`` names.

    `ModelDirError` when the index is missing or unreadable, names another
    pipeline, or turns on Wan2.2 settings the stages do not implement (a second
    expert without a boundary or the reverse; expanded timesteps are run for one
    DiT, see `workers.models.ti2v`).
    """
    model_dir = Path(model_dir)
    index_path = model_dir / MODEL_INDEX_FILE
    if not model_dir.is_dir():
        raise ModelDirError(f"model dir {model_dir} does not exist or is not a directory; {TINY_MODEL_HINT}")
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"model dir {model_dir} has no {MODEL_INDEX_FILE}; {TINY_MODEL_HINT}") from None
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"cannot read {index_path} ({exc}); {TINY_MODEL_HINT}") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    # The scheduler's table, so submit and workers agree on a dir's task. Wan2.2's two-expert and
    # expand_timesteps variants use the same class names with settings the stages do not implement:
    # refused below.
    task = PIPELINE_TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        known = " or ".join(PIPELINE_TASKS)
        raise ModelDirError(f"{index_path} names pipeline {name!r}, not {known}; {TINY_MODEL_HINT}")
    _check_experts(index, index_path)
    try:  # Wan2.2-TI2V (expand_timesteps): `workers.models.ti2v` says which variants the stages run.
        check_expand_timesteps(index, index_path)
    except ValueError as exc:
        raise ModelDirError(str(exc)) from None
    return task


def _check_experts(index: Mapping[str, Any], index_path: Path) -> None:
    # save_pretrained writes an absent optional component as [null, null].
    second = index.get("transformer_2") not in (None, [None, None])
    first = index.get("transformer") not in (None, [None, None])
    boundary = index.get("boundary_ratio")
    if second != (boundary is not None):
        have, lacks = ("transformer_2", "boundary_ratio") if second else ("boundary_ratio", "transformer_2")
        raise ModelDirError(
            f"{index_path} sets {have} but no {lacks}; a Wan2.2 two-expert model needs both (diffusers' layout)"
        )
    if boundary is not None and not (isinstance(boundary, int | float) and 0.0 < float(boundary) < 1.0):
        raise ModelDirError(f"{index_path} sets boundary_ratio {boundary!r}; it must be a number between 0 and 1")
    if second and not first:
        raise ModelDirError(f"{index_path} has a low-noise expert (transformer_2) but no high-noise one (transformer)")


def dit_takes_clip_features(model_dir: Path) -> bool:
    """Whether the model's DiT cross-attends to CLIP image features (Wan2.1-I2V: ``image_dim`` set).

    Wan2.2-I2V-A14B's experts have none: they condition on the image's VAE latents alone, and
    ``WanImageToVideoPipeline`` keys on ``transformer.config.image_dim`` the same way.
    """
    try:
        config = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return True  # a Wan2.1-I2V layout is the default; check_model_dir reports the missing file
    return config.get("image_dim") is not None


def model_boundary_ratio(model_dir: Path) -> float | None:
    """A two-expert (Wan2.2-A14B) directory's ``boundary_ratio``; None for a one-DiT model."""
    model_task(model_dir)  # refuses malformed expert settings
    index = json.loads((Path(model_dir) / MODEL_INDEX_FILE).read_text())
    boundary = index.get("boundary_ratio")
    return None if boundary is None else float(boundary)


def load_text_encoder(
    model_dir: Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[PreTrainedTokenizerBase, UMT5EncoderModel]:
    """The tokenizer and the umT5 encoder, in eval mode on ``device``."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir, ("tokenizer", "text_encoder"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    with quiet_transformers_progress():
        text_encoder = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder", dtype=dtype, local_files_only=True)
    # transformers declares .to with functools.wraps(nn.Module.to), which mypy reads as unbound.
    return tokenizer, text_encoder.to(device).eval()  # type: ignore[call-arg,arg-type]


def load_image_encoder(
    model_dir: Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[BaseImageProcessor, CLIPVisionModel]:
    """The CLIP image processor and vision encoder (i2v models), the encoder in eval mode on ``device``."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir, ("image_processor", "image_encoder"))
    # Looked up by name on the transformers package, as WanImageToVideoPipeline.from_pretrained does
    # with model_index.json's "CLIPImageProcessor": transformers 5 resolves that name to the torchvision
    # backend, or to the PIL one when torchvision is missing, and the two round pixels differently.
    image_processor = transformers.CLIPImageProcessor.from_pretrained(
        model_dir / "image_processor", local_files_only=True
    )
    with quiet_transformers_progress():
        image_encoder = CLIPVisionModel.from_pretrained(model_dir / "image_encoder", dtype=dtype, local_files_only=True)
    return image_processor, image_encoder.to(device).eval()  # type: ignore[call-arg,arg-type]


def load_transformer(
    model_dir: Path, device: str | torch.device, dtype: torch.dtype, *, expert: Expert = "high"
) -> WanTransformer3DModel:
    """The DiT (a two-expert model's ``expert``; a one-DiT model has only "high"), in eval mode on ``device``."""
    model_dir = Path(model_dir)
    folder = EXPERT_FOLDERS[expert]
    check_model_dir(model_dir, (folder,))
    if not is_accelerate_available():
        # diffusers keeps some Wan DiT layers in float32 and can only do that through accelerate.
        raise ImportError("loading the Wan transformer needs the accelerate package: pip install accelerate")
    transformer = WanTransformer3DModel.from_pretrained(
        model_dir, subfolder=folder, torch_dtype=dtype, local_files_only=True
    )
    return transformer.to(device).eval()


def load_vae(model_dir: Path, device: str | torch.device, dtype: torch.dtype) -> AutoencoderKLWan:
    """The causal video VAE, in eval mode on ``device``."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir, ("vae",))
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval()


def vae_latent_stats(
    vae: AutoencoderKLWan, device: str | torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's ``latents_mean`` and the reciprocal of its ``latents_std``, shaped [1, z_dim, 1, 1, 1].

    The reciprocal, not the std: the Wan pipelines multiply by it to normalise and
    divide by it to denormalise, and keeping that keeps their rounding.
    """
    config = vae.config
    shape = (1, int(config["z_dim"]), 1, 1, 1)
    mean = torch.tensor(config["latents_mean"]).view(shape).to(device, dtype)
    inv_std = 1.0 / torch.tensor(config["latents_std"]).view(shape).to(device, dtype)
    return mean, inv_std


def load_scheduler(model_dir: Path, flow_shift: float | None) -> DenoisingScheduler:
    """The directory's noise scheduler; ``flow_shift`` None keeps the directory's value, else overrides it."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir, ("scheduler",))
    config_path = model_dir / "scheduler" / _CONFIG_FILE["scheduler"]
    scheduler_class = _scheduler_class(json.loads(config_path.read_text()), config_path)
    scheduler = scheduler_class.from_pretrained(model_dir, subfolder="scheduler", local_files_only=True)
    return fresh_scheduler(cast(DenoisingScheduler, scheduler), flow_shift)


def fresh_scheduler(template: DenoisingScheduler, flow_shift: float | None) -> DenoisingScheduler:
    """A new scheduler with ``template``'s config (schedulers keep per-job state, so each job needs its own)."""
    overrides: dict[str, Any] = {}
    if flow_shift is not None:
        if "flow_shift" not in template.config:
            raise ValueError(
                f"{type(template).__name__} has no flow_shift setting; leave flow_shift unset for this model"
            )
        overrides["flow_shift"] = float(flow_shift)
    return type(template).from_config(template.config, **overrides)


@contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Silence transformers' tqdm bars (loading and saving weights) in worker logs and one-line CLIs."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _scheduler_class(config: dict[str, Any], config_path: Path) -> type[SchedulerMixin]:
    # The class name comes from a file on disk: only accept diffusers' own schedulers.
    name = config.get("_class_name", "")
    scheduler_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ModelDirError(f"{config_path} names {name!r}, which is not a diffusers scheduler; {TINY_MODEL_HINT}")
    return scheduler_class
