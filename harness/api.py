"""The harness as a library: ``harness.run(task)`` from a user's own training script.

    import harness
    task = harness.Task(framework="torch", model=..., loss=..., data=...)
    if __name__ == "__main__":
        sys.exit(harness.run(task, {"epochs": 5, "lr": 0.01}))

Launch the script like any Horovod script (``horovodrun -np 2 python my_script.py``, ``srun``,
``mpirun``): each rank calls ``run``, which does what ``harness train --task`` does.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from harness.errors import ConfigError, HarnessError


def rank_hint() -> str:
    """This process's rank as the launcher set it (before any runtime starts)."""
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var]
    return "0"


def script_name() -> str:
    """How the user started this script, for its ``--help`` (``python my_script.py``)."""
    return f"python {Path(sys.argv[0]).name}" if sys.argv and sys.argv[0] else "harness.run"


def guarded(fn: Callable[[], int], distributed: bool, is_rank: bool = True) -> int:
    """Run ``fn``: a HarnessError prints one line, any other error (the user's code, or ours)
    its traceback; both name the rank where ``fn`` runs as a rank of a job (training, a
    parameter-server worker), not for the commands around it (report, compare). A distributed
    rank that fails exits at once, skipping MPI/Horovod teardown, which would wait for peers
    that may be gone."""
    rank = rank_hint() if is_rank else None
    try:
        code = fn()
    except HarnessError as e:
        where = f" (rank {rank})" if rank else ""
        if not getattr(e, "quiet", False):
            # one write with its newline: print writes the text and the newline apart, and
            # mpirun then glued two ranks' lines into one
            sys.stderr.write(f"harness: error{where}: {e}\n")
            sys.stderr.flush()
        code = e.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception:
        print(f"harness: unexpected error{f' on rank {rank}' if rank else ''}:", file=sys.stderr)
        traceback.print_exc()
        code = 1
    if distributed and code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(task: Any, config: Any = None, argv: list[str] | None = None, **overrides: Any) -> int:
    """Train ``task`` (a Task, a Tasks pair, or a function of the config returning one) on this
    rank, with ``config``: a TOML path, a dict of run-config keys, a RunConfig, or None. Then
    ``argv`` (``harness train`` flags, e.g. the script's ``sys.argv[1:]``) and ``overrides``
    (more keys) replace its values. Returns the exit code: 0, 2 after a bad value (one line
    printed, as ``harness train`` does), 75 after a checkpointed stop for requeue. In a job of
    several ranks a non-zero code ends the process at once instead (``os._exit``): MPI and
    Horovod teardown would wait for peers that may be gone."""
    from harness.env import detect_world

    def go() -> int:
        from harness.config import RunConfig, overrides_from_namespace, read_toml, train_parser
        from harness.task import configure
        from harness.train import run as train_run

        if task is None:
            raise ConfigError("harness.run(task, ...): task is None: give a Task, a Tasks pair "
                              "or a function of the config that returns one (a PATH.py:NAME "
                              "task is for `harness train --task`)")
        values: dict[str, Any] = {}
        if isinstance(config, RunConfig):       # the values it sets (its defaults are not set)
            default = RunConfig().to_dict()
            values.update({k: v for k, v in config.to_dict().items() if v != default[k]})
        elif isinstance(config, (str, Path)):
            values.update(read_toml(config))
        elif isinstance(config, dict):
            values.update(config)
        elif config is not None:
            raise HarnessError(f"harness.run(task, config): config is a "
                               f"{type(config).__name__}; give a TOML path, a dict or a "
                               "RunConfig")
        if argv:
            try:
                ns = train_parser(prog=script_name()).parse_args(argv)
            except SystemExit as e:        # --help: printed
                return int(e.code or 0)
            values.update(read_toml(ns.config) if ns.config else {})
            values.update(overrides_from_namespace(ns))
        values.update(overrides)
        cfg, resolved = configure(task, values, "harness.run(task)", "harness.run()")
        return train_run(cfg, resolved)

    def restoring_environment() -> int:
        # the run exports its settings (threads, HOROVOD_*, MPI's wait policy) for the
        # frameworks it starts; a later run in this process must not inherit them (a
        # HOROVOD_* setting would take the next run's `allreduce = "auto"` onto Horovod)
        before = dict(os.environ)
        try:
            return go()
        finally:
            for key in set(os.environ) - set(before):
                del os.environ[key]
            os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})

    return guarded(restoring_environment, distributed=detect_world().size > 1)


def probe_task(framework: str, train_args: list[str]) -> int:
    """In a process of its own (``harness compare``'s check, harness/task.py): load the task
    of ``train_args`` for ``framework`` as its run would (the user's module and task function
    run; no model is built). Exit 0, else the error's exit code (one line for a HarnessError,
    the traceback for the user's own code)."""
    def go() -> int:
        import json

        from harness.config import overrides_from_namespace, read_toml, train_parser
        from harness.task import FrameworkMismatch, configure

        ns = train_parser().parse_args([*train_args, "--framework", framework])
        values = {**(read_toml(ns.config) if ns.config else {}), **overrides_from_namespace(ns)}
        try:
            configure(None, values, values["task"])
        except FrameworkMismatch as e:           # compare says it with its own fix
            print(json.dumps({"mismatch": e.reason, "have": e.have}), flush=True)
            return 2
        return 0

    return guarded(go, distributed=False, is_rank=False)

