"""The Wan2.2-TI2V architectures ``reelfarm model build DIR --arch NAME`` writes (listed in `workers.models.presets`).

- ``tiny-ti2v``: tests. The tiny DiT of `workers.models.tiny` with 48 latent
  channels, over the Wan2.2 VAE layout (``is_residual``, z_dim 48, patch 2:
  16x spatial, 4x temporal) at the smallest width that still runs every block
  (base 8, decoder base 12: the DupUp/AvgDown shortcuts need the widths in
  ratios of 2), with the tiny 2-layer umT5. Its ``model_index.json`` names
  ``WanPipeline`` with ``expand_timesteps``, so the directory serves
  **text-to-video** jobs.
- ``tiny-ti2v-i2v``: the same weights (same seed, same components) with an
  index naming ``WanImageToVideoPipeline`` with ``expand_timesteps`` and no
  image encoder, so it serves **image-to-video** jobs. The farm takes a
  directory's task from its pipeline class (`workers.models.loading.model_task`),
  so one TI2V checkpoint serving both tasks is two directories (the second can
  hard-link the first's weights); the frames of both equal diffusers'
  pipelines of the same name.
- ``wan2.2-ti2v-5b``: the published shapes of Wan2.2-TI2V-5B-Diffusers with
  random weights (rehearsals). The DiT, VAE and scheduler values are the
  published ones (``tests/test_model_presets_ti2v.py`` checks each against
  ``PUBLISHED_WAN22_TI2V_5B``); the umT5 text encoder is reduced as the
  1.3B rehearsal's is (full width, 2 of 24 layers, the local tokenizer's
  vocabulary), for the same reason. Text-to-video, as published.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from workers.models.build import ModelArch
from workers.models.tiny import CROSS_ATTENTION_GAIN, TINY_TEXT_ENCODER, TINY_TRANSFORMER, _sharpen_cross_attention

TI2V_LATENT_CHANNELS = 48  # the Wan2.2 VAE's z_dim

# Wan2.2-TI2V-5B as published. Sources: Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json,
# vae/config.json, scheduler/scheduler_config.json and model_index.json (expand_timesteps true), as written by
# diffusers' scripts/convert_wan_to_diffusers.py (its "Wan2.2-TI2V-5B" transformer config and
# vae22_diffusers_config, including the 48 latents_mean / latents_std values below; UniPC with flow_shift 5.0
# for TI2V); the same shapes in Wan's own wan/configs/wan_ti2v_5B.py (dim 3072, ffn_dim 14336, freq_dim 256,
# num_heads 24, num_layers 30, patch (1, 2, 2), vae_stride (4, 16, 16), z_dim 48, sample_shift 5.0,
# sample_steps 50, sample_guide_scale 5.0, frame_num 121, size 1280*704) and shared_config.py (umT5-XXL, 512 tokens).
PUBLISHED_WAN22_TI2V_5B: dict[str, dict[str, Any]] = {
    "transformer": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 24,
        "attention_head_dim": 128,  # dim 3072 = 24 x 128
        "in_channels": 48,
        "out_channels": 48,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 14336,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    },
    "vae": {
        "base_dim": 160,
        "decoder_base_dim": 256,
        "z_dim": 48,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "is_residual": True,
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "clip_output": False,
        "latents_mean": [
            -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
            -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
            -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
            -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
            -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
            0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
        ],
        "latents_std": [
            0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
            0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
            0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
            0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
            0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
            0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
        ],
    },
    "scheduler": {"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0},
    "model_index": {"_class_name": "WanPipeline", "expand_timesteps": True},
    # wan_ti2v_5B.py's sample defaults: 704x1280 (height x width), 121 frames (5 s at 24 fps), 50 steps, guidance 5.
    "job": {"width": 1280, "height": 704, "frames": 121, "steps": 50, "guidance_scale": 5.0},
}

# Keys AutoencoderKLWan does not take as constructor arguments (diffusers' config.json carries it, the
# class ignores it and always clamps).
_VAE_CONFIG_ONLY = ("clip_output",)


def _vae_arguments(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _VAE_CONFIG_ONLY}


# The Wan2.2 VAE's layout at tiny width: the real block structure (residual up/down blocks with their
# DupUp3D/AvgDown3D shortcuts, patch 2 over 12 channels) with 8 encoder / 12 decoder base channels and
# one residual block per level. The 48 mean/std values are the published ones, so normalisation is the real model's.
TINY_TI2V_VAE: dict[str, Any] = {
    **_vae_arguments(PUBLISHED_WAN22_TI2V_5B["vae"]),
    "base_dim": 8,
    "decoder_base_dim": 12,
    "num_res_blocks": 1,
}
TINY_TI2V_TRANSFORMER: dict[str, Any] = {
    **TINY_TRANSFORMER,
    "in_channels": TI2V_LATENT_CHANNELS,
    "out_channels": TI2V_LATENT_CHANNELS,
}


def _tune_tiny_ti2v(transformer: WanTransformer3DModel, vae: AutoencoderKLWan) -> None:
    _sharpen_cross_attention(transformer, gain=CROSS_ATTENTION_GAIN)


TINY_TI2V = ModelArch(
    name="tiny-ti2v",
    kind="wan2.2-ti2v-tiny",
    label="tiny ti2v",
    task="t2v",
    summary="tests: a tiny Wan2.2-TI2V (48-channel DiT, per-token timesteps, Wan2.2 VAE at base 8/12), t2v index",
    text_encoder=TINY_TEXT_ENCODER,
    transformer=TINY_TI2V_TRANSFORMER,
    vae=TINY_TI2V_VAE,
    tune=_tune_tiny_ti2v,
    # Multiples of 32 (16x VAE x patch 2).
    job={"width": 128, "height": 96, "frames": 17, "steps": 8},
    expand_timesteps=True,
    flow_shift=5.0,
)
# The same weights with an index naming WanImageToVideoPipeline (expand_timesteps, no image encoder).
TINY_TI2V_I2V = replace(
    TINY_TI2V,
    name="tiny-ti2v-i2v",
    kind="wan2.2-ti2v-i2v-tiny",
    label="tiny ti2v i2v",
    task="i2v",
    summary="tests: tiny-ti2v's weights as image-to-video (WanImageToVideoPipeline, first latent frame fixed)",
)

# The stated deviation, as for wan2.1-t2v-1.3b: umT5 at full width with 2 of its 24 layers.
_REHEARSAL_TEXT_ENCODER: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 2,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

WAN22_TI2V_5B = ModelArch(
    name="wan2.2-ti2v-5b",
    kind="wan2.2-ti2v-5b",
    label="wan2.2-ti2v-5b",
    task="t2v",
    summary=(
        "Wan2.2-TI2V-5B's DiT (30 layers, dim 3072, per-token timesteps) and Wan2.2 VAE (z 48, 16x) exactly, "
        "random weights; umT5 at full width with 2 of 24 layers"
    ),
    text_encoder=_REHEARSAL_TEXT_ENCODER,
    transformer=PUBLISHED_WAN22_TI2V_5B["transformer"],
    vae=_vae_arguments(PUBLISHED_WAN22_TI2V_5B["vae"]),
    text_encoder_dtype=torch.bfloat16,
    job={key: int(value) for key, value in PUBLISHED_WAN22_TI2V_5B["job"].items() if key != "guidance_scale"},
    expand_timesteps=True,
    flow_shift=float(PUBLISHED_WAN22_TI2V_5B["scheduler"]["flow_shift"]),
)

TI2V_ARCHS: tuple[ModelArch, ...] = (TINY_TI2V, TINY_TI2V_I2V, WAN22_TI2V_5B)
