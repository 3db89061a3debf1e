"""What to launch and how: one dataclass, validated, whose fields are also the CLI flags.

Each launcher-specific field says which launchers read it (``LAUNCHER_OPTIONS``); giving it to
another launcher is refused, because that launcher would silently drop it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from harness.backends.common import HOROVOD_TUNING
from harness.config import RunConfig, option, validate_fields
from harness.errors import ConfigError

LAUNCHERS = ("horovodrun", "mpirun", "srun", "sbatch", "local")
#: what mpirun/srun pass to every rank unless told otherwise: this Python and its libraries
DEFAULT_EXPORTS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")


def _opt(default: Any, help: str, launchers: tuple[str, ...] = LAUNCHERS, **kw: Any) -> Any:
    """``option()`` plus the launchers that read the field; their names start the help text."""
    base = option(default, help if launchers == LAUNCHERS else f"{'/'.join(launchers)}: {help}",
                  **kw)
    meta = {**base.metadata, "launchers": launchers}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


HVD, MPI, SLURM = ("horovodrun",), ("mpirun",), ("srun", "sbatch")


@dataclass(kw_only=True)
class LaunchSpec:
    launcher: str = _opt("horovodrun", "how to start the ranks", choices=LAUNCHERS)
    np: int = _opt(2, "number of processes (ranks)", minimum=1)
    hosts: str | None = _opt(None, "hosts with slots, e.g. node1:2,node2:2", HVD + MPI)
    hostfile: str | None = _opt(None, "hostfile", HVD + MPI)
    controller: str | None = _opt(None, "Horovod controller", HVD, choices=("gloo", "mpi"))
    timeline_filename: str | None = _opt(None, "write Horovod's timeline here", HVD)
    fusion_threshold_mb: float | None = _opt(None, "tensor fusion buffer in MiB", HVD,
                                             minimum=0.0)
    cycle_time_ms: float | None = _opt(None, "cycle time in ms", HVD, minimum=0.0,
                                       exclusive_min=True)
    autotune: bool = _opt(False, "let Horovod autotune fusion and cycle time", HVD)
    start_timeout: int | None = _opt(None, "seconds to wait for all ranks", HVD, minimum=1)
    network_interfaces: str | None = _opt(None, "network interfaces Horovod uses, e.g. eth0 "
                                          "or lo (elastic on one machine: lo)", HVD)
    elastic: bool = _opt(False, "elastic training (docs/elastic.md): ranks may be lost and "
                         "hosts added while the job runs; implied by the run config's "
                         "elastic = true", HVD)
    min_np: int | None = _opt(None, "elastic: the fewest ranks horovodrun restarts the job "
                              "with (default 1; the run config's min_ranks stops the job "
                              "with a checkpoint below its own minimum)", HVD, minimum=1)
    max_np: int | None = _opt(None, "elastic: the most ranks (default: the run config's "
                              "max_ranks, else np)", HVD, minimum=1)
    host_discovery_script: str | None = _opt(None, "elastic: your executable that prints the "
                                             "available hosts, one host:slots a line "
                                             "(default: one the launcher writes, reading "
                                             "hosts_file)", HVD)
    hosts_file: str | None = _opt(None, "elastic: the file the written discovery script reads, "
                                  "one host:slots a line; edit it to add or remove hosts "
                                  "(default: a new one from hosts/hostfile, else one local "
                                  "slot per rank, in a temp folder)", HVD)
    elastic_timeout: int | None = _opt(None, "elastic: seconds to wait for min_np ranks after "
                                       "a reset (Horovod's default: 600)", HVD, minimum=1)
    mpi_flavour: str = _opt("openmpi", "Open MPI or MPICH/Intel MPI (Hydra) syntax", MPI,
                            choices=("openmpi", "mpich"))
    bind_to: str | None = _opt(None, "process binding (core, socket, none, ...)", MPI)
    map_by: str | None = _opt(None, "process mapping (slot, node, socket, ...)", MPI)
    export: list = _opt([], "environment variables to pass to every rank (mpirun -x, "
                        "srun/sbatch --export), besides those mpirun and srun pass by default "
                        "(PATH, LD_LIBRARY_PATH, PYTHONPATH, VIRTUAL_ENV and the HOROVOD_* "
                        "settings that are set)", MPI + SLURM)
    ompi_server: str | None = _opt(None, "(Open MPI) the ompi-server that connects this job "
                                   "with others: its URI, or file:URI_FILE (a ps_join run: "
                                   "started for you)", MPI)
    allow_run_as_root: bool = _opt(False, "(Open MPI) allow running as root", MPI)
    oversubscribe: bool = _opt(False, "(Open MPI) allow more ranks than cores", MPI)
    nodes: int | None = _opt(None, "nodes (sbatch default: 1, or np / ntasks_per_node)", SLURM,
                             minimum=1)
    ntasks_per_node: int | None = _opt(None, "tasks per node (sbatch default: np / nodes)",
                                       SLURM, minimum=1)
    gpus_per_task: int | None = _opt(None, "GPUs per task (sbatch default: the script's, 1 in "
                                     "train.sbatch)", SLURM, minimum=0)
    cpus_per_task: int | None = _opt(None, "CPUs per task (sbatch default: the script's)", SLURM,
                                     minimum=1)
    srun_mpi: str = _opt("pmix", "MPI plugin (pmix works with Open MPI 4)", ("srun",))
    distribution: str | None = _opt(None, "how tasks are laid out over nodes (block: "
                                    "consecutive ranks share a node)", ("srun",),
                                    choices=("block", "cyclic", "plane", "arbitrary"))
    time: str | None = _opt(None, "time limit, e.g. 01:00:00", ("sbatch",))
    partition: str | None = _opt(None, "partition", ("sbatch",))
    job_name: str | None = _opt(None, "job name", ("sbatch",))
    script: str | None = _opt(None, "the batch script to submit (default: this harness's "
                              "slurm/train.sbatch)", ("sbatch",))
    python: str = _opt("python", "interpreter each rank runs (the harness's virtualenv)")

    @classmethod
    def with_defaults(cls, **given: Any) -> "LaunchSpec":
        """A spec with this machine's defaults for what ``given`` leaves out: Open MPI as root
        needs ``--allow-run-as-root``; more ranks than cores on one host (no hosts, no
        SLURM allocation) need ``--oversubscribe``; mpirun and srun pass the environment
        variables that find this Python and its libraries (``DEFAULT_EXPORTS``) and the
        Horovod settings that are set."""
        if "np" not in given and given.get("nodes") and given.get("ntasks_per_node"):
            given["np"] = given["nodes"] * given["ntasks_per_node"]    # SLURM's own count
        launcher, np_ = given.get("launcher", "horovodrun"), given.get("np", 2)
        if launcher == "mpirun":
            given.setdefault("allow_run_as_root", os.geteuid() == 0)
            one_host = not (given.get("hosts") or given.get("hostfile") or
                            os.environ.get("SLURM_JOB_ID"))
            given.setdefault("oversubscribe", one_host and np_ > (os.cpu_count() or 1))
        if launcher in ("mpirun", "srun"):
            # the Horovod settings too: allreduce = 'auto' reads them on every rank, and a
            # multi-host mpirun forwards only what -x names
            # added to, not replaced by, the variables the user names (--export)
            defaults = [v for v in (*DEFAULT_EXPORTS, *HOROVOD_TUNING) if v in os.environ]
            named = {e.split("=", 1)[0] for e in given.get("export", [])}
            given["export"] = [*given.get("export", []), *(v for v in defaults if v not in named)]
        return cls(**given)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.ompi_server and self.mpi_flavour == "mpich":
            raise ConfigError("--ompi-server is Open MPI's: drop it, or use mpi_flavour "
                              "openmpi")
        if self.hosts and self.hostfile:
            raise ConfigError("give hosts or hostfile, not both")
        if self.launcher == "local" and self.np != 1:
            raise ConfigError(f"launcher 'local' runs one process, but np = {self.np}: use "
                              "horovodrun or mpirun for several ranks")
        if self.launcher in SLURM and (self.hosts or self.hostfile):
            raise ConfigError(f"{self.launcher} takes its hosts from SLURM: drop hosts/hostfile "
                              "and use nodes/ntasks_per_node")
        self._refuse_options_of_other_launchers()
        if self.hosts:
            self._check_hosts(self.hosts)
        if self.nodes and self.ntasks_per_node and self.nodes * self.ntasks_per_node != self.np:
            raise ConfigError(f"np = {self.np} but nodes x ntasks_per_node = "
                              f"{self.nodes} x {self.ntasks_per_node} = "
                              f"{self.nodes * self.ntasks_per_node}: make them agree")
        lo, hi = self.min_np, self.max_np
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"min_np = {lo} is more than max_np = {hi}: set --min-np at most "
                              f"--max-np")
        if lo is not None and lo > self.np:
            raise ConfigError(f"np = {self.np} is below --min-np {lo}: start with at least "
                              f"{lo} ranks, or lower --min-np")
        if hi is not None and hi < self.np:
            raise ConfigError(f"np = {self.np} is above --max-np {hi}: start with at most "
                              f"{hi} ranks, or raise --max-np")
        elastic_only = [n for n in ("min_np", "max_np", "host_discovery_script", "hosts_file",
                                    "elastic_timeout") if getattr(self, n) is not None]
        if elastic_only and not self.elastic:
            flag = "--" + elastic_only[0].replace("_", "-")
            raise ConfigError(f"{flag} is an elastic option: add --elastic, or drop {flag}")
        if self.elastic and self.controller == "mpi":
            raise ConfigError("elastic runs need horovodrun's Gloo controller: drop "
                              "--controller mpi")
        if self.host_discovery_script and (self.hosts_file or self.hosts or self.hostfile):
            raise ConfigError("--host-discovery-script lists the hosts itself: drop "
                              "--hosts-file/--hosts/--hostfile")
        if self.nodes and self.nodes > self.np:
            raise ConfigError(f"nodes = {self.nodes} is more than the np = {self.np} ranks: ask "
                              f"for at most {self.np} nodes, or more ranks")

    def _check_hosts(self, hosts: str) -> None:
        """``host:slots,...`` (mpirun also takes a bare host: one slot), slots at least 1."""
        if any(c.isspace() for c in hosts):
            raise ConfigError(f"hosts = {hosts!r} holds spaces, which the launcher would keep "
                              "in the host names: write e.g. node1:2,node2:2")
        for item in hosts.split(","):
            host, sep, slots = item.partition(":")
            bare_ok = self.launcher != "horovodrun"
            if host and ((not sep and bare_ok) or (slots.isdigit() and int(slots) >= 1)):
                continue
            form = "HOST:SLOTS" if not bare_ok else "HOST or HOST:SLOTS"
            raise ConfigError(f"hosts = {hosts!r}: {item!r} is not {form} with at least 1 "
                              "slot: write e.g. node1:2,node2:2")

    def runs_here(self) -> bool:
        """Every rank starts on this machine: no SLURM, and no host but this one."""
        import socket

        if self.launcher in SLURM or self.hostfile:
            return False
        here = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
        return all(item.partition(":")[0] in here for item in (self.hosts or "").split(",")
                   if item)

    def check_local_files(self) -> None:
        """What must exist on this machine before a launcher starts: the hostfile, and the
        interpreter of a launcher that starts its ranks from here (SLURM's run on its nodes)."""
        import shutil
        from pathlib import Path

        if self.hostfile and not Path(self.hostfile).is_file():
            what = "is a folder" if Path(self.hostfile).is_dir() else "does not exist"
            raise ConfigError(f"hostfile {self.hostfile!r} {what}: give the path of a file "
                              "with one 'host slots=N' line per host, or use --hosts")
        if self.launcher in SLURM:
            return
        if shutil.which(self.python) is None:
            raise ConfigError(f"python {self.python!r} is not an executable on this machine: "
                              "give the interpreter of the harness's virtualenv (the default "
                              "is the one running this command)")

    def check_interfaces_here(self) -> None:
        """``--network-interfaces`` of a job whose ranks all start on this machine names an
        interface it has: horovodrun uses those of the names that exist, and with none it ends
        in a traceback of its own."""
        import socket

        if self.network_interfaces is None:
            return
        have = [name for _, name in socket.if_nameindex()]
        names = [n for n in self.network_interfaces.split(",") if n]
        if not set(names) & set(have):
            given = ", ".join(map(repr, names)) or "no name"
            raise ConfigError(f"--network-interfaces {self.network_interfaces!r} gives {given}, "
                              f"and this machine has no such interface; it has "
                              f"{', '.join(have)}: name those the ranks should use")

    def _refuse_options_of_other_launchers(self) -> None:
        """An option the chosen launcher does not read would be dropped without a word."""
        for f in fields(self):
            readers = f.metadata.get("launchers", LAUNCHERS)
            if self.launcher in readers:
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            if getattr(self, f.name) == default:
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = {"fusion_threshold_mb": "--fusion-threshold-mb after --",
                    "cycle_time_ms": "--cycle-time-ms after --",
                    "timeline_filename": "--horovod-timeline after --"}.get(f.name)
            fix = f"set the run-config key instead ({hint})" if hint else \
                f"drop it, or use --launcher {' or '.join(readers)}"
            raise ConfigError(f"{f.name} ({flag}) is {'an' if readers[0][0] in 'ms' else 'a'} "
                              f"{'/'.join(readers)} option; launcher {self.launcher!r} would "
                              f"ignore it: {fix}")


def check_launch_fits(cfg: RunConfig, spec: LaunchSpec) -> None:
    """What every rank of a sync or async run would refuse once started (each inside the
    launcher's abort notice), refused once before the launch (``harness launch``, ``compare``)."""
    gloo = spec.launcher == "horovodrun" and spec.controller == "gloo" and spec.np > 1
    workers = spec.np - (cfg.ps_servers if cfg.mode == "async" else 0)
    if workers >= 1 and not cfg.elastic:   # an elastic run keeps its starting ranks' batch
        cfg.per_rank_batch(workers)          # global_batch_size divides among the workers
    if cfg.mode == "async":
        if gloo:
            raise ConfigError("mode = 'async' runs its parameter servers on MPI (mpi4py), but "
                              "--controller gloo starts the ranks without it: drop --controller "
                              "gloo, or use --launcher mpirun")
        return
    if cfg.allreduce == "local" and spec.np > 1:
        raise ConfigError(f"allreduce = 'local' trains one process, but this launch starts "
                          f"{spec.np}: use allreduce = 'auto', 'horovod' or 'mpi', or -np 1")
    if cfg.allreduce == "mpi" and gloo:
        raise ConfigError("allreduce = 'mpi' reduces with mpi4py, but --controller gloo starts "
                          "the ranks without MPI: drop --controller gloo, use --launcher "
                          "mpirun, or set allreduce = 'horovod' (or 'auto')")
