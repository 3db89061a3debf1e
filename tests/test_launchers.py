"""Launcher builders: exact argv lists (values with spaces and quotes stay single elements)."""

import os
import shlex

import pytest

from conftest import PY, harness, run
from harness.errors import ConfigError
from launchers import LaunchSpec, build_argv

ARGS = ["--framework", "torch", "--run-name", "my run's \"best\""]
PROG = ["/opt/my env/bin/python", "-m", "harness", "train", *ARGS]


def spec(**kw):
    return LaunchSpec(python="/opt/my env/bin/python", **kw)


def test_horovodrun():
    s = spec(launcher="horovodrun", np=4, hosts="a:2,b:2", controller="gloo",
             timeline_filename="/tmp/t l.json", fusion_threshold_mb=32, cycle_time_ms=2.5,
             autotune=True, start_timeout=60)
    assert build_argv(s, ARGS) == [
        "horovodrun", "-np", "4", "-H", "a:2,b:2", "--gloo", "--timeline-filename",
        "/tmp/t l.json", "--fusion-threshold-mb", "32", "--cycle-time-ms", "2.5", "--autotune",
        "--start-timeout", "60", *PROG]


def test_mpirun_open_mpi():
    s = spec(launcher="mpirun", np=2, hostfile="/etc/my hosts", bind_to="core", map_by="socket",
             export=["PATH", "LD_LIBRARY_PATH"], allow_run_as_root=True, oversubscribe=True)
    assert build_argv(s, ARGS) == [
        "mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--hostfile",
        "/etc/my hosts", "--bind-to", "core", "--map-by", "socket", "-x", "PATH", "-x",
        "LD_LIBRARY_PATH", *PROG]


def test_mpirun_mpich():
    s = spec(launcher="mpirun", mpi_flavour="mpich", np=8, hosts="n1:4,n2:4", bind_to="core",
             export=["PATH"])
    assert build_argv(s, ARGS) == ["mpirun", "-n", "8", "-hosts", "n1:4,n2:4", "-bind-to",
                                   "core", "-genvlist", "PATH", *PROG]


def test_srun():
    s = spec(launcher="srun", np=8, nodes=2, ntasks_per_node=4, gpus_per_task=1,
             cpus_per_task=6, export=["NCCL_DEBUG"])
    assert build_argv(s, ARGS) == [
        "srun", "--mpi=pmix", "--ntasks=8", "--nodes=2", "--ntasks-per-node=4",
        "--gpus-per-task=1", "--cpus-per-task=6", "--kill-on-bad-exit=1",
        "--export=ALL,NCCL_DEBUG", *PROG]


def test_sbatch_passes_train_args_to_the_script():
    s = spec(launcher="sbatch", np=8, nodes=2, ntasks_per_node=4, gpus_per_task=1, time="1:00:00",
             partition="gpu", job_name="exp 1")
    assert build_argv(s, ARGS) == [
        "sbatch", "--ntasks=8", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1",
        "--time=1:00:00", "--partition=gpu", "--job-name=exp 1", "slurm/train.sbatch", *ARGS]


def test_local_is_the_program():
    assert build_argv(spec(launcher="local", np=1), ARGS) == PROG


@pytest.mark.parametrize("kw, message", [
    ({"launcher": "local", "np": 2}, "runs one process"),
    ({"launcher": "mpirun", "controller": "gloo"}, "controller is a horovodrun option"),
    ({"launcher": "srun", "hosts": "a:1"}, "takes its hosts from SLURM"),
    ({"hosts": "a:1", "hostfile": "h"}, "not both"),
    ({"launcher": "srun", "np": 6, "nodes": 2, "ntasks_per_node": 4}, "make them agree"),
    ({"np": 0}, "np = 0 is out of range"),
])
def test_bad_launch_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        LaunchSpec(**kw)


def test_dry_run_prints_the_exact_command():
    p = run(harness("launch", "--launcher", "mpirun", "-np", "2", "--bind-to", "core",
                    "--export", "PATH", "--dry-run", "--", *ARGS), check=True)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    assert shlex.split(p.stdout.strip()) == [
        "mpirun", "-np", "2", *root, "--bind-to", "core", "-x", "PATH",
        PY, "-m", "harness", "train", *ARGS]


def test_launch_validates_train_args_first():
    p = run(harness("launch", "-np", "2", "--dry-run", "--", "--lr", "-1"))
    assert p.returncode == 2
    assert "lr = -1.0 is out of range" in p.stderr


def test_train_flags_survive_horovodrun_argument_parsing(monkeypatch):
    """horovodrun's argparse rejects a later flag that abbreviates two of its own options; every
    `harness train` flag must reach the program unchanged."""
    pytest.importorskip("horovod")
    import dataclasses
    import sys

    import horovod.runner.launch as hl

    from harness.config import RunConfig

    flags = ["--config"] + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]
    program = ["python", "-m", "harness", "train"]
    for flag in flags:
        program += [flag, "1"]
    monkeypatch.setattr(sys, "argv", ["horovodrun", "-np", "2", *program])
    args = hl.parse_args()
    assert args.command == program


def test_launcher_runs_from_the_virtualenv_without_activation(tmp_path):
    """`make compare` runs .venv/bin/python without activating the venv: the launcher must
    still find the venv's horovodrun, and a missing launcher is a clear error."""
    import sys
    from launchers.runner import launch_environment, run as run_launcher
    from harness.errors import LaunchError

    env = launch_environment({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    with pytest.raises(LaunchError, match="'no-such-launcher' is not on PATH"):
        run_launcher(["no-such-launcher"])
