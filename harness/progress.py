"""Rank 0's progress display: a rich progress bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, enabled: bool, total_steps: int, log, log_every: int) -> None:
        self.enabled, self.total, self.log, self.every = enabled, total_steps, log, log_every
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                     transient=False)
            self._task = self._bar.add_task("train", total=total_steps, status="")
            self._bar.start()

    def update(self, step: int, loss: float, metrics: dict[str, float],
               samples_per_s: float) -> None:
        if not self.enabled or (self._bar is None and step % self.every and step != self.total):
            return                  # nothing shown at this step: nothing formatted either
        shown = "".join(f" {m} {v:.3f}" for m, v in metrics.items())
        status = f"loss {loss:.4f}{shown} {samples_per_s:,.0f} samples/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        else:
            self.log.info(f"step {step}/{self.total} {status}")

    def epoch(self, epoch: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"epoch {epoch}"]
        if rec.get("train_loss") is not None:
            parts.append(f"train loss {rec['train_loss']:.4f}")
        if "eval_loss" in rec:
            shown = "".join(f" {k[5:]} {v:.4f}" for k, v in rec.items()
                            if k.startswith("eval_") and k not in ("eval_loss", "eval_samples")
                            and isinstance(v, float))
            parts.append(f"test loss {rec['eval_loss']:.4f}{shown}")
        msg = " | ".join(parts)
        if self._bar is not None:
            self._bar.console.print(msg)
        else:
            self.log.info(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
