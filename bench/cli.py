"""``harness bench NAME``: run a benchmark, print JSON lines (and append them to --out)."""

from __future__ import annotations

import argparse
import importlib

from bench.common import emit, env_record

BENCHES = ("allreduce", "allreduce_target", "overhead", "scaling", "async_sync", "fusion",
           "peers", "main_job", "allreduce_flat")


def cmd_bench(args: argparse.Namespace) -> int:
    names = BENCHES if args.name == "all" else (args.name,)
    emit(env_record(stage="before", quick=args.quick), args.out)
    for name in names:
        importlib.import_module(f"bench.{name}").run(quick=args.quick, out=args.out)
    emit(env_record(stage="after"), args.out)
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: allreduce, allreduce_target, overhead, "
                                     "scaling, async_sync, fusion, peers, main_job, "
                                     "allreduce_flat")
    p.add_argument("name", choices=(*BENCHES, "all"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.set_defaults(func=cmd_bench)
