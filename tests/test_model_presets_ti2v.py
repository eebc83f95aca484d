"""Wan2.2-TI2V presets: the 5B shape equals the published configs; the tiny ones build, load and differ from Wan2.1's.

The published values are spelled out here, not read from `workers.models.ti2v_presets`, so an edit to the
preset that drifts from Wan-AI/Wan2.2-TI2V-5B-Diffusers fails this test. Sources: that repository's
transformer/config.json, vae/config.json, scheduler/scheduler_config.json and model_index.json (diffusers'
scripts/convert_wan_to_diffusers.py writes them: the "Wan2.2-TI2V-5B" transformer config,
vae22_diffusers_config, UniPC with flow_shift 5.0, WanPipeline(expand_timesteps=True)), and Wan's
wan/configs/wan_ti2v_5B.py for the sample defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel  # noqa: E402
from transformers import UMT5Config  # noqa: E402

from workers.models.build import MARKER_FILE, local_tokenizer  # noqa: E402
from workers.models.loading import load_scheduler, load_vae, model_task  # noqa: E402
from workers.models.presets import ARCHS  # noqa: E402
from workers.models.ti2v_presets import PUBLISHED_WAN22_TI2V_5B, WAN22_TI2V_5B  # noqa: E402

PUBLISHED_DIT = {
    "num_layers": 30,
    "num_attention_heads": 24,
    "attention_head_dim": 128,  # dim 3072
    "ffn_dim": 14336,
    "freq_dim": 256,
    "text_dim": 4096,
    "in_channels": 48,
    "out_channels": 48,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
PUBLISHED_VAE = {
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
}
# All 48 published latents_mean / latents_std values (vae22_diffusers_config), in order.
PUBLISHED_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
PUBLISHED_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip
PUBLISHED_UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "feed_forward_proj": "gated-gelu"}


def _config_of(model_class: type, arguments: dict[str, object]) -> dict[str, object]:
    with init_empty_weights():  # the config as diffusers records it, without 5B parameters in memory
        model = model_class(**arguments)
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in model.config.items()}


def test_the_5b_dit_and_vae_are_the_published_configs() -> None:
    dit = _config_of(WanTransformer3DModel, dict(WAN22_TI2V_5B.transformer))
    vae = _config_of(AutoencoderKLWan, dict(WAN22_TI2V_5B.vae))

    assert {key: dit[key] for key in PUBLISHED_DIT} == PUBLISHED_DIT
    assert {key: vae[key] for key in PUBLISHED_VAE} == PUBLISHED_VAE
    assert len(PUBLISHED_LATENTS_MEAN) == len(PUBLISHED_LATENTS_STD) == 48
    assert vae["latents_mean"] == PUBLISHED_LATENTS_MEAN
    assert vae["latents_std"] == PUBLISHED_LATENTS_STD
    # The published config.json also says clip_output false; AutoencoderKLWan takes no such argument and clamps.
    assert PUBLISHED_WAN22_TI2V_5B["vae"]["clip_output"] is False


def test_the_5b_scheduler_index_and_job_are_the_published_ones() -> None:
    assert WAN22_TI2V_5B.flow_shift == 5.0  # UniPCMultistepScheduler, flow_shift 5.0
    assert WAN22_TI2V_5B.expand_timesteps and WAN22_TI2V_5B.task == "t2v"  # WanPipeline, expand_timesteps true
    assert dict(WAN22_TI2V_5B.job) == {"width": 1280, "height": 704, "frames": 121, "steps": 50}
    assert PUBLISHED_WAN22_TI2V_5B["job"]["guidance_scale"] == 5.0


def test_the_5b_dit_has_5_billion_parameters() -> None:
    with init_empty_weights():
        dit = WanTransformer3DModel(**WAN22_TI2V_5B.transformer)
    parameters = sum(p.numel() for p in dit.parameters())
    assert 4.8e9 <= parameters <= 5.2e9, parameters


def test_the_5b_text_encoder_has_umt5_xxl_width_and_fewer_layers() -> None:
    config = UMT5Config(vocab_size=len(local_tokenizer()), **WAN22_TI2V_5B.text_encoder)
    assert {key: getattr(config, key) for key in PUBLISHED_UMT5_XXL} == PUBLISHED_UMT5_XXL
    assert config.num_layers == 2  # the stated deviation, as for wan2.1-t2v-1.3b


def test_the_ti2v_presets_are_listed() -> None:
    assert {"tiny-ti2v", "tiny-ti2v-i2v", "wan2.2-ti2v-5b"} <= set(ARCHS)


def test_tiny_ti2v_builds_with_the_wan22_vae_and_both_indexes(
    tiny_ti2v_model_dir: Path, tiny_ti2v_i2v_model_dir: Path, tiny_model_dir: Path
) -> None:
    t2v_index = json.loads((tiny_ti2v_model_dir / "model_index.json").read_text())
    i2v_index = json.loads((tiny_ti2v_i2v_model_dir / "model_index.json").read_text())
    assert (t2v_index["_class_name"], t2v_index["expand_timesteps"]) == ("WanPipeline", True)
    assert (i2v_index["_class_name"], i2v_index["expand_timesteps"]) == ("WanImageToVideoPipeline", True)
    assert i2v_index["image_encoder"] == [None, None] and not (tiny_ti2v_i2v_model_dir / "image_encoder").exists()
    assert (model_task(tiny_ti2v_model_dir), model_task(tiny_ti2v_i2v_model_dir)) == ("t2v", "i2v")
    assert json.loads((tiny_ti2v_i2v_model_dir / MARKER_FILE).read_text())["task"] == "i2v"
    # One seed, one set of weights: the i2v directory is the t2v one re-indexed.
    for component in ("transformer", "vae", "text_encoder"):
        weights = f"{component}/{'model' if component == 'text_encoder' else 'diffusion_pytorch_model'}.safetensors"
        assert (tiny_ti2v_model_dir / weights).read_bytes() == (tiny_ti2v_i2v_model_dir / weights).read_bytes()

    vae = load_vae(tiny_ti2v_model_dir, "cpu", torch.float32)
    wan21 = load_vae(tiny_model_dir, "cpu", torch.float32)
    assert (vae.config.z_dim, vae.config.patch_size, vae.config.is_residual) == (48, 2, True)
    assert (wan21.config.z_dim, wan21.config.patch_size, wan21.config.is_residual) == (16, None, False)
    assert vae.config.scale_factor_spatial == 16
    assert load_scheduler(tiny_ti2v_model_dir, None).config["flow_shift"] == 5.0
