"""Tiny Wan2.1 text-to-video and image-to-video architectures, for tests and the embedded default.

A t2v directory has the same layout and classes as ``Wan2.1-T2V-1.3B-Diffusers``
(``model_index.json``, ``tokenizer/``, ``text_encoder/``, ``transformer/``,
``vae/``, ``scheduler/``); an i2v one those of ``Wan2.1-I2V-14B-480P-Diffusers``
(the same plus ``image_encoder/``, a CLIP vision tower, and
``image_processor/``, its preprocessing config, with a 36-channel DiT that
cross-attends to image features). `workers.models.build` writes them; the
loaders in `workers.models.loading` and diffusers' ``WanPipeline`` /
``WanImageToVideoPipeline.from_pretrained`` open them unchanged. The same seed
always gives byte-identical weight files, and a 17-frame 64x64 4-step job takes
seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from workers.models.build import ModelArch, build_model

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

# A 2-layer umT5 encoder (d_model 32) with umT5-XXL's gated-GELU feed-forward and relative attention.
TINY_TEXT_ENCODER = {
    "d_model": TEXT_DIM,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# A 2-layer Wan DiT: 2 heads x 12 dims (4 per 3D-RoPE axis), patch (1, 2, 2), 16 latent channels.
_TINY_HEADS, _TINY_HEAD_DIM = 2, 12
TINY_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": _TINY_HEADS,
    "attention_head_dim": _TINY_HEAD_DIM,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 48,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
# As Wan2.1-I2V: 36 input channels (latents + image condition) and, in every cross-attention, extra
# key/value projections over the CLIP image features (IMAGE_DIM wide, embedded to the model width
# first, which is why added_kv_proj_dim is that width).
TINY_I2V_TRANSFORMER = {
    **TINY_TRANSFORMER,
    "in_channels": I2V_IN_CHANNELS,
    "image_dim": IMAGE_DIM,
    "added_kv_proj_dim": _TINY_HEADS * _TINY_HEAD_DIM,
}

# Wan2.1's causal VAE layout (8x spatial, 4x temporal, z_dim 16) with 8 base channels and 1 block per level.
TINY_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

# A 2-layer CLIP vision tower (width 32, 32x32 input, 8x8 patches: 17 tokens) in Wan2.1-I2V's layout.
# The pipeline takes the penultimate layer's hidden states, so two layers are the fewest that make
# that differ from the embeddings.
TINY_IMAGE_ENCODER = {
    "hidden_size": IMAGE_DIM,
    "intermediate_size": 64,
    "projection_dim": IMAGE_DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": IMAGE_PATCH_SIZE,
    "hidden_act": "gelu",  # Wan2.1-I2V's ViT-H/14 (open_clip) uses exact GELU, not OpenAI CLIP's quick_gelu
    "layer_norm_eps": 1e-5,
}


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


def _tune_tiny_t2v(transformer: WanTransformer3DModel, vae: AutoencoderKLWan) -> None:
    _sharpen_cross_attention(transformer, gain=CROSS_ATTENTION_GAIN)


def _tune_tiny_i2v(transformer: WanTransformer3DModel, vae: AutoencoderKLWan) -> None:
    _sharpen_cross_attention(transformer, gain=CROSS_ATTENTION_GAIN)
    _amplify_image_condition(transformer, vae, gain=CONDITION_GAIN)


TINY_T2V = ModelArch(
    name="tiny",
    kind="wan2.1-t2v-tiny",
    label="tiny t2v",
    task="t2v",
    summary="tests and the embedded default: 2-layer DiT (dim 24), 8-channel VAE, 2-layer umT5 (width 32)",
    text_encoder=TINY_TEXT_ENCODER,
    transformer=TINY_TRANSFORMER,
    vae=TINY_VAE,
    tune=_tune_tiny_t2v,
    job={"width": 128, "height": 96, "frames": 33, "steps": 12},
)
# The same tiny model as a Wan2.1-I2V one: the CLIP tower and a 36-channel DiT that cross-attends to it.
TINY_I2V = replace(
    TINY_T2V,
    name="tiny-i2v",
    kind="wan2.1-i2v-tiny",
    label="tiny i2v",
    task="i2v",
    summary="tests and the embedded default: the tiny model as a Wan2.1-I2V one (CLIP tower, 36-channel DiT)",
    transformer=TINY_I2V_TRANSFORMER,
    image_encoder=TINY_IMAGE_ENCODER,
    image_size=IMAGE_SIZE,
    tune=_tune_tiny_i2v,
)


def build_tiny_model(model_dir: Path, *, seed: int = 0, i2v: bool = False) -> Path:
    """Write a tiny Wan2.1 t2v (or, with ``i2v``, image-to-video) model into ``model_dir`` (new or empty).

    Returns ``model_dir``. A no-op when it already holds a complete tiny model
    for the same task built with ``seed``; `ModelDirError` when it holds
    anything else.
    """
    return build_model(model_dir, TINY_I2V if i2v else TINY_T2V, seed=seed, known=_TINY_ARCHS)


# The kinds a refusal can name by label (a directory of another preset is named by its marker's kind).
_TINY_ARCHS = {arch.name: arch for arch in (TINY_T2V, TINY_I2V)}
