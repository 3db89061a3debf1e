"""What a parameter-server job does, fixed before any message is sent: who serves which shard,
how many steps each worker takes, the learning-rate schedule and the checkpoint cadence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.config import RunConfig
from harness.data import Dataset, Sharder
from harness.driver import LRSchedule
from harness.errors import ConfigError
from harness.preemption import StopFlag


@dataclass(frozen=True)
class PSPlan:
    servers: int                        # ranks 0..servers-1
    world_size: int
    params: int                         # length of the flat parameter vector
    shards: list[tuple[int, int, int]]  # (server rank, start, stop) of the flat vector
    per_rank: int                       # samples per worker step
    total_steps: int                    # steps per worker
    steps_per_epoch: int
    schedule: LRSchedule
    run_dir: Path
    ckpt_every: int                     # updates between a server's checkpoints

    @property
    def workers(self) -> int:
        return self.world_size - self.servers

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(self.servers, self.world_size))

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @classmethod
    def of(cls, cfg: RunConfig, data: Dataset, params: int, world_size: int,
           run_dir: Path) -> "PSPlan":
        servers, workers = cfg.ps_servers, world_size - cfg.ps_servers
        per_rank = cfg.per_rank_batch(workers) * cfg.backward_passes_per_step
        n = len(data.train)
        spe = Sharder(n, per_rank, 0, workers, cfg.seed, cfg.shuffle).steps_per_epoch
        total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe,
                                                                   cfg.max_steps)
        # Linear scaling follows the samples per update: bsp averages all workers' batches into
        # one update (like sync allreduce); async/ssp apply each worker's batch as its own.
        per_update = workers if cfg.ps_consistency == "bsp" else 1
        return cls(servers, world_size, params,
                   [(k, *even_shard(params, k, servers)) for k in range(servers)], per_rank,
                   total, spe,
                   LRSchedule.of(cfg, per_update, spe), run_dir,
                   cfg.checkpoint_every or spe * workers)


def even_shard(total: int, k: int, n: int) -> tuple[int, int]:
    """[start, stop) of shard k of n of ``total`` values, as even as possible."""
    base, extra = divmod(total, n)
    start = k * base + min(k, extra)
    return start, start + base + (1 if k < extra else 0)


@dataclass
class PSContext:
    cfg: RunConfig
    data: Dataset
    stop: StopFlag
    ckpt_meta: dict[str, Any]
    #: the metric workers report with their loss (acc, else the task's first), or None
    metric: str | None = None
    #: a language model's tokens per sample (the records add perplexity and tokens/s), or 0
    tokens_per_sample: int = 0
    on_eval: Callable[[float, float, int], None] = lambda value, wall, version: None


def check_ps_world(cfg: RunConfig, size: int) -> None:
    """A parameter-server job of ``size`` ranks has a worker besides its ps_servers servers
    (checked by ``harness launch`` before it starts anything, and by every rank)."""
    S = cfg.ps_servers
    if size - S < 1:
        lower = " or lower ps_servers" if S > 1 else ""
        raise ConfigError(f"ps_servers = {S} leaves no worker in a job of {size} rank(s): "
                          f"launch at least {S + 1} ranks (-np {S + 1} or more){lower}")
