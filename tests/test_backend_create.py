"""Choosing a backend by name: clear errors, no framework imported to report them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import PY, REPO, needs_horovod, needs_mpi

from harness.backends.base import create, resolve_gradient_path
from harness.backends.common import check_no_horovod_features, horovod_features
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
    for launcher in ({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "2"},      # srun --mpi=pmix
                     {"PMI_RANK": "0", "PMI_SIZE": "2"},                      # Hydra
                     {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2"}):  # MVAPICH
        assert auto(monkeypatch, framework="torch", env=launcher) == "mpi"
    assert auto(monkeypatch, framework="tensorflow") == "horovod"
    assert auto(monkeypatch, framework="torch", cuda=True) == "horovod"      # NCCL
    # fp16 is a float16 sum in Horovod, a gather (more bytes beyond 2 ranks) on mpi4py; one
    # rank compresses nothing
    assert auto(monkeypatch, framework="torch", compression="fp16") == "horovod"
    assert auto(monkeypatch, framework="torch", compression="fp16", world=one,
                env={}) == "local"
    assert auto(monkeypatch, framework="torch", compression="int8") == "mpi"
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
    # without Horovod, the mpi4py and local paths refuse it (one line, exit 2), not ignore it
    assert auto(monkeypatch, horovod=False, **cfg) == "mpi"
    for path in ("mpi", "local"):
        with pytest.raises(ConfigError, match=f"needs Horovod, but this run's gradient path "
                                              f"is allreduce = '{path}'"):
            check_no_horovod_features(RunConfig(**cfg), path)


@pytest.mark.parametrize("variable, value", [
    ("HOROVOD_TIMELINE", "/tmp/t.json"), ("HOROVOD_AUTOTUNE", "1"),
    ("HOROVOD_FUSION_THRESHOLD", "0"), ("HOROVOD_CYCLE_TIME", "5"),
    ("HOROVOD_HIERARCHICAL_ALLREDUCE", "1"), ("HOROVOD_CPU_OPERATIONS", "gloo"),
    ("HOROVOD_WAKE_ON_ENQUEUE", "0")])
def test_auto_keeps_horovod_for_horovod_settings_in_the_launch(monkeypatch, variable, value):
    """horovodrun --timeline-filename / --autotune / --fusion-threshold-mb ... reach the ranks
    as HOROVOD_* variables, which only Horovod reads."""
    assert auto(monkeypatch, framework="torch", env={**MPIRUN, variable: value}) == "horovod"
    if variable == "HOROVOD_AUTOTUNE":          # a flag: 0 is off, as Horovod reads it
        for off in ("0", "00", ""):
            assert auto(monkeypatch, framework="torch", env={**MPIRUN, variable: off}) == "mpi"
        # found by a new-user hunt: what is no whole number was ignored under auto, and
        # refused under allreduce = 'horovod'; now auto takes Horovod, which refuses it
        for odd in ("yes", "true", "false"):
            assert auto(monkeypatch, framework="torch", env={**MPIRUN, variable: odd}) == \
                "horovod"


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


@needs_horovod
@needs_mpi
@pytest.mark.mpi
def test_ranks_whose_environments_differ_agree_on_one_path(results):
    """Found by a review: ``auto`` reads each rank's own environment, and a multi-host mpirun
    forwards only ``-x`` variables, so a rank with HOROVOD_CYCLE_TIME started Horovod while the
    other started mpi4py, and both waited in their first exchange. One mpirun with two app
    contexts gives the ranks those two environments on this one host."""
    args = [PY, "-m", "harness", "train", "--framework", "torch", "--model", "mlp",
            "--dataset", "synthetic", "--max-steps", "3", "--eval-every", "0",
            "--stall-timeout-s", "20", "--out-dir", results, "--run-name", "mixed"]
    mpirun = ["mpirun", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
              "--oversubscribe", "-x", "PATH", "-x", "PYTHONPATH"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    p = subprocess.run([str(a) for a in [*mpirun, "-np", "1", *args, ":", "-np", "1",
                                         "-x", "HOROVOD_CYCLE_TIME=2", *args]],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert re.search(r"chose different gradient paths .*\(rank\(s\) 0 mpi; rank\(s\) 1 "
                     r"horovod: .*every rank takes horovod", out), out[-3000:]
    start = json.loads((results / "mixed" / "config.json").read_text())
    assert start["backend"]["gradient_path"] == "horovod"


@pytest.mark.parametrize("allreduce, path, warned", [
    ("mpi", "mpi", True), ("local", "local", True), ("horovod", "horovod", False),
    ("auto", "horovod", False)])
def test_horovod_settings_a_path_without_horovod_ignores_are_named(caplog, allreduce, path,
                                                                   warned):
    """Found by a review: an explicit mpi4py or local path ignored HOROVOD_AUTOTUNE and the
    like without a word."""
    import logging

    from harness.backends.base import warn_unused_horovod_settings

    env = {"HOROVOD_AUTOTUNE": "1", "HOROVOD_TIMELINE": "/tmp/t.json"}
    with caplog.at_level(logging.WARNING, logger="harness"):
        warn_unused_horovod_settings(RunConfig(allreduce=allreduce), World(0, 2, 0, 2, "test"),
                                     path, env)
        warn_unused_horovod_settings(RunConfig(allreduce=allreduce), World(1, 2, 1, 2, "test"),
                                     path, env)         # rank 0 says it
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == warned, said
    if warned:
        assert said[0].startswith(f"HOROVOD_TIMELINE, HOROVOD_AUTOTUNE set, but this run's "
                                  f"gradient path is {path!r} (allreduce = {allreduce!r})")


def test_what_horovodrun_gloo_sets_itself_leaves_one_rank_local(monkeypatch):
    """Found by a review: HOROVOD_CPU_OPERATIONS=gloo, which horovodrun --gloo sets itself,
    took a 1-rank run onto Horovod; HOROVOD_TORUS_ALLREDUCE=false counted as set but was
    never refused."""
    one = World(0, 1, 0, 1, "horovodrun")
    gloo = {"HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo"}
    assert auto(monkeypatch, framework="torch", world=one, env=gloo) == "local"
    assert auto(monkeypatch, framework="torch", world=one,
                env={"HOROVOD_CPU_OPERATIONS": "gloo"}) == "horovod"       # the user's own
    from harness.backends.common import horovod_variable_problems

    assert [p[0] for p in horovod_variable_problems({"HOROVOD_TORUS_ALLREDUCE": "false"})] == \
        ["HOROVOD_TORUS_ALLREDUCE"]


def test_what_horovodrun_gloo_sets_itself_is_not_named(caplog):
    """Found by a new-user hunt: horovodrun --gloo sets HOROVOD_CPU_OPERATIONS=gloo, which
    the warning blamed on the user."""
    import logging

    from harness.backends.base import warn_unused_horovod_settings

    env = {"HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo"}
    with caplog.at_level(logging.WARNING, logger="harness"):
        warn_unused_horovod_settings(RunConfig(allreduce="local"), World(0, 1, 0, 1, "test"),
                                     "local", env)
        assert not caplog.records
        warn_unused_horovod_settings(RunConfig(allreduce="local"), World(0, 1, 0, 1, "test"),
                                     "local", {**env, "HOROVOD_CYCLE_TIME": "2"})
    assert [r.getMessage().split(" set,")[0] for r in caplog.records] == ["HOROVOD_CYCLE_TIME"]
