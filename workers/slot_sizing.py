"""How big a transfer slot must be, from the model configs and the farm's resolution limits.

The pool is registered once at start-up, so it must fit the largest payload the
farm accepts: sizing it from configs (not a guess) means a 720p job never finds
its slot too small and a 480p-only farm does not pin memory it cannot use.
Bounds assume float32 (the widest dtype a payload uses) plus alignment slack.
"""

from __future__ import annotations

import json
from pathlib import Path

from scheduler.core.keys import Stage
from scheduler.core.spec import SpecLimits
from workers.stages.payloads import TEXT_LENGTH

FLOAT32 = 4
SLACK_PER_TENSOR = 256  # packing aligns each tensor to 256 bytes


def _config(model_dir: Path, component: str) -> dict[str, object]:
    path = model_dir / component / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _int(config: dict[str, object], key: str, default: int) -> int:
    value = config.get(key, default)
    return int(value) if isinstance(value, int | float) else default


def latent_bytes(model_dir: Path, limits: SpecLimits, channels: int | None = None) -> int:
    vae = _config(model_dir, "vae")
    z_dim = _int(vae, "z_dim", 16)
    frames = (limits.max_frames - 1) // _int(vae, "scale_factor_temporal", 4) + 1
    spatial = _int(vae, "scale_factor_spatial", 8)  # 16 for the Wan2.2 VAE (48 channels)
    return (channels or z_dim) * frames * (limits.max_height // spatial) * (limits.max_width // spatial) * FLOAT32


def encode_output_bytes(model_dir: Path, limits: SpecLimits) -> int:
    d_model = _int(_config(model_dir, "text_encoder"), "d_model", 4096)
    total = 2 * TEXT_LENGTH * d_model * FLOAT32 + 2 * SLACK_PER_TENSOR
    image = _config(model_dir, "image_encoder")
    if image:
        tokens = (_int(image, "image_size", 224) // _int(image, "patch_size", 14)) ** 2 + 1
        total += tokens * _int(image, "hidden_size", 1280) * FLOAT32 + SLACK_PER_TENSOR
        z_dim = _int(_config(model_dir, "vae"), "z_dim", 16)
        total += latent_bytes(model_dir, limits, channels=4 + z_dim) + SLACK_PER_TENSOR
    elif _config(model_dir, "vae").get("patch_size"):
        # Wan2.2-TI2V image-to-video: the image's latents as one frame (bounded here by a whole latent video).
        total += latent_bytes(model_dir, limits) + SLACK_PER_TENSOR
    return total


# A split loop's hand-off carries the scheduler's multistep state beside the latents: at most this many
# latent-sized tensors (UniPC keeps ``solver_order`` past outputs and its last sample; order 2 for Wan).
SPLIT_STATE_LATENTS = 4
SPLIT_META_BYTES = 64 * 1024


def slot_bytes_for(stage: Stage, model_dirs: list[Path], limits: SpecLimits, *, split: bool = False) -> int:
    """Largest payload this stage sends or receives, over every model it serves; with ``split``
    (transform.split_at_step) a transform hop also hands the encode tensors and the loop state on."""
    need = 0
    for model_dir in model_dirs:
        encoded = encode_output_bytes(model_dir, limits)
        latents = latent_bytes(model_dir, limits) + SLACK_PER_TENSOR
        transform = max(encoded, latents)
        if split:
            transform = encoded + (1 + SPLIT_STATE_LATENTS) * latents + SPLIT_META_BYTES
        need = max(need, {Stage.ENCODE: encoded, Stage.TRANSFORM: transform, Stage.DECODE: latents}[stage])
    return need
