"""Model presets: the Wan2.1-T2V-1.3B shape equals the published configs; the bench preset builds and loads.

The published values are spelled out here, not read from `workers.models.presets`, so an edit
to the preset that drifts from Wan2.1-T2V-1.3B fails this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from accelerate import init_empty_weights  # noqa: E402
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel  # noqa: E402
from transformers import UMT5Config  # noqa: E402

from workers.models.build import MARKER_FILE, local_tokenizer  # noqa: E402
from workers.models.loading import load_scheduler, load_text_encoder, load_transformer, load_vae, model_task  # noqa: E402
from workers.models.presets import ARCHS, BENCH, WAN21_T2V_1_3B, arch_named, build_arch_model  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json and vae/config.json.
PUBLISHED_DIT = {
    "num_layers": 30,
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "text_dim": 4096,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
PUBLISHED_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
# google/umt5-xxl's encoder; the preset keeps all but the layer count (2 of 24, the stated deviation).
PUBLISHED_UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "feed_forward_proj": "gated-gelu"}


def _config_of(model_class: type, arguments: dict[str, object]) -> dict[str, object]:
    with init_empty_weights():  # the config as diffusers records it, without 1.3B parameters in memory
        model = model_class(**arguments)
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in model.config.items()}


def test_the_1_3b_dit_and_vae_are_the_published_configs() -> None:
    dit = _config_of(WanTransformer3DModel, dict(WAN21_T2V_1_3B.transformer))
    vae = _config_of(AutoencoderKLWan, dict(WAN21_T2V_1_3B.vae))

    assert {key: dit[key] for key in PUBLISHED_DIT} == PUBLISHED_DIT
    assert {key: vae[key] for key in PUBLISHED_VAE} == PUBLISHED_VAE
    # The VAE's latent statistics are Wan2.1's (diffusers' defaults, which the checkpoint also carries).
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 16  # type: ignore[arg-type]
    assert vae["latents_mean"][0] == pytest.approx(-0.7571)  # type: ignore[index]


def test_the_1_3b_dit_has_1_3_billion_parameters() -> None:
    with init_empty_weights():
        dit = WanTransformer3DModel(**WAN21_T2V_1_3B.transformer)
    parameters = sum(p.numel() for p in dit.parameters())
    assert 1.3e9 <= parameters <= 1.45e9, parameters


def test_the_1_3b_text_encoder_has_umt5_xxl_width_and_fewer_layers() -> None:
    config = UMT5Config(vocab_size=len(local_tokenizer()), **WAN21_T2V_1_3B.text_encoder)
    assert {key: getattr(config, key) for key in PUBLISHED_UMT5_XXL} == PUBLISHED_UMT5_XXL
    assert config.num_layers == 2  # the one deviation: umT5-XXL's 24 layers do not fit beside the DiT here
    # The hand-off carries what the DiT cross-attends to: the text encoder's width.
    assert config.d_model == WAN21_T2V_1_3B.transformer["text_dim"]


def test_every_preset_wires_text_width_into_the_dit() -> None:
    for arch in ARCHS.values():
        assert arch.text_encoder["d_model"] == arch.transformer["text_dim"], arch.name
        assert arch.vae["z_dim"] == arch.transformer["out_channels"], arch.name


def test_an_unknown_architecture_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'wan2.2'; choose one of: tiny, tiny-i2v, bench"):
        arch_named("wan2.2")


def test_the_bench_preset_builds_once_and_loads_with_the_stage_loaders(tmp_path: Path) -> None:
    model_dir = build_arch_model(tmp_path / "bench", "bench")
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    assert marker == {"format": 1, "kind": BENCH.kind, "seed": 0}
    assert model_task(model_dir) == "t2v"

    before = (model_dir / "transformer" / "config.json").stat().st_mtime_ns
    assert build_arch_model(model_dir, "bench") == model_dir  # a no-op on a complete model
    assert (model_dir / "transformer" / "config.json").stat().st_mtime_ns == before

    import torch

    transformer = load_transformer(model_dir, "cpu", torch.float32)
    assert transformer.config.num_layers == BENCH.transformer["num_layers"]
    tokenizer, text_encoder = load_text_encoder(model_dir, "cpu", torch.float32)
    assert text_encoder.config.d_model == transformer.config.text_dim
    assert load_vae(model_dir, "cpu", torch.float32).config.base_dim == 8
    assert load_scheduler(model_dir, None).config["flow_shift"] == 3.0


def test_the_cli_refuses_to_build_one_preset_over_another(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workers.models", "build", str(tiny_model_dir), "--arch", "bench"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: {tiny_model_dir} holds a tiny t2v model, not bench; choose a new directory for the bench model\n"
    )


def test_the_a14b_preset_is_wan22_t2v_a14b_with_the_stated_depth_reduction() -> None:
    from workers.models.wan22 import A14B_REHEARSAL_LAYERS

    a14b = arch_named("wan2.2-t2v-a14b")
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/config.json (= transformer_2/config.json): Wan2.1-14B's DiT.
    published_a14b = {
        **PUBLISHED_DIT,
        "num_layers": 40,
        "num_attention_heads": 40,
        "attention_head_dim": 128,
        "ffn_dim": 13824,
    }
    dit = _config_of(WanTransformer3DModel, dict(a14b.transformer))
    assert {key: dit[key] for key in published_a14b if key != "num_layers"} == {
        key: value for key, value in published_a14b.items() if key != "num_layers"
    }
    assert dit["num_layers"] == A14B_REHEARSAL_LAYERS < 40, "the one stated reduction"
    # model_index.json's boundary_ratio and scheduler_config.json's flow_shift; the VAE is Wan2.1's.
    assert (a14b.boundary_ratio, a14b.flow_shift) == (0.875, 3.0)
    vae = _config_of(AutoencoderKLWan, dict(a14b.vae))
    assert {key: vae[key] for key in PUBLISHED_VAE} == PUBLISHED_VAE
    with init_empty_weights():
        block = WanTransformer3DModel(**{**a14b.transformer, "num_layers": 1})
    per_block = sum(p.numel() for p in block.blocks[0].parameters())
    # 40 blocks of this width are the published ~14B parameters per expert.
    assert 13e9 <= 40 * per_block <= 15e9, per_block


def test_the_two_expert_presets_have_a_second_dit_and_the_published_boundary() -> None:
    for name in ("tiny-2expert", "bench-2expert", "wan2.2-t2v-a14b"):
        arch = arch_named(name)
        assert arch.two_experts and arch.boundary_ratio == 0.875, name
