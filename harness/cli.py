"""``harness``: the command line.

    harness train --framework torch --model cnn --dataset digits [--config run.toml]
    harness train --task examples/torch_own_model.py:task
    harness launch --launcher horovodrun -np 2 [--dry-run] -- --framework tensorflow ...
    harness compare --frameworks torch,tensorflow --np 1,2 --modes sync,async
    harness report results/run-a results/run-b
    harness join results/my-ps-run
    harness doctor
    harness bench allreduce

Errors a user can fix print one line naming the bad value and the fix, and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys

from harness.api import guarded
from harness.config import HarnessParser, RunConfig, overrides_from_namespace, train_parser


def cmd_train(args: argparse.Namespace) -> int:
    from harness.config import read_toml
    from harness.task import configure
    from harness.train import run

    values = {**(read_toml(args.config) if args.config else {}), **overrides_from_namespace(args)}
    if values.get("task") is None:
        return run(RunConfig.from_dict(values))
    cfg, task = configure(None, values, values["task"])
    return run(cfg, task)


def cmd_models(args: argparse.Namespace) -> int:   # noqa: ARG001
    from models import REGISTRY, get_spec

    for name in REGISTRY:
        spec = get_spec(name)
        per_token = (f"  {spec.flops_per_sample / spec.tokens_per_sample / 1e6:.3f} "
                     "MFLOP/token") if spec.tokens_per_sample else ""
        print(f"{name:10s} input {str(spec.input_shape):15s} classes {spec.num_classes:5d} "
              f"parameters {spec.num_parameters:>12,d}  forward GFLOP/sample "
              f"{spec.flops_per_sample / 1e9:.4f}{per_token}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.doctor import main as doctor

    return doctor(require=args.require, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = HarnessParser(prog="harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one run (one rank; run it under a launcher for more)")
    train_parser(p)
    p.set_defaults(func=cmd_train, distributed=True)

    p = sub.add_parser("models", help="list models with parameter counts and FLOPs")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("doctor", help="check the environment and report problems with fixes")
    p.add_argument("--require", default="torch,tensorflow,horovod,mpi4py",
                   help="comma-separated components that must work (default: %(default)s); "
                        "from torch, tensorflow, horovod, mpi4py, gloo, mpi, nccl, slurm, gpu")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=cmd_doctor)

    from launchers.cli import add_join_parser, add_launch_parser
    add_launch_parser(sub)
    add_join_parser(sub)

    from launchers.compare import add_compare_parser, add_report_parser
    add_compare_parser(sub)
    add_report_parser(sub)

    from bench.cli import add_bench_parser
    add_bench_parser(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:        # an unknown flag of the command: its own parser names the closest one
        commands = next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    # a rank of a job (train, or the worker `harness join` starts) exits at once on an error
    distributed = getattr(args, "distributed", False) or getattr(args, "worker", False)
    return guarded(lambda: args.func(args), distributed, is_rank=distributed)


if __name__ == "__main__":
    sys.exit(main())
