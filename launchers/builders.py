"""Pure argv builders: ``LaunchSpec`` + the per-rank program -> the launcher's argv list.

No shell strings anywhere: every value is its own list element, so paths with spaces or quotes
reach the program intact. ``shlex.join`` renders a list for display (``--dry-run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harness.errors import ConfigError
from launchers.spec import LaunchSpec

#: the repository this harness runs from: the sbatch scripts and their common.sh live here
HARNESS_ROOT = Path(__file__).resolve().parents[1]


def _num(x: float) -> str:
    return f"{x:g}"


def rank_program(spec: LaunchSpec, train_args: list[str]) -> list[str]:
    """What every rank runs."""
    return [spec.python, "-m", "harness", "train", *train_args]


def horovodrun_argv(spec: LaunchSpec, program: list[str]) -> list[str]:
    argv = ["horovodrun", "-np", str(spec.np)]
    if spec.elastic:        # launchers/elastic.py has filled these in
        argv += ["--min-np", str(spec.min_np), "--max-np", str(spec.max_np),
                 "--host-discovery-script", str(spec.host_discovery_script)]
        if spec.elastic_timeout is not None:
            argv += ["--elastic-timeout", str(spec.elastic_timeout)]
    if spec.network_interfaces:
        argv += ["--network-interfaces", spec.network_interfaces]
    if spec.hosts:
        argv += ["-H", spec.hosts]
    if spec.hostfile:
        argv += ["--hostfile", spec.hostfile]
    if spec.controller:
        argv.append(f"--{spec.controller}")
    if spec.timeline_filename:
        argv += ["--timeline-filename", spec.timeline_filename]
    if spec.fusion_threshold_mb is not None:
        argv += ["--fusion-threshold-mb", _num(spec.fusion_threshold_mb)]
    if spec.cycle_time_ms is not None:
        argv += ["--cycle-time-ms", _num(spec.cycle_time_ms)]
    if spec.autotune:
        argv.append("--autotune")
    if spec.start_timeout is not None:
        argv += ["--start-timeout", str(spec.start_timeout)]
    # No "--" before the program: horovodrun's Gloo path would run "--" as a command. Its argparse
    # hands every argument after the program to the program, except a flag that abbreviates two
    # of its own options (an error); tests/test_launchers.py keeps train flags clear of those.
    return argv + program


def mpirun_argv(spec: LaunchSpec, program: list[str]) -> list[str]:
    if spec.mpi_flavour == "mpich":
        argv = ["mpirun", "-n", str(spec.np)]
        if spec.hosts:
            argv += ["-hosts", spec.hosts]
        if spec.hostfile:
            argv += ["-f", spec.hostfile]
        if spec.bind_to:
            argv += ["-bind-to", spec.bind_to]
        if spec.map_by:
            argv += ["-map-by", spec.map_by]
        if spec.export:
            argv += ["-genvlist", ",".join(spec.export)]
        return argv + program
    argv = ["mpirun", "-np", str(spec.np)]
    if spec.allow_run_as_root:
        argv.append("--allow-run-as-root")
    if spec.oversubscribe:
        argv.append("--oversubscribe")
    if spec.hosts:
        argv += ["-H", spec.hosts]
    if spec.hostfile:
        argv += ["--hostfile", spec.hostfile]
    if spec.bind_to:
        argv += ["--bind-to", spec.bind_to]
    if spec.map_by:
        argv += ["--map-by", spec.map_by]
    if spec.ompi_server:
        argv += ["--ompi-server", spec.ompi_server]
    for name in spec.export:
        argv += ["-x", name]
    return argv + program


def _slurm_layout(spec: LaunchSpec) -> list[str]:
    argv = []
    if spec.nodes:
        argv.append(f"--nodes={spec.nodes}")
    if spec.ntasks_per_node:
        argv.append(f"--ntasks-per-node={spec.ntasks_per_node}")
    if spec.gpus_per_task is not None:
        argv.append(f"--gpus-per-task={spec.gpus_per_task}")
    if spec.cpus_per_task:
        argv.append(f"--cpus-per-task={spec.cpus_per_task}")
    return argv


def srun_argv(spec: LaunchSpec, program: list[str]) -> list[str]:
    argv = ["srun", f"--mpi={spec.srun_mpi}", f"--ntasks={spec.np}", *_slurm_layout(spec),
            "--kill-on-bad-exit=1"]
    if spec.distribution:
        argv.append(f"--distribution={spec.distribution}")
    if spec.export:
        argv.append("--export=" + ",".join(["ALL", *spec.export]))
    return argv + program


def sbatch_layout(spec: LaunchSpec) -> tuple[int, int]:
    """(nodes, tasks per node) for sbatch. Both always go on the command line: the script's own
    ``#SBATCH --nodes/--ntasks-per-node`` would otherwise still apply (``-np 2`` on 2 nodes)."""
    if spec.nodes and spec.ntasks_per_node:
        return spec.nodes, spec.ntasks_per_node
    if spec.ntasks_per_node:
        return -(-spec.np // spec.ntasks_per_node), spec.ntasks_per_node
    nodes = spec.nodes or 1
    return nodes, -(-spec.np // nodes)      # with --ntasks, a maximum per node


def sbatch_argv(spec: LaunchSpec, train_args: list[str]) -> list[str]:
    """sbatch the script with ``harness train`` arguments; the script launches the ranks with
    ``harness launch --print-argv`` (slurm/common.sh), so its srun/mpirun line comes from the
    builders here as well.

    The script is submitted by absolute path, and HARNESS_ROOT / HARNESS_PYTHON tell it where
    the harness and its interpreter are, so this works from any folder (the job runs there).
    """
    nodes, per_node = sbatch_layout(spec)
    argv = ["sbatch", f"--ntasks={spec.np}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}"]
    if spec.gpus_per_task is not None:
        argv.append(f"--gpus-per-task={spec.gpus_per_task}")
    if spec.cpus_per_task:
        argv.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.time:
        argv.append(f"--time={spec.time}")
    if spec.partition:
        argv.append(f"--partition={spec.partition}")
    if spec.job_name:
        argv.append(f"--job-name={spec.job_name}")
    where = {"HARNESS_ROOT": str(HARNESS_ROOT), "HARNESS_PYTHON": spec.python}
    for name, value in where.items():
        if "," in value:        # sbatch --export splits at commas
            raise ConfigError(f"{name} {value!r} contains a comma, which sbatch --export cannot "
                              "pass: use a path without commas (e.g. a symlink)")
    argv.append("--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in where.items()),
                                         *spec.export]))
    script = spec.script or str(HARNESS_ROOT / "slurm" / "train.sbatch")
    return argv + [script, *train_args]


def local_argv(spec: LaunchSpec, program: list[str]) -> list[str]:
    return list(program)


#: launchers that start the ranks themselves: launcher argv + the program every rank runs
BUILDERS: dict[str, Callable[[LaunchSpec, list[str]], list[str]]] = {
    "horovodrun": horovodrun_argv,
    "mpirun": mpirun_argv,
    "srun": srun_argv,
    "local": local_argv,
}


def build_argv(spec: LaunchSpec, train_args: list[str]) -> list[str]:
    """The full command line for ``spec`` running ``harness train <train_args>``."""
    if spec.launcher == "sbatch":                 # the batch script starts the ranks
        return sbatch_argv(spec, train_args)
    try:
        builder = BUILDERS[spec.launcher]
    except KeyError:
        raise ValueError(f"unknown launcher {spec.launcher!r}: valid launchers are "
                         f"{', '.join([*BUILDERS, 'sbatch'])}") from None
    return builder(spec, rank_program(spec, train_args))
