"""What makes a model directory a Wan2.2-TI2V one, read from its JSON files only (no weights).

Wan2.2-TI2V-5B-Diffusers is one DiT (no second expert) over the Wan2.2 VAE
(z_dim 48, ``patch_size`` 2: 16x spatial, 4x temporal compression) with
``expand_timesteps: true`` in ``model_index.json``: the DiT takes one timestep
per latent token. The published directory names ``WanPipeline`` (text-to-video);
the same weights do image-to-video through ``WanImageToVideoPipeline`` with
``expand_timesteps`` and no CLIP image encoder (the image is VAE-encoded into
the first latent frame, which is kept fixed). reelfarm reads a directory's task
from the pipeline class its index names (`workers.models.loading.model_task`),
so a TI2V checkout serves image-to-video jobs from a copy of the directory
whose index names ``WanImageToVideoPipeline`` (``reelfarm model build --arch
tiny-ti2v-i2v`` writes one).

`check_expand_timesteps` is the one place that says which TI2V combinations the
stages implement; `vae_compression` is what the transform stage uses to size
latents (8x for Wan2.1, 16x here) without loading the VAE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_INDEX = "model_index.json"
VAE_CONFIG = Path("vae") / "config.json"


@dataclass(frozen=True)
class VaeCompression:
    """How many pixels one latent stands for: ``spatial`` x ``spatial`` pixels, ``temporal`` frames (after the first)."""

    spatial: int
    temporal: int


# AutoencoderKLWan's defaults, which Wan2.1 checkouts written before those keys existed rely on.
WAN21_COMPRESSION = VaeCompression(spatial=8, temporal=4)


def _is_absent(value: Any) -> bool:
    # save_pretrained writes an absent optional component as [null, null].
    return value in (None, [None, None])


def check_expand_timesteps(index: Mapping[str, Any], index_path: Path) -> None:
    """Refuse, in one line, the ``expand_timesteps`` combinations the stages do not implement.

    Implemented: one DiT with per-token timesteps, t2v (``WanPipeline``) or i2v
    (``WanImageToVideoPipeline`` without an image encoder: the first latent
    frame is the condition). Not implemented: per-token timesteps with a second
    expert, or with a CLIP image encoder (no published model has either).
    """
    if not index.get("expand_timesteps"):
        return
    if index.get("boundary_ratio") or not _is_absent(index.get("transformer_2")):
        raise ValueError(f"{index_path} sets expand_timesteps with a second expert; reelfarm runs TI2V with one DiT")
    if not _is_absent(index.get("image_encoder")):
        raise ValueError(
            f"{index_path} sets expand_timesteps with an image_encoder; TI2V image-to-video conditions on the first "
            "latent frame only: remove image_encoder/image_processor from the index"
        )


def read_index(model_dir: Path) -> dict[str, Any]:
    """``model_index.json`` as a dict ({} when it is missing or unreadable: `model_task` reports those)."""
    try:
        index = json.loads((Path(model_dir) / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def expands_timesteps(model_dir: Path) -> bool:
    """Whether the directory is a TI2V one: its DiT takes one timestep per latent token."""
    return bool(read_index(model_dir).get("expand_timesteps"))


def vae_compression(model_dir: Path) -> VaeCompression:
    """The VAE's compression from ``vae/config.json`` (Wan2.1's 8x / 4x where the keys or the file are absent).

    A TI2V directory must have the file: guessing 8x there would size every latent wrongly.
    """
    path = Path(model_dir) / VAE_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        if expands_timesteps(model_dir):
            raise ValueError(f"{path} is missing; a TI2V model's latent size comes from its VAE config") from None
        return WAN21_COMPRESSION
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} ({exc})") from None
    spatial = config.get("scale_factor_spatial") or WAN21_COMPRESSION.spatial
    temporal = config.get("scale_factor_temporal") or WAN21_COMPRESSION.temporal
    return VaeCompression(spatial=int(spatial), temporal=int(temporal))
