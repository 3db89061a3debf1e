"""``harness launch``: build the launcher command for a run and start it (or print it).

    harness launch --launcher horovodrun -np 2 -- --framework torch --model cnn
    harness launch --launcher mpirun -np 4 --bind-to core --dry-run -- --config run.toml
    harness launch --launcher sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-task 1 -- ...
    harness launch --launcher srun -np 8 --print-argv -- ...    # what slurm/common.sh runs
    harness launch --launcher mpirun -np 4 -- --mode async --ps-join ...
    harness join results/my-ps-run      # a worker takes the place of one that failed

Everything after ``--`` goes to ``harness train`` in every rank; it is validated here first, so
a typo fails in a second instead of after N processes have started. Flags are never abbreviated
(horovodrun would read ``--stall`` as an ambiguous flag of its own), and an option of another
launcher (``--time`` with mpirun, ``--bind-to`` with sbatch) is refused, not dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys

from harness.config import add_dataclass_arguments, fields_from_namespace, parse_train_args
from harness.errors import ConfigError
from launchers.builders import build_argv
from launchers.spec import LaunchSpec, check_launch_fits

def add_launch_parser(sub) -> None:
    p = sub.add_parser("launch", help="start a run with horovodrun, mpirun, srun or sbatch",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    add_dataclass_arguments(p, LaunchSpec, "launcher options", {"np": ["-np", "--np"]})
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--print-argv", action="store_true",
                   help="write the command's arguments to stdout, each ended by a NUL byte, and "
                   "run nothing (for scripts: slurm/common.sh reads them with mapfile -d '')")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- followed by `harness train` arguments")
    p.set_defaults(func=cmd_launch)


def spec_from_args(args: argparse.Namespace) -> LaunchSpec:
    given = fields_from_namespace(LaunchSpec, args)
    given.setdefault("python", sys.executable)
    return LaunchSpec.with_defaults(**given)


def cmd_launch(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if getattr(args, "elastic", False) and "--elastic" not in train_args:
        train_args = [*train_args, "--elastic"]     # the ranks' run config is elastic too
    cfg = parse_train_args(train_args)        # fail fast on a bad run config
    launcher = getattr(args, "launcher", "horovodrun")
    if cfg.ps_join and (launcher != "mpirun" or getattr(args, "mpi_flavour", None) == "mpich"):
        raise ConfigError(f"ps_join = true connects jobs through Open MPI's ompi-server: use "
                          f"--launcher mpirun (Open MPI), not {launcher}")
    if cfg.elastic and launcher != "horovodrun":
        raise ConfigError(f"elastic = true runs under horovodrun's elastic mode, not "
                          f"{launcher}: use --launcher horovodrun (on SLURM: "
                          "slurm/elastic.sbatch)")
    if cfg.elastic:
        args.elastic = True
    spec = spec_from_args(args)
    if cfg.mode == "async":        # each rank would say it, inside mpirun's abort notice
        from harness.ps.plan import check_ps_world

        check_ps_world(cfg, spec.np)
    check_launch_fits(cfg, spec)
    if not (args.dry_run or args.print_argv):   # a printed command may be for another machine
        spec.check_local_files()
        if spec.runs_here():
            check_run_files(cfg)
            spec.check_interfaces_here()
        if cfg.mode == "sync" and cfg.allreduce in ("horovod", "auto"):
            # a HOROVOD_* value Horovod would abort on: every rank would refuse it (the ranks
            # get this environment), inside the launcher's abort notice
            from harness.backends.common import horovod_variable_problems

            problems = horovod_variable_problems(os.environ, timeline_here=spec.runs_here())
            if problems:
                _, problem, fix = problems[0]
                raise ConfigError(f"{problem}: {fix}")
    if spec.elastic:
        from launchers import elastic

        if cfg.min_ranks is not None and cfg.min_ranks > spec.np:
            raise ConfigError(f"min_ranks = {cfg.min_ranks} is more than the -np {spec.np} "
                              "ranks the job starts with: start with at least min_ranks")
        if cfg.max_ranks is not None and spec.max_np is not None and \
                cfg.max_ranks != spec.max_np:
            raise ConfigError(f"max_ranks = {cfg.max_ranks} and --max-np {spec.max_np} differ: "
                              "give one of them")
        spec, env = elastic.prepare(spec, cfg.max_ranks)
        os.environ.update(env)               # horovodrun passes it on to the ranks
    if cfg.ps_join and not spec.ompi_server:
        if args.print_argv or args.dry_run:
            spec = dataclasses.replace(spec, ompi_server="OMPI_SERVER_URI")
            print("harness launch: ps_join: an ompi-server is started first; its address "
                  "replaces OMPI_SERVER_URI", file=sys.stderr)
        else:
            from launchers.runner import ompi_server

            with ompi_server() as uri:
                return _run(build_argv(dataclasses.replace(spec, ompi_server=uri), train_args),
                            args)
    return _run(build_argv(spec, train_args), args)


def check_run_files(cfg) -> None:
    """What the ranks (on this machine) would each fail on at once: the task file and the
    built-in models' npz data exist (a task's data_path is its own function's to read)."""
    if cfg.task:
        from harness.task import check_task_file

        check_task_file(cfg.task)
    elif cfg.dataset == "npz" and cfg.data_path:
        from harness.data import check_npz_path

        check_npz_path(cfg.data_path)


def _run(argv: list[str], args: argparse.Namespace) -> int:
    from launchers.runner import run

    if args.print_argv:
        sys.stdout.write("".join(a + "\0" for a in argv))
        return 0
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    print(f"harness launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
    return run(argv)


def add_join_parser(sub) -> None:
    p = sub.add_parser("join", help="start a worker that joins a running parameter-server job "
                       "(ps_join = true) in the place of one that failed",
                       description="Start one worker under mpirun, connected to the job through "
                       "the job's ompi-server; it takes the slot (data shard and clock) of a "
                       "worker that failed and trains it to the end of the plan. Exit 2 when "
                       "no slot is free.", allow_abbrev=False)
    p.add_argument("run_dir", help="the running job's run folder (out_dir/run_name)")
    p.add_argument("--hosts", default=None, help="where to start the worker (mpirun -H), e.g. "
                   "node7:1 (default: here)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the job's servers (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_join)


def cmd_join(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.ps import join

    run_dir = Path(args.run_dir)
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(f"--timeout {args.timeout:g} must be a number of seconds above 0, "
                          "e.g. --timeout 120")
    if args.worker:                        # in the process mpirun started
        return join.main(run_dir, args.timeout)
    join.read_job(run_dir)                 # a bad folder fails here, before mpirun starts
    uri = join.join_dir(run_dir) / "ompi-server.uri"
    given = {"launcher": "mpirun", "np": 1, "python": sys.executable,
             "ompi_server": f"file:{uri.resolve()}"}
    if args.hosts:
        given["hosts"] = args.hosts
    spec = LaunchSpec.with_defaults(**given)
    from launchers.builders import mpirun_argv

    argv = mpirun_argv(spec, [spec.python, "-m", "harness", "join", "--worker", "--timeout",
                              f"{args.timeout:g}", str(run_dir.resolve())])
    args.print_argv = False
    return _run(argv, args)
