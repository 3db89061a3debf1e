"""The learning-rate schedule every loop follows (harness/driver.py ``LRSchedule``): linear
scaling with the workers and a linear warm-up from ``lr`` to the scaled rate (Goyal et al.).
``schedule(s)`` is the rate of the step trained after ``s`` steps are done."""

from __future__ import annotations

import pytest

from harness.config import RunConfig
from harness.driver import LRSchedule


def rates(cfg: RunConfig, workers: int, steps_per_epoch: int, steps: int) -> list[float]:
    schedule = LRSchedule.of(cfg, workers, steps_per_epoch)
    return [schedule(s) for s in range(steps)]


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_linear_scaling_peaks_at_lr_times_workers(workers):
    cfg = RunConfig(lr=0.05, lr_scaling="linear", warmup_epochs=0)
    assert rates(cfg, workers, 7, 20) == [pytest.approx(cfg.lr * workers)] * 20


@pytest.mark.parametrize("workers", [1, 4])
def test_no_scaling_keeps_lr(workers):
    cfg = RunConfig(lr=0.05, lr_scaling="none", warmup_epochs=2)
    assert rates(cfg, workers, 7, 30) == [pytest.approx(cfg.lr)] * 30


@pytest.mark.parametrize("warmup_epochs,steps_per_epoch", [(1, 5), (2, 7), (0.5, 10), (1.5, 4)])
def test_warm_up_rises_linearly_from_lr_to_the_peak_over_its_epochs(warmup_epochs,
                                                                    steps_per_epoch):
    workers = 4
    cfg = RunConfig(lr=0.1, lr_scaling="linear", warmup_epochs=warmup_epochs)
    peak = cfg.lr * workers
    warm = round(warmup_epochs * steps_per_epoch)            # warm-up steps
    lrs = rates(cfg, workers, steps_per_epoch, warm + 10)
    assert lrs[0] == pytest.approx(cfg.lr)                 # the first step trains at lr
    steps = [b - a for a, b in zip(lrs, lrs[1:warm + 1])]
    assert steps == [pytest.approx((peak - cfg.lr) / warm)] * warm   # equal increments ...
    assert lrs[warm:] == [pytest.approx(peak)] * 10        # ... up to the peak, then constant
    assert all(lr < peak for lr in lrs[:warm])


def test_warm_up_follows_the_workers_it_scales_by():
    cfg = RunConfig(lr=0.1, lr_scaling="linear", warmup_epochs=1)
    two, eight = rates(cfg, 2, 10, 12), rates(cfg, 8, 10, 12)
    assert two[0] == eight[0] == pytest.approx(cfg.lr)
    assert two[5] == pytest.approx((cfg.lr + 2 * cfg.lr) / 2)       # halfway: the midpoint
    assert eight[5] == pytest.approx((cfg.lr + 8 * cfg.lr) / 2)
    assert two[10:] == [pytest.approx(2 * cfg.lr)] * 2
    assert eight[10:] == [pytest.approx(8 * cfg.lr)] * 2


def test_a_single_worker_has_nothing_to_warm_up_to():
    cfg = RunConfig(lr=0.1, lr_scaling="linear", warmup_epochs=3)
    assert rates(cfg, 1, 5, 20) == [pytest.approx(cfg.lr)] * 20
