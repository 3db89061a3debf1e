"""Rank-aware logging through one helper.

Rank 0 logs at INFO; other ranks log WARNING and above, so their errors always reach the user.
Every line carries the rank, which is what a user needs when a 64-rank job fails.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "[%(asctime)s rank %(rank)s] %(levelname)s %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def get_logger(rank: int = 0, verbose_all_ranks: bool = False) -> logging.Logger:
    """The harness logger for this process, configured once per rank."""
    log = logging.getLogger("harness")
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    log.addHandler(handler)
    log.setLevel(logging.INFO if (rank == 0 or verbose_all_ranks) else logging.WARNING)
    log.propagate = False
    return log
