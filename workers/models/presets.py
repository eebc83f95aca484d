"""The model architectures ``reelfarm model build DIR --arch NAME`` writes, and where each value comes from.

- ``tiny`` / ``tiny-i2v``: tests and the embedded default (`workers.models.tiny`).
- ``wan2.1-t2v-1.3b``: the production shape of Wan2.1-T2V-1.3B-Diffusers with
  random weights, for rehearsals and benchmarks. The DiT and VAE configs are
  the published ones exactly (sources below; ``tests/test_model_presets.py``
  checks every value against ``PUBLISHED_WAN21_T2V_1_3B``). The umT5 text
  encoder has the real width (4096), feed-forward (10240), heads (64 x 64),
  relative-attention buckets, gated-GELU and 512-token prompts, but **2 of its
  24 layers**: umT5-XXL in full (about 11 GB in bf16, 22 GB in float32) does
  not fit beside the DiT and the VAE in this machine's 24 GiB. Its vocabulary
  is the local tokenizer's (a few hundred pieces, not 256,384): the tokenizer
  is built here because nothing is downloaded, and the vocabulary size changes
  nothing that crosses a stage boundary (the hand-off carries [512, 4096]
  embeddings either way).
- ``bench``: a CPU preset with the real ordering of stage costs on a small
  machine (the DiT at least 20x the decode stage per job, encode cheapest) at
  the job shape in ``BENCH.job``, for the pipeline benchmarks in ``bench/``.
  Measured in ``bench/README.md``; a random-weight model, like the others.
- ``tiny-2expert``, ``bench-2expert``, ``wan2.2-t2v-a14b``: Wan2.2-A14B's two experts
  (`workers.models.wan22`, with sources and the stated reduction).

- ``tiny-ti2v`` / ``tiny-ti2v-i2v`` / ``wan2.2-ti2v-5b``: Wan2.2-TI2V (`workers.models.ti2v_presets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from workers.models.build import ModelArch, build_model
from workers.models.loading import ModelDirError
from workers.models.ti2v_presets import TI2V_ARCHS
from workers.models.tiny import TINY_I2V, TINY_T2V, TINY_VAE
from workers.models.wan22 import TINY_I2V_TWO_EXPERTS, TINY_T2V_TWO_EXPERTS, bench_two_experts, wan22_t2v_a14b

# Wan2.1-T2V-1.3B as published. Sources: Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json and
# vae/config.json; the same values in Wan's own wan/configs/wan_t2v_1_3B.py (dim 1536, ffn_dim 8960,
# freq_dim 256, num_heads 12, num_layers 30, patch (1, 2, 2), qk_norm, cross_attn_norm, eps 1e-6) and
# shared_config.py (text_len 512, umT5-XXL); the VAE is Wan2.1_VAE (base 96, z 16, mult [1,2,4,4],
# 2 res blocks, temporal downsample [F,T,T]), diffusers' AutoencoderKLWan defaults.
PUBLISHED_WAN21_T2V_1_3B: dict[str, dict[str, Any]] = {
    "transformer": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 12,
        "attention_head_dim": 128,  # dim 1536 = 12 x 128
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,  # umT5-XXL's d_model
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    },
    "vae": {
        "base_dim": 96,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
    },
    # google/umt5-xxl's encoder (config.json), which Wan2.1 uses as its text encoder.
    "text_encoder": {
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,  # 0.1 in the checkpoint; inference runs in eval mode, so it never applies
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
}
# The one stated deviation (see the module docstring): 2 encoder layers instead of 24.
REHEARSAL_TEXT_ENCODER_LAYERS = 2

WAN21_T2V_1_3B = ModelArch(
    name="wan2.1-t2v-1.3b",
    kind="wan2.1-t2v-1.3b",
    label="wan2.1-t2v-1.3b",
    task="t2v",
    summary=(
        "Wan2.1-T2V-1.3B's DiT (30 layers, dim 1536) and VAE (base 96) exactly, random weights; "
        f"umT5 at full width with {REHEARSAL_TEXT_ENCODER_LAYERS} of 24 layers"
    ),
    text_encoder={
        **PUBLISHED_WAN21_T2V_1_3B["text_encoder"],
        "num_layers": REHEARSAL_TEXT_ENCODER_LAYERS,
    },
    transformer=PUBLISHED_WAN21_T2V_1_3B["transformer"],
    vae=PUBLISHED_WAN21_T2V_1_3B["vae"],
    # Wan ships its umT5 encoder in bf16 (models_t5_umt5-xxl-enc-bf16); the loaders cast to the worker's dtype.
    text_encoder_dtype=torch.bfloat16,
    # A small rehearsal that completes on a 2-core CPU in minutes; the real model's 480p default is 832x480x81.
    job={"width": 160, "height": 96, "frames": 17, "steps": 4},
)

# The bench preset: the stage-cost ordering of a real Wan run (DiT >> decode > encode), scaled to a
# small CPU at the job shape in ``job``. The DiT keeps Wan's block design (heads x 64, 4x
# feed-forward, rms qk-norm, cross-attention to 512 text tokens) at 12 x 64 wide and 8 deep; the VAE
# is the tiny one (a 17-frame 64x64 clip decodes in about 0.3 s on one thread); umT5 keeps its
# layout (64-wide heads, gated-GELU, d_ff = 2.5 x d_model) at width 512 with one layer, because a
# single 4096-wide layer already takes 5 s for two prompts here, which would make encode, not
# decode, the second most expensive stage. Measured on a 2-core VM (bench/README.md): DiT about
# 0.6 s per step (both guidance passes, one thread), 20 steps, against a decode stage of about 0.5 s.
_BENCH_TEXT_WIDTH = 512
BENCH = ModelArch(
    name="bench",
    kind="wan2.1-t2v-bench",
    label="bench",
    task="t2v",
    summary="CPU pipeline benchmarks, DiT-bound like a real Wan run: 8-layer dim-768 DiT, tiny VAE, 1-layer umT5",
    text_encoder={
        **PUBLISHED_WAN21_T2V_1_3B["text_encoder"],
        "d_model": _BENCH_TEXT_WIDTH,
        "d_ff": _BENCH_TEXT_WIDTH * 5 // 2,
        "num_heads": _BENCH_TEXT_WIDTH // 64,
        "num_layers": 1,
    },
    transformer={
        **PUBLISHED_WAN21_T2V_1_3B["transformer"],
        "num_attention_heads": 12,
        "attention_head_dim": 64,
        "ffn_dim": 4 * 12 * 64,
        "num_layers": 8,
        "text_dim": _BENCH_TEXT_WIDTH,
    },
    vae=TINY_VAE,
    job={"width": 64, "height": 64, "frames": 17, "steps": 20},
)

ARCHS: dict[str, ModelArch] = {
    arch.name: arch
    for arch in (
        TINY_T2V,
        TINY_I2V,
        BENCH,
        WAN21_T2V_1_3B,
        TINY_T2V_TWO_EXPERTS,
        TINY_I2V_TWO_EXPERTS,
        bench_two_experts(BENCH),
        wan22_t2v_a14b(WAN21_T2V_1_3B),
    )
}
# Wan2.2-TI2V (tiny-ti2v, tiny-ti2v-i2v, wan2.2-ti2v-5b): defined and sourced in `workers.models.ti2v_presets`.
ARCHS.update({arch.name: arch for arch in TI2V_ARCHS})


def arch_named(name: str) -> ModelArch:
    """The architecture called ``name``; `ModelDirError` naming the choices otherwise."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ModelDirError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}") from None


def build_arch_model(model_dir: Path, name: str, *, seed: int = 0) -> Path:
    """Write the ``name`` architecture into ``model_dir`` (a no-op when it already holds it, built with ``seed``)."""
    return build_model(model_dir, arch_named(name), seed=seed, known=ARCHS)
