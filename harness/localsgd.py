"""Local SGD and post-local SGD: ranks step on their own gradients and average their weights
every ``local_sgd_period`` steps, instead of averaging gradients every step.

Each rank applies its own gradient (no exchange) for H steps; then one allreduce of the weights
makes every rank's model the average (Stich 2019, "Local SGD converges fast and communicates
little"). Post-local SGD (Lin et al. 2020) exchanges gradients densely for the first
``local_sgd_start_epoch`` epochs, then switches. Optimizer state (momentum, Adam's moments)
stays each rank's own, as in PyTorch's ``PostLocalSGDOptimizer``; a checkpoint carries every
rank's (``Backend.exchange_state``).

Averages also close every epoch and the run, so evaluations, checkpoints and the final weights
see one model; a checkpoint or a preemption stop waits for the next average (at most H - 1
steps), where the ranks' weights agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: the config keys of local SGD
KEYS = ("local_sgd_period", "local_sgd_start_epoch", "local_sgd_weighted")


@dataclass
class LocalSGD:
    period: int
    start_epoch: int
    weighted: bool
    #: samples this rank applied since the last average (the weighted average's weight)
    applied: int = 0

    @classmethod
    def of(cls, cfg: Any, world_size: int) -> "LocalSGD | None":
        """The run's schedule, or None (off, or one rank: nothing to average)."""
        if not cfg.local_sgd_period or world_size == 1:
            return None
        return cls(cfg.local_sgd_period, cfg.local_sgd_start_epoch, cfg.local_sgd_weighted)

    def local(self, epoch: int) -> bool:
        """Whether steps of ``epoch`` (0-based) are local."""
        return epoch >= self.start_epoch

    def due(self, step_in_epoch: int, steps_per_epoch: int, step: int, total: int) -> bool:
        """After a local step that ends at these 1-based counts: average now?"""
        return (step_in_epoch % self.period == 0 or step_in_epoch >= steps_per_epoch
                or step >= total)

    def share(self, world_size: int, sum_over_ranks: Callable[[np.ndarray], np.ndarray]) -> float:
        """This rank's factor in the average (its weights are multiplied by it, then summed
        over ranks): 1/size, or its applied samples over all ranks' (a collective when
        ``weighted``). A period in which no rank applied a step averages plainly."""
        mine, self.applied = self.applied, 0
        if not self.weighted:
            return 1.0 / world_size
        total = float(sum_over_ranks(np.array([mine], np.float64))[0])
        return mine / total if total > 0 else 1.0 / world_size
