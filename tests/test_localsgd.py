"""Local SGD's schedule: when the ranks average, and each rank's share of the average."""

import numpy as np

from harness.config import RunConfig
from harness.localsgd import LocalSGD


def test_off_or_one_rank_means_no_schedule():
    assert LocalSGD.of(RunConfig(), 4) is None
    assert LocalSGD.of(RunConfig(local_sgd_period=8), 1) is None
    local = LocalSGD.of(RunConfig(local_sgd_period=8, local_sgd_start_epoch=2), 4)
    assert local is not None and not local.local(1) and local.local(2)


def test_averages_every_period_and_at_every_epoch_end_and_the_last_step():
    local = LocalSGD(period=4, start_epoch=0, weighted=False)
    spe, total = 10, 25              # 10 steps an epoch, max_steps stops in the third
    due = [step for step in range(1, total + 1)
           if local.due((step - 1) % spe + 1, spe, step, total)]
    assert due == [4, 8, 10, 14, 18, 20, 24, 25]


def test_each_rank_weighs_in_by_the_samples_it_applied():
    plain = LocalSGD(period=4, start_epoch=0, weighted=False, applied=96)
    assert plain.share(4, lambda v: 1 / 0) == 0.25         # no collective
    assert plain.applied == 0
    # rank 0 applied 96 samples, the other ranks 160 in all (one skipped step of 64)
    weighted = LocalSGD(period=4, start_epoch=0, weighted=True, applied=96)
    assert weighted.share(3, lambda v: v + 160) == 96 / 256
    assert weighted.applied == 0
    idle = LocalSGD(period=4, start_epoch=0, weighted=True)        # every rank skipped
    assert idle.share(2, lambda v: np.zeros(1)) == 0.5


def test_the_loop_averages_when_due_with_each_ranks_applied_samples():
    """The step loop's wiring (harness/loop.py): a local step that was skipped adds nothing to
    this rank's weight; an average sends the weights' bytes and lets checkpoints happen."""
    from types import SimpleNamespace

    from harness.compress import dense_sent_bytes
    from harness.loop import Position, average_if_due

    shares = []
    backend = SimpleNamespace(layout=SimpleNamespace(total=1000), average_params=shares.append,
                              allreduce_host=lambda v: v + 32)    # the other rank applied 32
    run = SimpleNamespace(pos=Position(), spe=10, total_steps=20, synced=True,
                          ctx=SimpleNamespace(world=SimpleNamespace(size=2)))
    local = LocalSGD(period=2, start_epoch=0, weighted=True)
    assert average_if_due(run, local, backend, True, 16) == (0.0, 0)     # step 1: not due
    assert not run.synced and shares == []
    run.pos.step = run.pos.step_in_epoch = 1
    _, sent = average_if_due(run, local, backend, False, 16)     # step 2 skipped, then averaged
    assert shares == [16 / 48] and sent == dense_sent_bytes(1000, 2) and run.synced
    assert local.applied == 0
