"""Tiny Wan2.1 text-to-video and image-to-video model directories with deterministic random weights.

For tests and CPU farms. A t2v directory has the same layout and classes as
``Wan2.1-T2V-1.3B-Diffusers`` (``model_index.json``, ``tokenizer/``,
``text_encoder/``, ``transformer/``, ``vae/``, ``scheduler/``); an i2v one
those of ``Wan2.1-I2V-14B-480P-Diffusers`` (the same plus ``image_encoder/``, a
CLIP vision tower, and ``image_processor/``, its preprocessing config, with a
36-channel DiT that cross-attends to image features). The loaders in
`workers.models.loading` and diffusers' ``WanPipeline`` /
``WanImageToVideoPipeline.from_pretrained`` open them unchanged. The tokenizer
is built here from a word list; nothing is downloaded. The same seed always
gives byte-identical weight files, and a 17-frame 64x64 4-step job takes
seconds on a CPU.

A marker file, ``reelfarm_tiny.json``, says the directory was written here (with
which seed, and for i2v the task), so that building into it again is a no-op
and building into any other non-empty directory is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
COMPONENTS: tuple[Component, ...] = TASK_COMPONENTS["t2v"]
I2V_COMPONENTS: tuple[Component, ...] = TASK_COMPONENTS["i2v"]

TEXT_DIM = 32
CROSS_ATTENTION_GAIN = 4.0
CONDITION_GAIN = 16.0
LATENT_CHANNELS = 16  # the Wan2.1 VAE's z_dim
# An i2v DiT's input per step: the noisy latents, then the image condition
# (4 first-frame mask channels + the VAE latents of the conditioning video).
I2V_IN_CHANNELS = LATENT_CHANNELS + 4 + LATENT_CHANNELS
# The tiny CLIP tower: 32x32 crops cut into 8x8 patches give 16 patch tokens
# plus the class token, 17 image tokens (the real ViT-H/14 at 224 gives 257).
IMAGE_SIZE = 32
IMAGE_PATCH_SIZE = 8
IMAGE_DIM = 32

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


def build_tiny_model(model_dir: Path, *, seed: int = 0, i2v: bool = False) -> Path:
    """Write a tiny Wan2.1 t2v (or, with ``i2v``, image-to-video) model into ``model_dir`` (new or empty).

    Returns ``model_dir``. A no-op when it already holds a complete tiny model
    for the same task built with ``seed``; `ModelDirError` when it holds
    anything else. The directory appears complete or not at all: the model is
    written beside it and renamed into place.
    """
    model_dir = Path(model_dir)
    task: ModelTask = "i2v" if i2v else "t2v"
    if holds_tiny_model(model_dir, seed=seed, task=task):
        return model_dir
    _refuse_foreign_contents(model_dir, seed, task)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.building-", dir=model_dir.parent))
    try:
        _write_model(staging, seed, task)
        if model_dir.exists():
            model_dir.rmdir()  # empty, checked above
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def holds_tiny_model(model_dir: Path, *, seed: int | None = None, task: ModelTask | None = None) -> bool:
    """Whether ``model_dir`` is a complete tiny model written here (built with ``seed``, for ``task``, if given)."""
    marker = _read_marker(Path(model_dir))
    if marker is None or (seed is not None and marker.get("seed") != seed):
        return False
    marker_task = _marker_task(marker)
    if task is not None and marker_task != task:
        return False
    try:
        check_model_dir(Path(model_dir), TASK_COMPONENTS[marker_task])
    except ModelDirError:
        return False
    return True


def _refuse_foreign_contents(model_dir: Path, seed: int, task: ModelTask) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is a file, not a directory; choose a new or empty directory")
    if not model_dir.exists() or not any(model_dir.iterdir()):
        return
    marker = _read_marker(model_dir)
    if marker is not None and _marker_task(marker) != task:
        raise ModelDirError(
            f"{model_dir} holds a tiny {_marker_task(marker)} model, not {task}; choose a new directory for the {task} model"
        )
    if marker is not None and marker.get("seed") != seed:
        raise ModelDirError(
            f"{model_dir} holds a tiny model built with seed {marker.get('seed')}, not {seed}; "
            "pass that seed or choose a new directory"
        )
    raise ModelDirError(
        f"refusing to write a tiny model into {model_dir}: it is not empty and holds no complete tiny model; "
        "choose a new or empty directory"
    )


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _marker_task(marker: dict[str, Any]) -> ModelTask:
    # t2v markers carry no task (they predate i2v and stay byte-identical).
    return "i2v" if marker.get("task") == "i2v" else "t2v"


def _write_model(model_dir: Path, seed: int, task: ModelTask) -> None:
    tokenizer = tiny_tokenizer()
    # Each component draws from its own seed, so resizing one leaves the others' weights unchanged
    # (and a t2v and an i2v model with one seed share their text encoder and VAE, as Wan2.1's do).
    # The pipelines' annotations name AutoTokenizer and FlowMatchEulerDiscreteScheduler; Wan2.1 ships these.
    text_encoder = _seeded(seed, 0, lambda: tiny_text_encoder(vocab_size=len(tokenizer)))
    vae = _seeded(seed, 2, tiny_vae)
    pipeline: DiffusionPipeline
    if task == "t2v":
        pipeline = WanPipeline(
            tokenizer=tokenizer,  # type: ignore[arg-type]
            text_encoder=text_encoder,
            transformer=_seeded(seed, 1, tiny_transformer),
            vae=vae,
            scheduler=wan21_scheduler(),  # type: ignore[arg-type]
        )
        marker: dict[str, Any] = {"format": MARKER_FORMAT, "kind": "wan2.1-t2v-tiny", "seed": seed}
    else:
        with _quiet_transformers_warnings():
            # Imported here: importing it makes transformers resolve CLIPImageProcessor and, without
            # torchvision, warn about its PIL fallback, which is noise for a t2v build and this CLI.
            from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
        pipeline = WanImageToVideoPipeline(
            tokenizer=tokenizer,  # type: ignore[arg-type]
            text_encoder=text_encoder,
            vae=vae,
            scheduler=wan21_scheduler(),  # type: ignore[arg-type]
            image_processor=tiny_image_processor(),  # type: ignore[arg-type]
            image_encoder=_seeded(seed, 3, tiny_image_encoder),
            transformer=_seeded(seed, 1, lambda: tiny_i2v_transformer(vae)),
        )
        marker = {"format": MARKER_FORMAT, "kind": "wan2.1-i2v-tiny", "seed": seed, "task": "i2v"}
    with quiet_transformers_progress():  # the CLI's output is one line
        pipeline.save_pretrained(model_dir, safe_serialization=True)
    if task == "i2v":
        _name_image_processor_as_wan21(model_dir)
    (model_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


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


def tiny_tokenizer() -> T5Tokenizer:
    """A T5-style unigram tokenizer (pad 0, eos 1, unk 2, eos appended) over a small English word list."""
    # Scores are log-probabilities: whole words (-5) beat spelling them out (-10 per character).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{word}", -5.0) for word in _WORDS]
    vocab += [(char, -10.0) for char in _CHARACTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    """A 2-layer umT5 encoder (d_model 32) with umT5-XXL's gated-GELU feed-forward and relative attention."""
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def tiny_transformer(*, image_dim: int | None = None) -> WanTransformer3DModel:
    """A 2-layer Wan DiT: 2 heads x 12 dims (4 per 3D-RoPE axis), patch (1, 2, 2), 16 latent channels.

    With ``image_dim`` it is an i2v DiT, as in Wan2.1-I2V: 36 input channels
    (latents + image condition) and, in every cross-attention, extra key/value
    projections over the CLIP image features (``image_dim`` wide, embedded to
    the model width first, which is why ``added_kv_proj_dim`` is that width).
    """
    num_attention_heads, attention_head_dim = 2, 12
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=LATENT_CHANNELS if image_dim is None else I2V_IN_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else num_attention_heads * attention_head_dim,
        rope_max_seq_len=1024,
    ).eval()
    _sharpen_cross_attention(transformer, gain=CROSS_ATTENTION_GAIN)
    return transformer


def tiny_i2v_transformer(vae: AutoencoderKLWan) -> WanTransformer3DModel:
    """The tiny DiT as a Wan2.1-I2V one (36 input channels, image cross-attention), condition-sensitive for ``vae``."""
    transformer = tiny_transformer(image_dim=IMAGE_DIM)
    _amplify_image_condition(transformer, vae, gain=CONDITION_GAIN)
    return transformer


def _amplify_image_condition(transformer: WanTransformer3DModel, vae: AutoencoderKLWan, gain: float) -> None:
    # A random VAE encoder barely responds to its input: after the latents
    # mean/std normalisation, the image-dependent part of the condition's
    # latent channels varies by ~0.04 around a fixed per-channel value, against
    # noise latents of std 1. Swapping the condition image then moved the
    # frames by ~0.6/255 on average: too close to rounding for a lost or
    # swapped condition to show reliably. (A trained I2V DiT follows its first
    # frame closely.) So the patch embedding's weights on those channels are
    # multiplied by ``gain`` about the normalised value of an all-zero raw
    # latent (the bias absorbs the offset), so only the image-dependent part is
    # amplified; swapping the image then moves frames by ~5/255.
    config = vae.config
    zero_latent = -torch.tensor(config["latents_mean"]) / torch.tensor(config["latents_std"])
    condition_latents = slice(I2V_IN_CHANNELS - LATENT_CHANNELS, I2V_IN_CHANNELS)
    weight, bias = transformer.patch_embedding.weight, transformer.patch_embedding.bias
    if bias is None:
        raise RuntimeError("the Wan DiT's patch embedding has no bias to absorb the condition offset")
    with torch.no_grad():
        condition_weight = weight[:, condition_latents]  # [out, 16, *patch], a view
        offset = torch.einsum("oc,c->o", condition_weight.sum(dim=(2, 3, 4)), zero_latent)
        condition_weight.mul_(gain)
        bias.sub_((gain - 1.0) * offset)


def _sharpen_cross_attention(transformer: WanTransformer3DModel, gain: float) -> None:
    # A prompt has a handful of real tokens among 512 zero-padded positions. With
    # unit q/k norm gains, random weights spread cross-attention evenly over
    # them all, so the prompt (and so CFG) moves the DiT's output by ~0.1%:
    # below one uint8 step, where a lost or swapped embedding in the hand-off
    # would go unseen. Trained models learn larger gains; a fixed 4 makes the
    # prompt move the output by ~10%.
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".attn2.norm_q." in name or ".attn2.norm_k." in name:
                parameter.fill_(gain)


def tiny_image_encoder() -> CLIPVisionModel:
    """A 2-layer CLIP vision tower (width 32, 32x32 input, 8x8 patches: 17 tokens) in Wan2.1-I2V's layout.

    The pipeline takes the penultimate layer's hidden states, so two layers
    are the fewest that make that differ from the embeddings.
    """
    config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM,
        intermediate_size=64,
        projection_dim=IMAGE_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_PATCH_SIZE,
        hidden_act="gelu",  # Wan2.1-I2V's ViT-H/14 (open_clip) uses exact GELU, not OpenAI CLIP's quick_gelu
        layer_norm_eps=1e-5,
    )
    return CLIPVisionModel(config).eval()


def tiny_image_processor() -> BaseImageProcessor:
    """Wan2.1-I2V's CLIP preprocessing (bicubic shortest-edge resize, center crop, OpenAI CLIP mean/std) at 32 px."""
    # Only its config is saved, so the PIL class (present on every install) writes the same
    # preprocessor_config.json as the torchvision one would, without needing torchvision.
    processor: BaseImageProcessor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    return processor


def tiny_vae() -> AutoencoderKLWan:
    """Wan2.1's causal VAE layout (8x spatial, 4x temporal, z_dim 16) with 8 base channels and 1 block per level."""
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()


def wan21_scheduler() -> UniPCMultistepScheduler:
    """The scheduler Wan2.1-T2V ships with: UniPC on flow-matching sigmas, shift 3.0 (480p)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
