"""``harness bench NAME``: run a benchmark, print JSON lines (and append them to --out)."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

from bench.common import emit, env_record
from harness.errors import ConfigError

BENCHES = ("allreduce", "allreduce_target", "overhead", "scaling", "async_sync", "fusion",
           "peers", "main_job", "allreduce_flat", "compression", "threads", "paths")


def cmd_bench(args: argparse.Namespace) -> int:
    # all: every benchmark but the slow-link one (root, network namespaces, ~15 minutes)
    names = tuple(b for b in BENCHES if b != "compression") if args.name == "all" \
        else (args.name,)
    runs = [importlib.import_module(f"bench.{name}").run for name in names]
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out!r}: its folder does not exist: create it or give "
                          "a file in an existing folder (the records are appended to it)")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder: give a .jsonl file to append to")
    extra = {}
    if args.launches is not None:
        if args.launches < 1:
            raise ConfigError(f"--launches {args.launches}: give 1 or more")
        takes = [n for n, r in zip(names, runs) if "launches" in inspect.signature(r).parameters]
        if len(takes) != len(names):
            raise ConfigError(f"--launches applies to {', '.join(takes) or 'none of these'}, "
                              f"not to {', '.join(n for n in names if n not in takes)}: "
                              "drop --launches or name one of those")
        extra["launches"] = args.launches
    if args.models:
        takes = [n for n, r in zip(names, runs) if "models" in inspect.signature(r).parameters]
        if len(takes) != len(names):
            raise ConfigError(f"--models applies to {', '.join(takes) or 'none of these'}, "
                              f"not to {', '.join(n for n in names if n not in takes)}: "
                              "drop --models or name one of those")
        extra["models"] = tuple(m for m in args.models.split(",") if m)
        for name in names:          # before any record is written
            plans = getattr(importlib.import_module(f"bench.{name}"), "STEPS", {})
            unknown = [m for m in extra["models"] if m not in plans]
            if unknown or not extra["models"]:
                raise ConfigError(f"--models {args.models!r}: {name} has no step plan for "
                                  f"{unknown[0] if unknown else 'no model'!r}; give "
                                  f"{', '.join(plans)}")
    emit(env_record(stage="before", quick=args.quick), args.out)
    for run in runs:
        run(quick=args.quick, out=args.out, **extra)
    emit(env_record(stage="after"), args.out)
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: allreduce, allreduce_target, overhead, "
                                     "scaling, async_sync, fusion, peers, main_job, "
                                     "allreduce_flat, compression, threads, paths")
    p.add_argument("name", choices=(*BENCHES, "all"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--launches", type=int, metavar="N",
                   help="launches per variant (main_job, overhead, peers, allreduce_flat, "
                        "paths: default 3; compression: default 1; threads: default 5)")
    p.add_argument("--models", metavar="A,B",
                   help="models to time, comma-separated (peers: default resnet20,cnn; the "
                        "gpt: --models gpt)")
    p.set_defaults(func=cmd_bench)
