"""Learning-rate schedules (constant or cosine, both with linear warmup), as in the official recipes."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_schedule(optimizer: Optimizer, total_steps: int, name: Literal["constant", "cosine"] = "cosine",
                    warmup_steps: int = 0, warmup_ratio: float | None = None, min_lr_ratio: float = 0.0) -> LambdaLR:
    """`warmup_ratio` (e.g. 0.02 for CogVLM's 2%) wins over `warmup_steps` when given."""
    if name not in ("constant", "cosine"):
        raise ValueError(f"lr_scheduler.name={name!r}: use 'constant' or 'cosine'")
    if warmup_ratio is not None:
        warmup_steps = int(round(warmup_ratio * total_steps))
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


# Checked by finetune.settings.check before anything is built.
warmup_schedule.setting_ranges = {"warmup_steps": ">=0", "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]"}
