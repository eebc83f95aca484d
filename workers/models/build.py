"""Writing Wan2.1 model directories in diffusers format from an architecture, with deterministic random weights.

An architecture (`ModelArch`) is data: the constructor arguments of each
component (umT5 text encoder, Wan DiT, Wan VAE, and for image-to-video the CLIP
vision tower and its preprocessing size), plus an optional tuning step. The
tiny test models (`workers.models.tiny`) and the production-shape presets
(`workers.models.presets`) are all written here, by one function, so a preset
directory is loaded by exactly the code that loads a downloaded checkout.

- Weights: each component draws from its own seed (``seed * 1009 + index``),
  so resizing one leaves the others' weights unchanged, and one seed gives
  byte-identical files.
- Tokenizer: a T5-style unigram tokenizer built here from a word list (no hub).
- The directory appears complete or not at all: the model is written beside it
  and renamed into place.
- A marker file (``reelfarm_tiny.json``, its name from before there were
  presets) records the kind and seed, so building into it again is a no-op
  and building into any other non-empty directory is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from transformers import (
    BaseImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils import logging as transformers_logging

from workers.models.loading import (
    MODEL_INDEX_FILE,
    TASK_COMPONENTS,
    Component,
    ModelDirError,
    ModelTask,
    check_model_dir,
    quiet_transformers_progress,
)

ModelT = TypeVar("ModelT")

MARKER_FILE = "reelfarm_tiny.json"
MARKER_FORMAT = 1

Tune = Callable[[WanTransformer3DModel, AutoencoderKLWan], None]


@dataclass(frozen=True)
class ModelArch:
    """A model directory reelfarm can write: each component's constructor arguments, as data."""

    name: str  # what `reelfarm model build --arch` takes
    kind: str  # what the marker file records
    label: str  # how messages name it ("tiny t2v", "bench")
    task: ModelTask
    summary: str
    # UMT5Config arguments; the vocabulary size always comes from the local tokenizer.
    text_encoder: Mapping[str, Any]
    transformer: Mapping[str, Any]  # WanTransformer3DModel arguments
    vae: Mapping[str, Any]  # AutoencoderKLWan arguments
    # i2v only: CLIPVisionConfig arguments, and the square crop size its preprocessing uses.
    image_encoder: Mapping[str, Any] | None = None
    image_size: int | None = None
    # Weights are written in this dtype (the loaders cast to the worker's dtype).
    text_encoder_dtype: torch.dtype = torch.float32
    # Applied to freshly initialised weights (tiny models amplify signals random weights drown).
    tune: Tune | None = None
    # The job shape the preset is made for: spec defaults a farm serving it should use.
    job: Mapping[str, int] = field(default_factory=dict)
    # Wan2.2-A14B's layout: a second DiT (the low-noise expert, ``transformer_2``, the same shape with its
    # own weights) and the fraction of the timesteps from which it takes over. None: one DiT (Wan2.1).
    boundary_ratio: float | None = None
    # Wan2.2-TI2V (`workers.models.ti2v`): per-token timesteps in model_index.json; for i2v, no image encoder.
    expand_timesteps: bool = False
    # The scheduler's flow_shift as shipped (Wan2.1-T2V 480p and Wan2.2-A14B-Diffusers: 3.0; Wan2.2-TI2V: 5.0).
    flow_shift: float = 3.0

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def components(self) -> tuple[Component, ...]:
        """The folders a complete directory of this architecture holds (TI2V i2v has no image encoder)."""
        task = TASK_COMPONENTS["i2v" if self.image_encoder is not None else "t2v"]
        return (*task, "transformer_2") if self.two_experts else task

    def marker(self, seed: int) -> dict[str, Any]:
        marker: dict[str, Any] = {"format": MARKER_FORMAT, "kind": self.kind, "seed": seed}
        if self.task == "i2v":
            marker["task"] = "i2v"
        return marker


def build_model(model_dir: Path, arch: ModelArch, *, seed: int = 0, known: Mapping[str, ModelArch]) -> Path:
    """Write ``arch`` with weights from ``seed`` into ``model_dir`` (new or empty); returns ``model_dir``.

    A no-op when it already holds that model built with ``seed``; `ModelDirError`
    when it holds anything else (``known`` names the other kinds in the message).
    """
    model_dir = Path(model_dir)
    if holds_model(model_dir, arch, seed=seed):
        return model_dir
    _refuse_foreign_contents(model_dir, arch, seed, known)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.building-", dir=model_dir.parent))
    try:
        _write_model(staging, arch, seed)
        if model_dir.exists():
            model_dir.rmdir()  # empty, checked above
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def holds_model(model_dir: Path, arch: ModelArch, *, seed: int | None = None) -> bool:
    """Whether ``model_dir`` is a complete ``arch`` model written here (built with ``seed``, if given)."""
    marker = read_marker(Path(model_dir))
    if marker is None or marker.get("kind") != arch.kind or (seed is not None and marker.get("seed") != seed):
        return False
    try:
        check_model_dir(Path(model_dir), arch.components)
    except ModelDirError:
        return False
    return True


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _refuse_foreign_contents(model_dir: Path, arch: ModelArch, seed: int, known: Mapping[str, ModelArch]) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is a file, not a directory; choose a new or empty directory")
    if not model_dir.exists() or not any(model_dir.iterdir()):
        return
    marker = read_marker(model_dir)
    if marker is not None and marker.get("kind") != arch.kind:
        found = next((a.label for a in known.values() if a.kind == marker.get("kind")), str(marker.get("kind")))
        raise ModelDirError(
            f"{model_dir} holds a {found} model, not {arch.label}; choose a new directory for the {arch.label} model"
        )
    if marker is not None and marker.get("seed") != seed:
        raise ModelDirError(
            f"{model_dir} holds a {arch.label} model built with seed {marker.get('seed')}, not {seed}; "
            "pass that seed or choose a new directory"
        )
    raise ModelDirError(
        f"refusing to write a {arch.label} model into {model_dir}: it is not empty and holds no complete "
        f"{arch.label} model; choose a new or empty directory"
    )


def _write_model(model_dir: Path, arch: ModelArch, seed: int) -> None:
    tokenizer = local_tokenizer()
    # Component indices fix each component's seed; a t2v and an i2v model with one seed share their
    # text encoder and VAE, as Wan2.1's do. The pipelines' annotations name AutoTokenizer and
    # FlowMatchEulerDiscreteScheduler; Wan2.1 ships these.
    text_config = UMT5Config(vocab_size=len(tokenizer), **arch.text_encoder)
    text_encoder = _seeded(seed, 0, lambda: UMT5EncoderModel(text_config).eval())
    text_encoder = text_encoder.to(arch.text_encoder_dtype)  # type: ignore[call-arg,arg-type]
    vae = _seeded(seed, 2, lambda: AutoencoderKLWan(**arch.vae).eval())
    transformer = _seeded(seed, 1, lambda: WanTransformer3DModel(**arch.transformer).eval())
    # The low-noise expert: the same architecture with its own draw (index 4), so the experts differ.
    transformer_2 = (
        _seeded(seed, 4, lambda: WanTransformer3DModel(**arch.transformer).eval()) if arch.two_experts else None
    )
    if arch.tune is not None:
        arch.tune(transformer, vae)
        if transformer_2 is not None:
            arch.tune(transformer_2, vae)
    experts: dict[str, Any] = (
        {"transformer_2": transformer_2, "boundary_ratio": arch.boundary_ratio} if arch.two_experts else {}
    )
    pipeline: DiffusionPipeline
    scheduler = wan21_scheduler(arch.flow_shift)
    if arch.task == "t2v":
        pipeline = WanPipeline(
            tokenizer=tokenizer,  # type: ignore[arg-type]
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,  # type: ignore[arg-type]
            expand_timesteps=arch.expand_timesteps,
            **experts,
        )
    elif arch.image_encoder is None:
        pipeline = _clip_free_i2v_pipeline(tokenizer, text_encoder, transformer, vae, scheduler, arch, experts)
    else:
        if arch.image_encoder is None or arch.image_size is None:
            raise ValueError(f"architecture {arch.name} is i2v but names no image encoder or image size")
        image_config = CLIPVisionConfig(**arch.image_encoder)
        with _quiet_transformers_warnings():
            # Imported here: importing it makes transformers resolve CLIPImageProcessor and, without
            # torchvision, warn about its PIL fallback, which is noise for a t2v build and this CLI.
            from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
        pipeline = WanImageToVideoPipeline(
            tokenizer=tokenizer,  # type: ignore[arg-type]
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,  # type: ignore[arg-type]
            image_processor=clip_image_processor(arch.image_size),  # type: ignore[arg-type]
            image_encoder=_seeded(seed, 3, lambda: CLIPVisionModel(image_config).eval()),
            transformer=transformer,
        )
    with quiet_transformers_progress():  # the CLI's output is one line
        pipeline.save_pretrained(model_dir, safe_serialization=True)
    if arch.task == "i2v" and arch.image_encoder is not None:
        _name_image_processor_as_wan21(model_dir)
    (model_dir / MARKER_FILE).write_text(json.dumps(arch.marker(seed), indent=2) + "\n")


def _clip_free_i2v_pipeline(
    tokenizer: T5Tokenizer,
    text_encoder: UMT5EncoderModel,
    transformer: WanTransformer3DModel,
    vae: AutoencoderKLWan,
    scheduler: UniPCMultistepScheduler,
    arch: ModelArch,
    experts: dict[str, Any],
) -> DiffusionPipeline:
    # Wan2.2-TI2V as image-to-video (expand_timesteps) and Wan2.2-I2V-A14B (two experts): WanImageToVideoPipeline
    # with no CLIP tower (the DiT has no image_dim); save_pretrained records the absent image components as
    # [null, null].
    with _quiet_transformers_warnings():  # as for the Wan2.1 i2v build: importing it warns about CLIP's backend
        from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

    return WanImageToVideoPipeline(
        tokenizer=tokenizer,  # type: ignore[arg-type]
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,  # type: ignore[arg-type]
        transformer=transformer,
        expand_timesteps=arch.expand_timesteps,
        **experts,
    )


def _name_image_processor_as_wan21(model_dir: Path) -> None:
    # save_pretrained records the image processor's class as transformers 5
    # resolved it: "CLIPImageProcessorPil" where torchvision is missing. The
    # real checkpoint (and so the loaders) name "CLIPImageProcessor", which
    # each install resolves to its own backend; name that, so the directory's
    # bytes do not depend on whether torchvision was installed when it was built.
    index_path = model_dir / MODEL_INDEX_FILE
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    # diffusers' own config format: sorted keys, 2-space indent, final newline.
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextmanager
def _quiet_transformers_warnings() -> Iterator[None]:
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _seeded(seed: int, component_index: int, build: Callable[[], ModelT]) -> ModelT:
    # Model constructors initialise from the global RNG; fork it so callers' random streams are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + component_index)
        return build()


# Words get whole pieces so ordinary prompts tokenize to a few ids; single
# characters are the fallback for any other word (as in a sentencepiece vocab).
_WORDS = (
    "a an the and or of in on at to with through over under by from into near across "
    "red orange yellow green blue purple white black gray brown golden silver dark bright "
    "fox cat dog bird horse fish tree forest river lake sea ocean mountain snow rain sky cloud "
    "sun moon star city street car house room light fire water wind field flower grass "
    "running walking flying swimming jumping sitting standing dancing falling moving "
    "slow fast small big tall old young happy calm quiet loud cold warm "
    "blurry static low quality worst overexposed subtitles ugly deformed video frame camera shot"
).split()
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"


def local_tokenizer() -> T5Tokenizer:
    """A T5-style unigram tokenizer (pad 0, eos 1, unk 2, eos appended) over a small English word list."""
    # Scores are log-probabilities: whole words (-5) beat spelling them out (-10 per character).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{word}", -5.0) for word in _WORDS]
    vocab += [(char, -10.0) for char in _CHARACTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_image_processor(size: int) -> BaseImageProcessor:
    """Wan2.1-I2V's CLIP preprocessing (bicubic shortest-edge resize, center crop, OpenAI CLIP mean/std) at ``size``."""
    # Only its config is saved, so the PIL class (present on every install) writes the same
    # preprocessor_config.json as the torchvision one would, without needing torchvision.
    processor: BaseImageProcessor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    return processor


def wan21_scheduler(flow_shift: float = 3.0) -> UniPCMultistepScheduler:
    """The scheduler Wan ships with: UniPC on flow-matching sigmas, shift 3.0 (Wan2.1-T2V 480p; TI2V-5B: 5.0)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
    )
