"""A denoising loop paused at a step boundary: the latents plus exactly the scheduler state ``step()`` mutates.

`workers.stages.transform` captures one at a step boundary and resumes from one bit-exactly; where it is
stored is `workers.checkpoints`' business (tensors via safetensors, the rest as JSON: nothing pickled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# What a multistep scheduler's ``step()`` changes, by diffusers' attribute names (UniPC: the last
# outputs and timesteps it extrapolates from, its warm-up order and corrector input; Euler and
# DPM++ share ``_step_index``/``model_outputs``). Everything else follows from the config and
# ``set_timesteps``, so a fresh scheduler plus these is the scheduler as it was.
SCHEDULER_STEP_STATE = (
    "model_outputs",
    "timestep_list",
    "lower_order_nums",
    "last_sample",
    "this_order",
    "_step_index",
)


@dataclass
class DenoiseState:
    """A denoising loop paused after ``step`` of ``total`` steps: enough to continue it bit-exactly.

    ``tensors`` are the latents (``"latents"``) and the scheduler's tensors (``"scheduler.<attr>"`` and
    ``"scheduler.<attr>.<i>"`` for list items); ``scheduler`` holds its scalars and list shapes (JSON-able).
    """

    step: int
    total: int
    tensors: dict[str, torch.Tensor]
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def latents(self) -> torch.Tensor:
        return self.tensors["latents"]

    @classmethod
    def capture(cls, step: int, total: int, latents: torch.Tensor, scheduler: Any) -> DenoiseState:
        """A host copy of the loop's state (the loop goes on mutating its own)."""
        tensors = {"latents": latents.detach().to("cpu", copy=True).contiguous()}
        meta: dict[str, Any] = {}
        for name in SCHEDULER_STEP_STATE:
            if not hasattr(scheduler, name):
                continue
            value = getattr(scheduler, name)
            if isinstance(value, torch.Tensor):
                tensors[f"scheduler.{name}"] = value.detach().to("cpu", copy=True).contiguous()
                meta[name] = {"tensor": True}
            elif isinstance(value, list):
                present = []
                for i, item in enumerate(value):
                    if isinstance(item, torch.Tensor):
                        tensors[f"scheduler.{name}.{i}"] = item.detach().to("cpu", copy=True).contiguous()
                        present.append(i)
                    elif item is not None:
                        raise TypeError(f"cannot save scheduler.{name}[{i}] of type {type(item).__name__}")
                meta[name] = {"list": len(value), "tensors": present}
            elif value is None or isinstance(value, bool | int | float):
                meta[name] = {"value": value}
            else:
                raise TypeError(f"cannot save scheduler.{name} of type {type(value).__name__}")
        return cls(step, total, tensors, meta)

    def restore_into(self, scheduler: Any, device: torch.device) -> None:
        """Put the saved step state into ``scheduler`` (fresh, after ``set_timesteps``); refuses a mismatch."""
        for name, entry in self.scheduler.items():
            # Some (UniPC's this_order) only exist once step() ran: the allow-list, not hasattr, decides.
            if name not in SCHEDULER_STEP_STATE or not isinstance(entry, dict):
                raise ValueError(f"saved denoising state names scheduler.{name}, which this scheduler does not keep")
            if entry.get("tensor"):
                value: Any = self._tensor(f"scheduler.{name}", device)
            elif "list" in entry:
                length, present = int(entry["list"]), {int(i) for i in entry.get("tensors", [])}
                if len(getattr(scheduler, name, None) or []) != length or not present <= set(range(length)):
                    raise ValueError(
                        f"saved scheduler.{name} has {length} entries; this scheduler keeps another number"
                    )
                value = [self._tensor(f"scheduler.{name}.{i}", device) if i in present else None for i in range(length)]
            elif isinstance(entry.get("value"), bool | int | float) or entry.get("value") is None:
                value = entry.get("value")
            else:
                raise ValueError(f"saved scheduler.{name} is not a number")
            setattr(scheduler, name, value)

    def _tensor(self, name: str, device: torch.device) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"saved denoising state lacks tensor {name}")
        return self.tensors[name].to(device)
