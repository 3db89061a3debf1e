"""What to launch and how: one dataclass, validated, whose fields are also the CLI flags."""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import option, validate_fields
from harness.errors import ConfigError

LAUNCHERS = ("horovodrun", "mpirun", "srun", "sbatch", "local")


@dataclass(kw_only=True)
class LaunchSpec:
    launcher: str = option("horovodrun", "how to start the ranks", LAUNCHERS)
    np: int = option(2, "number of processes (ranks)", minimum=1)
    hosts: str | None = option(None, "hosts with slots, e.g. node1:2,node2:2")
    hostfile: str | None = option(None, "hostfile (horovodrun/mpirun)")
    controller: str | None = option(None, "horovodrun: Horovod controller", ("gloo", "mpi"))
    timeline_filename: str | None = option(None, "horovodrun: write Horovod's timeline here")
    fusion_threshold_mb: float | None = option(None, "horovodrun: tensor fusion buffer in MiB",
                                               minimum=0.0)
    cycle_time_ms: float | None = option(None, "horovodrun: cycle time in ms", minimum=0.0,
                                         exclusive_min=True)
    autotune: bool = option(False, "horovodrun: let Horovod autotune fusion and cycle time")
    start_timeout: int | None = option(None, "horovodrun: seconds to wait for all ranks",
                                       minimum=1)
    mpi_flavour: str = option("openmpi", "mpirun: Open MPI or MPICH/Intel MPI (Hydra) syntax",
                              ("openmpi", "mpich"))
    bind_to: str | None = option(None, "mpirun: process binding (core, socket, none, ...)")
    map_by: str | None = option(None, "mpirun: process mapping (slot, node, socket, ...)")
    export: list = option([], "environment variables to pass to every rank (mpirun -x, "
                          "srun --export)")
    allow_run_as_root: bool = option(False, "mpirun (Open MPI): allow running as root")
    oversubscribe: bool = option(False, "mpirun (Open MPI): allow more ranks than cores")
    nodes: int | None = option(None, "srun/sbatch: nodes", minimum=1)
    ntasks_per_node: int | None = option(None, "srun/sbatch: tasks per node", minimum=1)
    gpus_per_task: int | None = option(None, "srun/sbatch: GPUs per task", minimum=0)
    cpus_per_task: int | None = option(None, "srun/sbatch: CPUs per task", minimum=1)
    srun_mpi: str = option("pmix", "srun: MPI plugin (pmix works with Open MPI 4)")
    time: str | None = option(None, "sbatch: time limit, e.g. 01:00:00")
    partition: str | None = option(None, "sbatch: partition")
    job_name: str | None = option(None, "sbatch: job name")
    script: str = option("slurm/train.sbatch", "sbatch: the batch script to submit")
    python: str = option("python", "interpreter each rank runs (the harness's virtualenv)")

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.hosts and self.hostfile:
            raise ConfigError("give hosts or hostfile, not both")
        if self.launcher == "local" and self.np != 1:
            raise ConfigError(f"launcher 'local' runs one process, but np = {self.np}: use "
                              "horovodrun or mpirun for several ranks")
        horovodrun_only = {"controller": self.controller,
                           "timeline_filename": self.timeline_filename,
                           "fusion_threshold_mb": self.fusion_threshold_mb,
                           "cycle_time_ms": self.cycle_time_ms, "start_timeout": self.start_timeout}
        if self.launcher != "horovodrun":
            for name, value in horovodrun_only.items():
                if value is not None:
                    raise ConfigError(f"{name} is a horovodrun option; with launcher "
                                      f"{self.launcher!r} set the matching run-config key (e.g. "
                                      "--fusion-threshold-mb after --) instead")
        if self.launcher in ("srun", "sbatch") and (self.hosts or self.hostfile):
            raise ConfigError(f"{self.launcher} takes its hosts from SLURM: drop hosts/hostfile "
                              "and use nodes/ntasks_per_node")
        if self.nodes and self.ntasks_per_node and self.nodes * self.ntasks_per_node != self.np:
            raise ConfigError(f"np = {self.np} but nodes x ntasks_per_node = "
                              f"{self.nodes} x {self.ntasks_per_node} = "
                              f"{self.nodes * self.ntasks_per_node}: make them agree")
