"""What the control plane reads of a model directory without torch: its ``model_index.json``."""

from __future__ import annotations

import json
from pathlib import Path


def model_has_two_experts(model_dir: Path) -> bool:
    """Whether a model dir is a Wan2.2 two-expert one (its model_index names a ``transformer_2``); False when
    the dir is not readable here (workers then judge it when they load it)."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    second = index.get("transformer_2") if isinstance(index, dict) else None
    return isinstance(second, list) and any(second)
