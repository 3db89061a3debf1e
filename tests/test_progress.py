"""Rank 0's progress lines (harness/progress.py) without a terminal: one line every
``log_every`` steps and one at the last step, and nothing formatted on the steps between."""

from __future__ import annotations

from harness.progress import Progress


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


class Counting(dict):
    """Metrics that count how often the progress line reads them."""

    reads = 0

    def items(self):
        Counting.reads += 1
        return super().items()


def test_a_line_every_log_every_steps_and_at_the_end_and_nothing_formatted_between():
    log = Lines()
    p = Progress(True, 25, log, 10)
    Counting.reads = 0
    metrics = Counting(acc=0.5)
    for step in range(1, 26):
        p.update(step, 1.0 / step, metrics, 1234.0)
    assert log.lines == ["step 10/25 loss 0.1000 acc 0.500 1,234 samples/s",
                         "step 20/25 loss 0.0500 acc 0.500 1,234 samples/s",
                         "step 25/25 loss 0.0400 acc 0.500 1,234 samples/s"]
    assert Counting.reads == 3          # the 22 steps between cost no formatting


def test_progress_off_logs_nothing():
    log = Lines()
    p = Progress(False, 5, log, 1)
    for step in range(1, 6):
        p.update(step, 1.0, {}, 1.0)
    assert log.lines == []
