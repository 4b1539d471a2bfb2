"""Learning-rate schedules: linear warm-up then cosine decay, nnU-Net's polynomial decay, or constant."""

from __future__ import annotations

import math

#: Exponent of the ``poly`` schedule (nnU-Net's PolyLRScheduler default).
POLY_EXPONENT = 0.9


def lr_factor(step: int, max_iter: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak LR for the iteration after ``step`` completed ones (LambdaLR's epoch).

    ``warmup_cosine``: linear warm-up over ``warmup`` iterations, then cosine decay to 0 at ``max_iter``;
    ``poly``: (1 - t) ** 0.9 with t the share of the post-warm-up iterations done (nnU-Net's schedule,
    which has no warm-up and steps per epoch instead of per iteration); ``constant``: 1.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, max_iter - warmup)
    done = min(1.0, (step - warmup) / span)
    if schedule == "poly":
        return (1.0 - done) ** POLY_EXPONENT
    return 0.5 * (1.0 + math.cos(math.pi * done))
