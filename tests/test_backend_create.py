"""Choosing a backend by name: clear errors, no framework imported to report them."""

from __future__ import annotations

import os
import sys

import pytest

from harness.backends.base import create, horovod_features, resolve_gradient_path
from harness.config import RunConfig
from harness.env import World
from harness.errors import ConfigError


def test_fit_loop_without_horovod_is_one_clear_error(monkeypatch):
    """allreduce = auto without Horovod resolves to mpi4py, which has no model.fit path."""
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "horovod" else object())
    cfg = RunConfig(framework="tensorflow", tf_loop="fit")
    path = resolve_gradient_path(cfg, World(0, 2, 0, 2, "test"), env={})
    assert path == "mpi"
    with pytest.raises(ConfigError, match="tf_loop = 'fit' trains with Horovod's Keras optimizer"):
        create(cfg, World(0, 1, 0, 1, "test"), path)
    assert "tensorflow" not in sys.modules


MPIRUN = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
GLOO = {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}
TWO = World(0, 2, 0, 2, "test")


def auto(monkeypatch, horovod=True, mpi4py=True, world=TWO, env=MPIRUN, cuda=False, **cfg):
    """What ``allreduce = "auto"`` resolves to with the modules and launch given."""
    missing = {n for n, there in (("horovod", horovod), ("mpi4py", mpi4py)) if not there}
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name in missing else object())
    return resolve_gradient_path(RunConfig(**cfg), world, env=env, has_cuda=lambda: cuda)


def test_auto_picks_the_fastest_path_that_supports_the_run(monkeypatch):
    """docs/benchmarks.md section 1: one rank exchanges nothing, PyTorch on CPU under an MPI
    launcher steps faster on mpi4py, TensorFlow and GPUs on Horovod."""
    one = World(0, 1, 0, 1, "single process")
    for fw in ("torch", "tensorflow"):
        assert auto(monkeypatch, framework=fw, world=one, env={}) == "local"
    assert auto(monkeypatch, framework="torch") == "mpi"
    assert auto(monkeypatch, framework="torch", env={"PMIX_RANK": "0",
                                                     "SLURM_STEP_NUM_TASKS": "2"}) == "mpi"
    assert auto(monkeypatch, framework="tensorflow") == "horovod"
    assert auto(monkeypatch, framework="torch", cuda=True) == "horovod"      # NCCL
    assert auto(monkeypatch, framework="torch", env=GLOO) == "horovod"      # no MPI to join
    assert auto(monkeypatch, framework="torch", mpi4py=False) == "horovod"
    assert auto(monkeypatch, framework="tensorflow", horovod=False) == "mpi"
    assert auto(monkeypatch, framework="torch", horovod=False, mpi4py=False) == "local"
    assert auto(monkeypatch, framework="torch", mode="async", allreduce="horovod") == "local"
    for path in ("horovod", "mpi", "local"):      # what the user sets is what runs
        assert auto(monkeypatch, framework="torch", world=one, allreduce=path) == path


@pytest.mark.parametrize("setting", [
    {"reduction": "adasum"}, {"grad_exchange": "optimizer"}, {"cycle_time_ms": 5.0},
    {"fusion_threshold_mb": 0.0}, {"horovod_timeline": "t.json"},
    {"gradient_predivide_factor": 2.0}, {"elastic": True},
    {"framework": "tensorflow", "tf_loop": "fit"}])
def test_auto_keeps_horovod_for_what_only_horovod_does(monkeypatch, setting):
    cfg = {"framework": "torch", **setting}
    assert horovod_features(RunConfig(**cfg))
    for world in (TWO, World(0, 1, 0, 1, "single process")):
        assert auto(monkeypatch, world=world, **cfg) == "horovod"
    # without Horovod the mpi4py path's own checks name what it cannot do
    assert auto(monkeypatch, horovod=False, **cfg) == "mpi"


def test_auto_resolves_before_the_framework_is_imported_for_its_threads(monkeypatch):
    """create() with no path resolves it after the thread settings: asking torch for CUDA
    imports torch, which reads OMP_NUM_THREADS once, at import."""
    seen = {}
    monkeypatch.setattr("harness.backends.base.resolve_gradient_path",
                        lambda cfg, world, has_cuda=None: seen.setdefault(
                            "threads", os.environ.get("OMP_NUM_THREADS")) and "nowhere")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(ValueError, match="gradient path 'nowhere'"):
        create(RunConfig(framework="torch", threads_per_rank=3), TWO)
    assert seen["threads"] == "3"
