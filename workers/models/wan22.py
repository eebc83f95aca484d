"""Wan2.2-A14B architectures (two experts): the tiny test models, the bench preset and the published shape.

A two-expert directory is a Wan2.1 one plus ``transformer_2/`` (the low-noise
expert: the same DiT architecture with its own weights) and ``boundary_ratio``
in ``model_index.json`` -- diffusers' layout, which ``WanPipeline`` /
``WanImageToVideoPipeline.from_pretrained`` open unchanged. The experts are
drawn from different seeds, so a job whose steps ran on the wrong expert shows
in its frames.

- ``tiny-2expert``: tests. The tiny t2v model's shapes, two experts, Wan2.2-T2V-A14B's boundary 0.875:
  with the tiny scheduler's shift 3.0 the high-noise expert runs the first ~30% of the steps (2 of 6).
- ``tiny-2expert-i2v``: tests. Wan2.2-I2V-A14B's layout at tiny size: a 36-channel DiT (latents + the
  image's VAE condition) with no CLIP features (``image_dim`` None) and no image encoder in the directory,
  two experts, Wan2.2-I2V-A14B's boundary 0.9.
- ``bench-2expert``: the ``bench`` preset with two experts, for ``bench.pipeline``'s split-vs-together run.
- ``wan2.2-t2v-a14b``: Wan2.2-T2V-A14B's published DiT, VAE and boundary, random weights, with one stated
  reduction (``A14B_REHEARSAL_LAYERS`` of the 40 blocks per expert): two 14B experts are about 56 GB each in
  float32 and 28 GB in bf16, far beyond this machine's 24 GiB; the text encoder is cut as in the 1.3B preset.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from workers.models.build import ModelArch
from workers.models.tiny import TINY_I2V, TINY_I2V_TRANSFORMER, TINY_T2V

# Wan2.2-T2V-A14B as published. Sources: Wan-AI/Wan2.2-T2V-A14B-Diffusers model_index.json (WanPipeline,
# transformer + transformer_2, boundary_ratio 0.875), transformer/config.json and transformer_2/config.json
# (identical shapes), scheduler/scheduler_config.json (UniPCMultistepScheduler, flow_shift 3.0); the same
# values in Wan's wan/configs/wan_t2v_A14B.py (dim 5120, ffn_dim 13824, freq_dim 256, num_heads 40,
# num_layers 40, patch (1, 2, 2), qk_norm, cross_attn_norm, eps 1e-6, boundary 0.875; its own sampler uses
# sample_shift 12.0 and guidance (3.0 low, 4.0 high), which diffusers leaves to the caller). The VAE is
# Wan2.1's (Wan2.1_VAE.pth: base 96, z 16), as for the 1.3B preset.
PUBLISHED_WAN22_T2V_A14B: dict[str, Any] = {
    "transformer": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 40,
        "attention_head_dim": 128,  # dim 5120 = 40 x 128
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 13824,
        "num_layers": 40,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    },
    "boundary_ratio": 0.875,
    "flow_shift": 3.0,
    # Wan's own recommended guidance, (high-noise, low-noise): guidance_scale and guidance_scale_2.
    "guidance": (4.0, 3.0),
}
# The one stated reduction of the DiT (see the module docstring): 2 of the 40 blocks in each expert.
A14B_REHEARSAL_LAYERS = 2

TINY_T2V_TWO_EXPERTS = replace(
    TINY_T2V,
    name="tiny-2expert",
    kind="wan2.2-t2v-tiny-2expert",
    label="tiny two-expert t2v",
    summary="tests: the tiny t2v model with Wan2.2-A14B's two experts (distinct weights), boundary 0.875",
    boundary_ratio=PUBLISHED_WAN22_T2V_A14B["boundary_ratio"],
    job={"width": 64, "height": 64, "frames": 9, "steps": 6},
)


# Wan2.2-I2V-A14B as published: Wan-AI/Wan2.2-I2V-A14B-Diffusers model_index.json (WanImageToVideoPipeline,
# transformer + transformer_2, boundary_ratio 0.9, image_encoder and image_processor null) and
# transformer/config.json (in_channels 36, image_dim null: the image enters only as the VAE condition).
PUBLISHED_WAN22_I2V_A14B: dict[str, Any] = {"boundary_ratio": 0.9, "in_channels": 36, "image_dim": None}

TINY_I2V_TWO_EXPERTS = replace(
    TINY_I2V,
    name="tiny-2expert-i2v",
    kind="wan2.2-i2v-tiny-2expert",
    label="tiny two-expert i2v",
    summary="tests: Wan2.2-I2V-A14B's layout at tiny size (two experts, the VAE condition without CLIP), boundary 0.9",
    transformer={**TINY_I2V_TRANSFORMER, "image_dim": None, "added_kv_proj_dim": None},
    image_encoder=None,
    image_size=None,
    boundary_ratio=PUBLISHED_WAN22_I2V_A14B["boundary_ratio"],
    job={"width": 64, "height": 64, "frames": 9, "steps": 6},
)


def bench_two_experts(bench: ModelArch) -> ModelArch:
    """The ``bench`` preset with two experts: the DiT cost per step unchanged, twice the DiT weights."""
    return replace(
        bench,
        name="bench-2expert",
        kind="wan2.2-t2v-bench-2expert",
        label="bench two-expert",
        summary="CPU pipeline benchmarks of expert placement: the bench preset with two experts, boundary 0.875",
        boundary_ratio=PUBLISHED_WAN22_T2V_A14B["boundary_ratio"],
    )


def wan22_t2v_a14b(wan21_1_3b: ModelArch) -> ModelArch:
    """Wan2.2-T2V-A14B's shape (reduced depth) on the 1.3B preset's text encoder and VAE (Wan2.1's VAE)."""
    return replace(
        wan21_1_3b,
        name="wan2.2-t2v-a14b",
        kind="wan2.2-t2v-a14b",
        label="wan2.2-t2v-a14b",
        summary=(
            "Wan2.2-T2V-A14B's two DiT experts at full width (dim 5120, 40 heads, ffn 13824) with "
            f"{A14B_REHEARSAL_LAYERS} of 40 blocks each, boundary 0.875, random weights; Wan2.1's VAE; reduced umT5"
        ),
        transformer={**PUBLISHED_WAN22_T2V_A14B["transformer"], "num_layers": A14B_REHEARSAL_LAYERS},
        boundary_ratio=PUBLISHED_WAN22_T2V_A14B["boundary_ratio"],
        flow_shift=PUBLISHED_WAN22_T2V_A14B["flow_shift"],
        # The DiT weights in bf16, as the Diffusers checkpoint ships them (2 x 2 blocks: about 2.8 GB).
        text_encoder_dtype=torch.bfloat16,
        job={"width": 160, "height": 96, "frames": 17, "steps": 4},
    )
