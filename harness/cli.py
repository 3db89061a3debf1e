"""``harness``: the command line.

    harness train --framework torch --model cnn --dataset digits [--config run.toml]
    harness launch --launcher horovodrun -np 2 [--dry-run] -- --framework tensorflow ...
    harness compare --frameworks torch,tensorflow --np 1,2 --modes sync,async
    harness report results/run-a results/run-b
    harness doctor
    harness bench allreduce

Errors a user can fix print one line naming the bad value and the fix, and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from harness.config import RunConfig, overrides_from_namespace, train_parser
from harness.errors import HarnessError


def _rank_hint() -> str:
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var]
    return "0"


def cmd_train(args: argparse.Namespace) -> int:
    from harness.train import run

    cfg = RunConfig.load(args.config, overrides_from_namespace(args))
    return run(cfg)


def cmd_models(args: argparse.Namespace) -> int:   # noqa: ARG001
    from models import REGISTRY, get_spec

    for name in REGISTRY:
        spec = get_spec(name)
        print(f"{name:10s} input {str(spec.input_shape):15s} classes {spec.num_classes:5d} "
              f"parameters {spec.num_parameters:>12,d}  forward GFLOP/sample "
              f"{spec.flops_per_sample / 1e9:.4f}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from harness.doctor import main as doctor

    return doctor(require=args.require, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__,
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

    from launchers.cli import add_launch_parser
    add_launch_parser(sub)

    from launchers.compare import add_compare_parser, add_report_parser
    add_compare_parser(sub)
    add_report_parser(sub)

    from bench.cli import add_bench_parser
    add_bench_parser(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    distributed = getattr(args, "distributed", False)
    try:
        code = args.func(args)
    except HarnessError as e:
        print(f"harness: error (rank {_rank_hint()}): {e}", file=sys.stderr, flush=True)
        code = e.exit_code
        if distributed:                  # skip MPI/Horovod teardown: peers may be gone
            sys.stdout.flush()
            os._exit(code)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr, flush=True)
        code = 130
        if distributed:
            os._exit(code)
    except Exception:
        print(f"harness: unexpected error on rank {_rank_hint()}:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
        if distributed:
            sys.stdout.flush()
            os._exit(code)
    if distributed and code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
