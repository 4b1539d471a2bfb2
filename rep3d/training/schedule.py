"""Learning-rate schedules: linear warm-up then cosine decay, or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, max_iter: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR for the iteration after ``step`` completed ones (LambdaLR's epoch)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, max_iter - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
