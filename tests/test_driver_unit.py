"""The resume lookup and start agreement that the synchronous driver and the parameter server
share (harness/driver.py), in one process: several ranks are simulated by summing their
vectors the way the collective would."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from harness import checkpoint as ckpt_io
from harness.config import RunConfig
from harness.driver import agree_on_start, find_resume_checkpoint
from harness.errors import CheckpointError, ConfigError

LOG = logging.getLogger("test")


def _save(d: Path, step: int, prefix: str = "ckpt") -> Path:
    ckpt = ckpt_io.Checkpoint({"position": {"step": step}}, {"w": np.full(3, float(step))})
    return ckpt_io.save(d, ckpt, prefix, keep=5)


def _cfg(resume: str) -> RunConfig:
    return RunConfig(resume=resume)


@pytest.mark.parametrize("prefix", ["ckpt", "ps-server1"])
def test_auto_takes_the_newest_of_its_own_prefix(tmp_path, prefix):
    d = tmp_path / "checkpoints"
    _save(d, 5, prefix)
    _save(d, 9, prefix)
    _save(d, 99, "other")                      # another prefix is not this rank's
    found = find_resume_checkpoint(_cfg("auto"), d, LOG, prefix)
    assert found is not None and found.step == 9
    assert find_resume_checkpoint(_cfg("auto"), tmp_path / "none", LOG, prefix) is None


@pytest.mark.parametrize("prefix", ["ckpt", "ps-server0"])
def test_never_refuses_existing_checkpoints_unless_slurm_requeued(tmp_path, prefix,
                                                                   monkeypatch):
    d = tmp_path / "checkpoints"
    assert find_resume_checkpoint(_cfg("never"), d, LOG, prefix) is None
    _save(d, 4, prefix)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(ConfigError, match=f"{prefix}-000000004.npz.*resume = 'never'"):
        find_resume_checkpoint(_cfg("never"), d, LOG, prefix)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    found = find_resume_checkpoint(_cfg("never"), d, LOG, prefix)
    assert found is not None and found.step == 4


def test_path_yields_to_a_newer_checkpoint_of_the_run(tmp_path):
    given = _save(tmp_path / "elsewhere", 3, "ps-server0")
    given1 = _save(tmp_path / "elsewhere", 3, "ps-server1")
    d = tmp_path / "run" / "checkpoints"
    # server 1 reads its own file of the same step as the PATH given for server 0
    found = find_resume_checkpoint(_cfg(str(given)), d, LOG, "ps-server1", given1)
    assert found is not None and found.path == given1
    time.sleep(0.01)
    _save(d, 2, "ps-server1")                  # saved after PATH: a requeue of this run
    found = find_resume_checkpoint(_cfg(str(given)), d, LOG, "ps-server1", given1)
    assert found is not None and found.step == 2 and found.path.parent == d


def _ranks(contribs):
    """Each rank's return value of agree_on_start when the ranks send ``contribs``."""
    total = np.sum([np.concatenate([[1.0 if e else 0.0, 0.0 if f else 1.0], p])
                    for e, f, p in contribs], axis=0)
    return [agree_on_start(lambda v, t=total: t.copy(), e, f, p) for e, f, p in contribs]


def test_agreement_shares_rank0s_position_and_finished_flag():
    pos = np.array([1.0, 2.0, 30.0])
    zero = np.zeros(3)
    for finished in (True, False):
        out = _ranks([(None, finished, pos), (None, True, zero), (None, True, zero)])
        for payload, done in out:
            assert done is finished
            np.testing.assert_array_equal(payload, pos)


def test_agreement_needs_every_checking_rank_finished():
    # parameter servers: each server checks its own shard; workers send neutral values
    out = _ranks([(None, True, np.zeros(0)), (None, False, np.zeros(0)),
                  (None, True, np.zeros(0))])
    assert [done for _, done in out] == [False, False, False]


def test_agreement_raises_the_error_where_it_happened_and_a_line_elsewhere():
    err = ConfigError("checkpoint x is for another model")
    contribs = [(err, True, np.zeros(1)), (None, True, np.zeros(1))]
    total = np.array([1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="another model"):
        agree_on_start(lambda v: total, *contribs[0])
    with pytest.raises(CheckpointError, match="a parameter server could not start"):
        agree_on_start(lambda v: total, *contribs[1], who="a parameter server")


def test_a_resume_at_another_world_size_keeps_a_scaled_lr_that_is_not_exact_in_binary():
    """Found by a new-user hunt: 3 ranks at lr 0.05 (linear scaling) peak at 0.05 x 3 =
    0.15000000000000002; resuming on 1 rank with lr = 0.15, lr_scaling = 'none' and the same
    global batch, as the refusal said, was refused again ("peak lr 0.15, ... peak lr 0.15")."""
    from harness.env import World
    from harness.loop import Plan
    from harness.train import check_resume_fits

    def at(ranks: int, **kw):
        cfg = RunConfig(global_batch_size=96, **kw)
        return cfg, World(0, ranks, 0, ranks, "test"), Plan.of(cfg, ranks, 960)

    cfg3, _, plan3 = at(3, lr=0.05)
    assert plan3.lr_peak != 0.15
    meta = {"plan": {"global_batch": plan3.global_batch, "lr_peak": plan3.lr_peak,
                     "warmup_steps": plan3.warmup_steps}, "world_size": 3,
            "position": {"step": 14}}
    ckpt = ckpt_io.Checkpoint(meta, {"w": np.zeros(1)}, path=Path("ckpt-000000014.npz"))
    check_resume_fits(ckpt, *at(1, lr=0.15, lr_scaling="none"), LOG)        # resumes
    with pytest.raises(CheckpointError) as e:
        check_resume_fits(ckpt, *at(1, lr=0.05), LOG)
    assert "peak lr 0.15 and 0 warm-up steps, this run has 1 rank(s), peak lr 0.05" in str(e.value)
    assert "lr = 0.15, lr_scaling = 'none', global_batch_size = 96" in str(e.value)


def test_a_run_folder_of_the_other_mode_is_not_silently_started_over(tmp_path):
    """Found by a new-user hunt: a parameter-server run in a folder with a sync run's
    checkpoints (or the reverse) started from step 0 and appended to that run's records."""
    sync_dir, ps_dir = tmp_path / "sync" / "checkpoints", tmp_path / "ps" / "checkpoints"
    _save(sync_dir, 20)
    _save(ps_dir, 11, prefix="ps-server0")
    for resume in ("auto", "never"):
        with pytest.raises(CheckpointError, match=r"holds checkpoints of a mode = 'sync' run "
                           r"\(ckpt-000000020.npz\), this run is mode = 'async': resume it "
                           "with mode = 'sync'"):
            find_resume_checkpoint(RunConfig(resume=resume, mode="async"), sync_dir, LOG,
                                   "ps-server0")
        with pytest.raises(CheckpointError, match="holds checkpoints of a mode = 'async' run"):
            find_resume_checkpoint(RunConfig(resume=resume), ps_dir, LOG)
    assert find_resume_checkpoint(_cfg("auto"), sync_dir, LOG).step == 20     # its own mode


@pytest.mark.parametrize("saved, run, key", [
    ({"momentum": 0.9}, {"momentum": 0.0}, "momentum"),
    ({"weight_decay": 0.0}, {"weight_decay": 0.05}, "weight_decay"),
    ({"ps_consistency": "async"}, {"ps_consistency": "bsp"}, "ps_consistency"),
    ({"seed": 0}, {"seed": 5}, "seed"),
    ({"shuffle": True}, {"shuffle": False}, "shuffle"),
])
def test_a_resume_keeps_the_settings_its_state_depends_on(saved, run, key):
    """Found by a new-user hunt: PyTorch kept the checkpoint's momentum and weight decay while
    config.json recorded the new ones; a parameter server reread its workers' clocks in a new
    batch size and skipped samples."""
    from harness.driver import check_same_settings

    ckpt = ckpt_io.Checkpoint({"config": saved}, {}, path=Path("ckpt-000000020.npz"))
    check_same_settings(ckpt, RunConfig(**saved), (key,))
    check_same_settings(ckpt_io.Checkpoint({"config": {}}, {}), RunConfig(**run), (key,))
    with pytest.raises(CheckpointError, match=f"written with {key} = {saved[key]!r}, this run "
                       f"has {key} = {run[key]!r} .*: resume with {key} = {saved[key]!r}"):
        check_same_settings(ckpt, RunConfig(**run), (key,))
    check_same_settings(ckpt_io.Checkpoint({"config": {"momentum": 0.1 + 0.2}}, {}),
                        RunConfig(momentum=0.3), ("momentum",))      # float noise is the same


def test_a_checkpoint_of_the_other_mode_given_to_resume_says_so(tmp_path):
    """Found by a new-user hunt: a sync checkpoint given to a parameter server ended in a
    KeyError traceback (or "written by 1 server(s)"), a server's shard given to a sync run in
    "resume with 3 rank(s)" and then "weights does not fit this model"."""
    sync_ckpt = ckpt_io.save(tmp_path / "s", ckpt_io.Checkpoint(
        {"position": {"step": 20}, "config": {"mode": "sync"}}, {"w": np.zeros(2)}))
    ps_ckpt = ckpt_io.save(tmp_path / "p", ckpt_io.Checkpoint(
        {"position": {"step": 11}, "config": {"mode": "async"}}, {"params": np.zeros(2)}),
        prefix="ps-server0")
    with pytest.raises(CheckpointError, match="written with mode = 'sync', this run has mode = "
                       "'async' .*: resume with mode = 'sync'"):
        find_resume_checkpoint(RunConfig(mode="async", resume=str(sync_ckpt)),
                               tmp_path / "new", LOG, "ps-server0", sync_ckpt)
    with pytest.raises(CheckpointError, match="written with mode = 'async', this run has mode "
                       "= 'sync'"):
        find_resume_checkpoint(RunConfig(resume=str(ps_ckpt)), tmp_path / "new", LOG)
    assert find_resume_checkpoint(RunConfig(resume=str(sync_ckpt)), tmp_path / "new",
                                  LOG).step == 20


class LoadingBackend:
    """What harness.train.load_into_backend calls on a backend; keeps the exchange state."""

    def __init__(self, cfg):
        self.cfg, self.exchange = cfg, None

    def set_weights(self, w):
        pass

    def set_optimizer_state(self, arrays, meta):
        pass

    def set_exchange_state(self, state):
        self.exchange = state


@pytest.mark.parametrize("now, warned", [
    ({"compression": "none"}, True),                   # found by a new-user hunt: silent
    ({"compression": "topk", "compression_ratio": 0.01}, False),      # the same: restored
    ({"compression": "int8"}, False),      # the backend finds no residual of its own: it warns
])
def test_a_resume_that_drops_the_checkpoints_compression_state_says_so(caplog, now, warned):
    from harness.train import load_into_backend

    saved = RunConfig(compression="topk", compression_ratio=0.01).to_dict()
    ckpt = ckpt_io.Checkpoint({"config": saved, "gradient_scale": "before_sum"},
                              {"w": np.zeros(1)},
                              exchange={"residual": np.zeros((2, 3)), "rng": np.zeros((2, 4))},
                              path=Path("ckpt-000000007.npz"))
    backend = LoadingBackend(RunConfig(**now))
    with caplog.at_level(logging.WARNING, logger="harness"):
        load_into_backend(backend, ckpt)
    said = "holds each rank's residual state of compression = 'topk'" in caplog.text
    assert said == warned, caplog.text
    assert "rng" in backend.exchange                  # restored whatever the compression
    assert ("residual" in backend.exchange) == (now["compression"] == "topk")


def test_a_parameter_server_resume_keeps_each_workers_samples_per_update():
    """Found by a review: the check compared batch_size alone, so another global_batch_size
    or backward_passes_per_step went through (and skipped samples), while another batch_size
    under a global_batch_size, which changes nothing, was refused."""
    from harness.driver import check_worker_batch

    saved = RunConfig(batch_size=32).to_dict()
    ckpt = ckpt_io.Checkpoint({"config": saved}, {}, path=Path("ps-server0-000000011.npz"))
    check_worker_batch(ckpt, RunConfig(global_batch_size=64, batch_size=7), 2)   # 32 each
    for changed in ({"batch_size": 64}, {"backward_passes_per_step": 2},
                    {"global_batch_size": 128}):
        with pytest.raises(CheckpointError, match=r"written with 32 samples per worker and "
                           r"update .*, this run has 64"):
            check_worker_batch(ckpt, RunConfig(**changed), 2)


def test_a_resume_at_another_world_size_inside_the_warm_up_is_refused():
    """Found by a review: following the advice (lr = the peak, lr_scaling = 'none') inside the
    warm-up flattened the ramp, which ran from lr to lr x ranks."""
    from harness.env import World
    from harness.loop import Plan
    from harness.train import check_resume_fits

    def at(ranks: int, **kw):
        cfg = RunConfig(global_batch_size=96, warmup_epochs=1.0, **kw)
        return cfg, World(0, ranks, 0, ranks, "test"), Plan.of(cfg, ranks, 960)

    cfg3, _, plan3 = at(3, lr=0.05)
    assert plan3.warmup_steps == 10

    def ckpt_at(step: int):
        meta = {"plan": {"global_batch": 96, "lr_peak": plan3.lr_peak, "warmup_steps": 10},
                "world_size": 3, "config": cfg3.to_dict(), "position": {"step": step}}
        return ckpt_io.Checkpoint(meta, {}, path=Path(f"ckpt-{step:09d}.npz"))

    with pytest.raises(CheckpointError, match=r"stopped in the learning-rate warm-up \(step 4 "
                       r"of 10\), which ramps from lr = 0.05 to the peak 0.15 set by its 3 "
                       r"rank\(s\); this run's ramp starts at lr = 0.15: resume with 3"):
        check_resume_fits(ckpt_at(4), *at(1, lr=0.15, lr_scaling="none"), LOG)
    check_resume_fits(ckpt_at(14), *at(1, lr=0.15, lr_scaling="none"), LOG)   # after it


def test_each_ranks_keras_velocity_of_an_older_checkpoint_is_not_restored_as_a_buffer():
    """Found by a review: under local SGD each rank's optimizer rows of a TensorFlow
    checkpoint from before TorchSGD were loaded as PyTorch's buffer (sign flipped, scaled by
    the learning rate); only rank 0's state is converted, so the ranks start from it."""
    from harness.train import load_into_backend

    cfg = RunConfig(framework="tensorflow", local_sgd_period=4)
    rows = {"opt/0000": np.zeros((2, 3)), "rng": np.zeros((2, 4))}
    for meta, kept in (({"kind": "keras.optimizers.sgd"}, ["rng"]),
                       ({"kind": "keras.optimizers.sgd", "momentum_buffer": "torch"},
                        ["opt/0000", "rng"])):
        ckpt = ckpt_io.Checkpoint({"config": cfg.to_dict(), "optimizer": meta},
                                  {"w": np.zeros(1)}, {"0000": np.zeros(3)}, exchange=rows)
        backend = LoadingBackend(cfg)
        load_into_backend(backend, ckpt)
        assert sorted(backend.exchange) == kept


@pytest.mark.parametrize("allreduce, marked, kept", [
    ("mpi", False, False), ("auto", False, False),      # which scale: unknown, so afresh
    ("mpi", True, True), ("auto", True, True), ("horovod", False, True)])
def test_error_feedback_residuals_of_unknown_scale_start_afresh(allreduce, marked, kept):
    """Found by a review: the mpi4py path scaled gradients after the sum until it moved the
    1/size into the loss, as Horovod's flat exchange; a checkpoint it wrote before that holds
    residuals size times today's, which a resume took as they were. An unmarked checkpoint
    cannot tell which scale it holds (PowerSGD's Q, scale-free, stays)."""
    from harness.train import GRADIENT_SCALE, load_into_backend

    cfg = RunConfig(compression="powersgd", allreduce=allreduce)
    residual = np.arange(6, dtype=np.float32).reshape(2, 3)
    meta = {"config": cfg.to_dict(), "world_size": 2} | \
        ({"gradient_scale": GRADIENT_SCALE} if marked else {})
    ckpt = ckpt_io.Checkpoint(meta, {"w": np.zeros(1)},
                              exchange={"residual": residual, "q": np.ones((1, 3))})
    backend = LoadingBackend(RunConfig(compression="powersgd", allreduce="mpi"))
    load_into_backend(backend, ckpt)
    assert sorted(backend.exchange) == (["q", "residual"] if kept else ["q"])
    if kept:
        np.testing.assert_array_equal(backend.exchange["residual"], residual)


@pytest.mark.parametrize("settings, unused", [
    ({"compression": "sign", "compression_ratio": 0.05}, ["compression_ratio"]),
    ({"compression": "topk", "compression_ratio": 0.05, "powersgd_rank": 2}, ["powersgd_rank"]),
    ({"compression": "powersgd", "powersgd_rank": 2}, []),
    ({"compression": "randomk", "compression_ratio": 0.25}, []),
    ({"compression": "none"}, [])])
def test_compression_options_the_method_does_not_read_are_named(settings, unused):
    """Found by a new-user hunt: --compression-ratio with sign (or --powersgd-rank with
    top-k) trained without a word about the option doing nothing."""
    from harness.train import unused_compression_settings

    assert unused_compression_settings(RunConfig(**settings)) == unused


def test_an_error_every_rank_meets_is_said_by_rank_0_alone(capsys, monkeypatch):
    """Found by a new-user hunt: when an elastic job fell below min_ranks, every rank left
    printed the same stop line; ``quiet`` leaves it to rank 0 (harness.elastic)."""
    from harness.api import guarded
    from harness.errors import TrainingAborted

    def fails(quiet: bool):
        def fn() -> int:
            raise TrainingAborted("1 rank(s) left, fewer than min_ranks = 2", quiet=quiet)
        return fn

    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert guarded(fails(True), distributed=False) == 3
    assert capsys.readouterr().err == ""
    assert guarded(fails(False), distributed=False) == 3
    assert capsys.readouterr().err == \
        "harness: error (rank 1): 1 rank(s) left, fewer than min_ranks = 2\n"
