"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR`, with the original class names.

`schedule(n)` gives the value at optimisation step n. LambdaWarmUpCosineScheduler returns an absolute
learning rate (use with base lr 1.0); the "2" variants return multipliers of the base learning rate
over one or more cycles.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _warmup(n: float, steps: float, start: float, peak: float) -> float:
    """Linear ramp from `start` at n=0 to `peak` at n=steps."""
    return (peak - start) / steps * n + start


def _cosine(t: float, low: float, high: float) -> float:
    """Half-cosine from `high` at t=0 down to `low` at t>=1 (Loshchilov & Hutter 2017, eq. 5)."""
    t = min(t, 1.0)
    return low + 0.5 * (high - low) * (1 + math.cos(t * math.pi))


class LambdaWarmUpCosineScheduler:
    """Linear warm-up to lr_max, then cosine decay to lr_min at max_decay_steps."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps})")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        """The learning rate at step n."""
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %s", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = _warmup(n, self.lr_warm_up_steps, self.lr_start, self.lr_max)
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            lr = _cosine(t, self.lr_min, self.lr_max)
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Cycles of linear warm-up then cosine decay, one entry per cycle in each list; use with base lr 1.0.

    Steps beyond the last cycle stay at the end of the last cycle.
    """

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lengths = {len(warm_up_steps), len(f_min), len(f_max), len(f_start), len(cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle each")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = np.cumsum([0] + list(self.cycle_lengths))
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step n falls in."""
        for interval, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return interval
        return len(self.cycle_lengths) - 1

    def _position(self, n: int) -> tuple[int, int]:
        cycle = self.find_in_interval(n)
        n = min(n - int(self.cum_cycles[cycle]), self.cycle_lengths[cycle])
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %s, current cycle %d", n, self.last_f, cycle)
        return cycle, n

    def decay(self, cycle: int, n: int) -> float:
        """The multiplier after warm-up, at step n of the cycle."""
        t = (n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
        return _cosine(t, self.f_min[cycle], self.f_max[cycle])

    def schedule(self, n: int, **kwargs) -> float:
        """The multiplier at step n."""
        cycle, n = self._position(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = _warmup(n, self.lr_warm_up_steps[cycle], self.f_start[cycle], self.f_max[cycle])
        else:
            f = self.decay(cycle, n)
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Cycles of linear warm-up then linear decay from f_max towards f_min over the cycle length."""

    def decay(self, cycle: int, n: int) -> float:
        """Linear decay (the Stable Diffusion schedule, with cycle_lengths ~1e13 it is constant f_max)."""
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
