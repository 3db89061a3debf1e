"""Rank and topology detection from launcher variables."""

import os

import pytest

from harness.env import World, check_runtime_world, cores_per_rank, detect_world, mpi_launched
from harness.errors import EnvironmentMismatch


def test_single_process_default():
    assert detect_world({}) == World(0, 1, 0, 1)


def test_each_local_rank_gets_its_own_gpu():
    """One rank per GPU by local rank, wrapping round (tests/test_gpu.py runs it on a GPU)."""
    assert [World(r, 8, r % 4, 4).gpu(4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [World(0, 3, r, 3).gpu(2) for r in range(3)] == [0, 1, 0]
    assert World(5, 8, 1, 4).gpu(1) == 0          # --gpus-per-task 1: the one visible GPU


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    w = detect_world(env)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.source) == (3, 4, 1, 2, "Open MPI")


def test_mvapich():
    """MVAPICH2's launchers: without this source its N ranks each looked like rank 0 of 1,
    which allreduce = auto trains on the local path, unconnected."""
    env = {"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2",
           "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_LOCAL_SIZE": "2"}
    w = detect_world(env)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.source) == (1, 2, 1, 2, "MVAPICH")
    assert mpi_launched(env) and not mpi_launched({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"})


def test_horovodrun_gloo():
    env = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1",
           "HOROVOD_LOCAL_SIZE": "2"}
    assert detect_world(env).source == "horovodrun"


def test_srun_pmix_agrees_with_slurm():
    env = {"PMIX_RANK": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0",
           "SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    w = detect_world(env)
    assert (w.rank, w.size, w.local_rank) == (2, 4, 0)


def test_plain_srun_without_pmi_is_refused():
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
    with pytest.raises(EnvironmentMismatch, match="srun --mpi=pmix"):
        detect_world(env)


def test_batch_script_slurm_vars_are_not_a_rank():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"}
    assert detect_world(env) == World(0, 1, 0, 1)


def test_disagreeing_launchers_are_refused():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
           "HOROVOD_RANK": "1", "HOROVOD_SIZE": "4"}
    with pytest.raises(EnvironmentMismatch, match="Launch once, with one launcher"):
        detect_world(env)


def test_runtime_must_match_launcher(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(EnvironmentMismatch, match="not connected") as e:
        check_runtime_world(World(1, 2, 1, 2, "Open MPI"), 0, 1, "horovod")
    assert "allreduce = 'horovod'" not in str(e.value)
    # mpi4py built against another MPI than the launcher's: Horovod may still connect
    with pytest.raises(EnvironmentMismatch, match="or set allreduce = 'horovod'"):
        check_runtime_world(World(1, 2, 1, 2, "Open MPI"), 0, 1, "mpi")
    # found by a new-user hunt: horovodrun --gloo with allreduce = 'mpi' was told to look at
    # SLURM and the MPI builds
    for name in [n for n in os.environ if n.startswith(("OMPI_", "PMI", "PMIX_", "MV2_"))]:
        monkeypatch.delenv(name)
    with pytest.raises(EnvironmentMismatch, match=r"horovodrun started 2 ranks without an MPI "
                       r"launcher .* set allreduce = 'horovod' \(or 'auto'\)"):
        check_runtime_world(World(1, 2, 1, 2, "horovodrun"), 0, 1, "mpi")


def test_threads_split_cores_between_local_ranks():
    assert cores_per_rank(2, cpu_count=8) == 4
    assert cores_per_rank(16, cpu_count=8) == 1
