"""Who am I in the job? Rank and topology from the launcher's environment variables.

One small class per environment, each a variable map (submitit's JobEnvironment idea). Every
source present must agree; a disagreement is an error that says what to change, because it
almost always means a launcher was misconfigured (e.g. a plain ``srun`` without PMI starts N
copies that each believe they are rank 0 of 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from harness.errors import EnvironmentMismatch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    source: str = "single process"

    def gpu(self, gpus: int) -> int:
        """The GPU this rank trains on: one rank per GPU by local rank (``--gpus-per-task 1``
        leaves each rank one visible GPU, so index 0), wrapping round when ranks outnumber
        GPUs."""
        return self.local_rank % gpus


class _Source:
    name = ""
    rank = size = local_rank = local_size = ""

    @classmethod
    def read(cls, env: Mapping[str, str]) -> World | None:
        if cls.rank not in env or cls.size not in env:
            return None
        try:
            rank, size = int(env[cls.rank]), int(env[cls.size])
            local_rank = int(env.get(cls.local_rank, rank)) if cls.local_rank else rank
            local_size = int(env.get(cls.local_size, size)) if cls.local_size else size
        except ValueError:
            raise EnvironmentMismatch(
                f"{cls.name}: {cls.rank}={env.get(cls.rank)!r} / {cls.size}={env.get(cls.size)!r} "
                "are not integers; unset them or launch through the launcher that sets them"
            ) from None
        return World(rank, size, local_rank, local_size, cls.name)


class HorovodSource(_Source):
    """Set by horovodrun (Gloo controller) and elastic runs."""
    name = "horovodrun"
    rank, size = "HOROVOD_RANK", "HOROVOD_SIZE"
    local_rank, local_size = "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"

    @classmethod
    def read(cls, env: Mapping[str, str]) -> World | None:
        w = super().read(env)
        slot = loopback_slot(env)
        return w if w is None or slot is None else \
            World(w.rank, w.size, slot[0], slot[1], w.source)


#: names that all resolve to 127.0.0.1, which horovodrun runs locally (no ssh): an elastic job
#: on one machine gives each local rank its own (launchers/elastic.py), since Horovod's elastic
#: driver blacklists a failed rank's whole host
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "127.1", "127.0.1", "127.0.0.01", "0x7f000001",
                  "0x7f.1", "2130706433")
#: set by ``harness launch --elastic`` on one machine: the local ranks there may be
LOCAL_SLOTS = "HARNESS_ELASTIC_LOCAL_SLOTS"


def loopback_slot(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(local rank, local size) of a rank of a one-machine elastic job, which Horovod counts
    as local rank 0 of 1 on a host of its own: its loopback name's index, and the slots the
    launcher gave the machine (so GPUs and threads are shared out as for any local ranks)."""
    host, slots = env.get("HOROVOD_HOSTNAME"), env.get(LOCAL_SLOTS)
    if env.get("HOROVOD_ELASTIC") != "1" or host not in LOOPBACK_NAMES or not slots:
        return None
    return LOOPBACK_NAMES.index(host), int(slots)


class OpenMPISource(_Source):
    name = "Open MPI"
    rank, size = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"
    local_rank, local_size = "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"


class PMIxSource(_Source):
    """srun --mpi=pmix sets PMIX_RANK; the size comes from SLURM's step variables."""
    name = "PMIx"
    rank, size = "PMIX_RANK", "SLURM_STEP_NUM_TASKS"
    local_rank = "SLURM_LOCALID"


class PMISource(_Source):
    """MPICH / Intel MPI (Hydra) and PMI-2."""
    name = "PMI"
    rank, size = "PMI_RANK", "PMI_SIZE"
    local_rank, local_size = "MPI_LOCALRANKID", "MPI_LOCALNRANKS"


class MVAPICHSource(_Source):
    """MVAPICH2's mpirun_rsh and Hydra."""
    name = "MVAPICH"
    rank, size = "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"
    local_rank, local_size = "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"


class SlurmStepSource(_Source):
    """Only inside an srun step: the batch script's own SLURM_PROCID=0 is not a rank."""
    name = "SLURM step"
    rank, size = "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"
    local_rank = "SLURM_LOCALID"

    @classmethod
    def read(cls, env: Mapping[str, str]) -> World | None:
        if "SLURM_STEP_ID" not in env or env.get("SLURM_STEP_ID") in ("batch", "extern"):
            return None
        world = super().read(env)
        if world is None:
            return None
        tasks_on_node = _slurm_tasks_on_node(env)
        return World(world.rank, world.size, world.local_rank, tasks_on_node or world.size,
                     cls.name)


LAUNCHER_SOURCES = (HorovodSource, OpenMPISource, PMIxSource, PMISource, MVAPICHSource)
#: the sources set by an MPI process manager, which mpi4py's MPI_Init joins
MPI_SOURCES = (OpenMPISource, PMIxSource, PMISource, MVAPICHSource)


def mpi_launched(env: Mapping[str, str] | None = None) -> bool:
    """An MPI process manager started this rank (mpirun, horovodrun on MPI, srun with PMIx,
    Hydra), so mpi4py can connect the ranks; horovodrun on Gloo starts none."""
    env = os.environ if env is None else env
    return any(s.read(env) is not None for s in MPI_SOURCES)


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1"; SLURM_NTASKS_PER_NODE exists only when it
    # was requested, so count from SLURM_STEP_TASKS_PER_NODE and SLURM_NODEID.
    spec, node = env.get("SLURM_STEP_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        if "(x" in part:
            n, rep = part.rstrip(")").split("(x")
            counts += [int(n)] * int(rep)
        else:
            counts.append(int(part))
    node_id = int(node)
    return counts[node_id] if node_id < len(counts) else None


def detect_world(env: Mapping[str, str] | None = None) -> World:
    """The world as the launcher describes it, before any MPI/Horovod init.

    Raises EnvironmentMismatch when sources disagree, or when SLURM started several tasks that no
    MPI process manager connects (a plain ``srun`` without ``--mpi=pmix``).
    """
    env = os.environ if env is None else env
    found = [w for w in (s.read(env) for s in LAUNCHER_SOURCES) if w is not None]
    slurm = SlurmStepSource.read(env)
    for a in found[1:]:
        b = found[0]
        if (a.rank, a.size) != (b.rank, b.size):
            raise EnvironmentMismatch(
                f"{b.source} says rank {b.rank} of {b.size} but {a.source} says rank {a.rank} of "
                f"{a.size}: a launcher was started inside another (e.g. mpirun inside srun, or "
                "horovodrun inside mpirun). Launch once, with one launcher.")
    # With a launcher present, SLURM's step variables may describe the launcher's own daemons
    # (mpirun starts one orted per node through srun), so they are not compared.
    if slurm is not None and not found and slurm.size > 1:
        raise EnvironmentMismatch(
            f"SLURM started {slurm.size} tasks (this is task {slurm.rank}) but no MPI process "
            "manager connects them, so each would train alone as rank 0 of 1. Launch with "
            "`srun --mpi=pmix ...` (check `srun --mpi=list`), or run mpirun/horovodrun from the "
            "batch script instead of srun.")
    if found:
        return found[0]
    if slurm is not None:
        return slurm
    return World(0, 1, 0, 1)


def check_runtime_world(expected: World, rank: int, size: int, runtime: str) -> None:
    """After MPI/Horovod init: the runtime must see the world the launcher described."""
    if (rank, size) != (expected.rank, expected.size):
        if runtime == "mpi" and not mpi_launched(os.environ):
            raise EnvironmentMismatch(
                f"{expected.source} started {expected.size} ranks without an MPI launcher "
                "(horovodrun --gloo, say), so mpi4py, the gradient path of allreduce = 'mpi', "
                "cannot connect them: set allreduce = 'horovod' (or 'auto'), or launch with "
                "mpirun or horovodrun --mpi")
        raise EnvironmentMismatch(
            f"{expected.source} describes rank {expected.rank} of {expected.size}, but {runtime} "
            f"initialised as rank {rank} of {size}. The processes are not connected: under SLURM "
            "use `srun --mpi=pmix`; with Open MPI make sure mpi4py and Horovod were built against "
            "the mpirun on PATH (`harness doctor`)"
            + (", or set allreduce = 'horovod' (Horovod may be built against that MPI)"
               if runtime == "mpi" else "") + ".")


def cores_per_rank(local_size: int, cpu_count: int | None = None) -> int:
    """Compute threads each rank may use without oversubscribing its node."""
    if cpu_count is None:
        try:
            cpu_count = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpu_count = os.cpu_count() or 1
        # A rank bound to a subset of cores (mpirun --bind-to) already sees only its share.
        total = os.cpu_count() or cpu_count
        if cpu_count < total:
            return max(1, cpu_count)
    return max(1, cpu_count // max(1, local_size))
