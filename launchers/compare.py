"""``harness compare`` and ``harness report``.

    harness compare --config configs/compare_digits.toml --frameworks torch,tensorflow \\
        --np 1,2 --modes sync,async
    harness report results/compare-*/torch-sync-np2 results/compare-*/tensorflow-sync-np2

``compare`` runs every combination of the same model, data, seed and hyperparameters, each in
its own processes through the launchers, then writes ``report.md`` with figures next to the runs.
For ``async`` the ``--np`` value counts workers; the job gets ``ps_servers`` more ranks.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.config import parse_train_args
from harness.errors import ConfigError, HarnessError
from harness.preemption import EXIT_PREEMPTED, StopFlag


@dataclass
class Job:
    name: str
    argv: list[str]


def _csv(value: str, valid: tuple[str, ...] | None, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty: give a comma-separated list")
    if valid:
        bad = [v for v in items if v not in valid]
        if bad:
            raise ConfigError(f"--{what}: {', '.join(bad)} not in {', '.join(valid)}")
    _refuse_duplicates(items, value, what)
    return items


def _refuse_duplicates(items: list, value: str, what: str) -> None:
    """Each value once: a repeated one would plan the same run (same folder) twice."""
    seen: list = []
    for v in items:
        if v in seen:
            once = ",".join(str(u) for u in dict.fromkeys(items))
            raise ConfigError(f"--{what} {value!r} lists {v} twice, which would plan the same "
                              f"run twice: list each value once, e.g. --{what} {once}")
        seen.append(v)


def compression_settings(value: str | None) -> list[tuple[str, list[str]]]:
    """``--compression none,topk,randomk:0.25,powersgd:2,local:8,local:16:2`` as (run-name
    suffix, train flags): a method, with its ratio (topk, randomk) or rank (powersgd) after a
    colon; or local SGD with its period, and for post-local SGD the dense epochs before it."""
    from harness.compress import METHODS

    if value is None:
        return [("", [])]
    out = []
    for item in _csv(value, None, "compression"):
        method, _, setting = item.partition(":")
        if method == "local":
            period, _, start = setting.partition(":")
            if not (period.isdecimal() and period.isascii() and int(period) >= 1):
                raise ConfigError(f"--compression {item!r}: local SGD takes its period, a "
                                  "whole number of steps of at least 1, e.g. local:8 (and "
                                  "local:16:2 for 2 dense epochs first)")
            start = start or "0"
            out.append((f"-local-{period}" + (f"-{start}" if start != "0" else ""),
                        ["--compression", "none", "--local-sgd-period", period,
                         "--local-sgd-start-epoch", start]))
            continue
        if method not in METHODS:
            raise ConfigError(f"--compression: {method!r} is not one of "
                              f"{', '.join(METHODS)}, local")
        flags = ["--compression", method]
        if setting:
            if method in ("topk", "randomk"):
                flags += ["--compression-ratio", setting]
            elif method == "powersgd":
                flags += ["--powersgd-rank", setting]
            else:
                raise ConfigError(f"--compression {item!r}: only topk/randomk (a ratio) and "
                                  "powersgd (a rank) take a setting after ':'")
        out.append((f"-{method}" + (f"-{setting}" if setting else ""), flags))
    return out


#: ``harness train`` flags that compare sets for each run itself, and what to do instead
OWN_FLAGS = {"--framework": "list frameworks with --frameworks",
             "--mode": "list modes with --modes",
             "--out-dir": "give --out-dir before --",
             "--run-name": "drop it (runs are named framework-mode-npN)",
             "--resume": "compare's --resume (before --) continues a comparison: drop it"}


def refuse_own_flags(train_args: list[str]) -> None:
    """A flag after ``--`` that compare sets for each run would lose silently to its own."""
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise ConfigError(f"{arg} after --: compare sets {flag} for each run itself; "
                              f"{OWN_FLAGS[flag]}")


#: run-config keys that compare sets for each run itself, as the flags in OWN_FLAGS
OWN_KEYS = {"framework": "it runs each of --frameworks", "mode": "it runs each of --modes",
            "out_dir": "its runs go to {out_dir} (--out-dir)",
            "run_name": "runs are named framework-mode-npN",
            "resume": "compare's --resume continues a comparison"}


def unused_config_keys(train_args: list[str], used: dict[str, list]) -> list[str]:
    """A notice for each key of the ``--config`` file that compare sets for each run itself to
    other values (``used``: the values compare gives each key): a config shared with
    ``harness train`` may hold them, but compare does not use them."""
    from harness.config import read_toml

    paths = [a.split("=", 1)[1] if a.startswith("--config=") else b
             for a, b in zip(train_args, [*train_args[1:], ""])
             if a.startswith("--config=") or a == "--config"]
    if not paths:
        return []
    data = read_toml(paths[-1])         # as harness train reads it: the last --config

    def same(key: str) -> bool:
        text = os.path.abspath if key == "out_dir" else str
        return [text(v) for v in used.get(key, [])] == [text(data[key])]

    return [f"the config's {key} = {data[key]!r} is not used: "
            f"{why.format(out_dir=used['out_dir'][0])}"
            for key, why in OWN_KEYS.items() if key in data and not same(key)]


def plan(train_args: list[str], frameworks: list[str], nps: list[int], modes: list[str],
         launcher: str, out_dir: Path, python: str, resume: bool = False,
         compressions: str | None = None) -> list[Job]:
    """The jobs of a comparison, as launcher argv lists (pure: nothing runs). ``resume``: runs
    continue their own folders (a finished one is left as it is), else they must be new.
    ``compressions``: the ``--compression`` axis (None: the config's own)."""
    from launchers.builders import build_argv
    from launchers.spec import LaunchSpec, check_launch_fits

    refuse_own_flags(train_args)
    cfg = parse_train_args(train_args)
    jobs: list[Job] = []
    planned: dict[tuple, str] = {}      # what each run trains with -> its --compression item
    for mode, fw, n, (suffix, flags) in itertools.product(
            modes, frameworks, nps, compression_settings(compressions)):
        ranks = n + (cfg.ps_servers if mode == "async" else 0)
        name = (f"{fw}-{mode}-np{n}" if mode == "sync" else f"{fw}-ps-{n}w") + suffix
        args = [*train_args, *flags, "--framework", fw, "--mode", mode, "--out-dir",
                str(out_dir), "--run-name", name, "--resume", "auto" if resume else "never"]
        run_cfg = parse_train_args(args)       # each combination is valid (one-line error)
        same = (mode, fw, n, run_cfg.compression, run_cfg.local_sgd_period,
                run_cfg.local_sgd_start_epoch,
                run_cfg.compression_ratio if run_cfg.compression in ("topk", "randomk") else None,
                run_cfg.powersgd_rank if run_cfg.compression == "powersgd" else None)
        item = suffix.lstrip("-").replace("-", ":") or "the config's own"
        if same in planned and planned[same] != item:
            raise ConfigError(f"--compression: {planned[same]} and {item} are the same "
                              "setting (a method without a value takes the config's), which "
                              "would train the same run twice: list it once")
        planned[same] = item
        use = launcher if mode == "sync" or launcher == "srun" else "mpirun"
        spec = LaunchSpec.with_defaults(launcher=use, np=ranks, python=python)
        check_launch_fits(run_cfg, spec)
        if any(j.name == name for j in jobs):
            raise ConfigError(f"run {name} is planned twice: list each framework, mode "
                              "and rank count once")
        jobs.append(Job(name, build_argv(spec, args)))
    return jobs


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.report import build_report
    from launchers.runner import run

    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if args.config:
        given = [a for a in train_args if a == "--config" or a.startswith("--config=")]
        if given:            # harness train reads the last --config alone
            raise ConfigError(f"--config {args.config} and {given[0]} after --: harness train "
                              "would read the second alone; give one --config")
        train_args = ["--config", args.config, *train_args]
    frameworks = _csv(args.frameworks, ("torch", "tensorflow"), "frameworks")
    modes = _csv(args.modes, ("sync", "async"), "modes")
    try:
        nps = [int(v) for v in _csv(args.np, None, "np")]
    except ValueError:
        raise ConfigError(f"--np {args.np!r}: give comma-separated rank counts, e.g. 1,2") \
            from None
    if any(n < 1 for n in nps):
        raise ConfigError(f"--np {args.np!r}: rank counts must be at least 1")
    _refuse_duplicates(nps, args.np, "np")                      # 2,02 is 2 twice
    out_dir = Path(args.out_dir or f"results/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and not args.out_dir:
        raise ConfigError("--resume continues a comparison: give its --out-dir")
    if (out_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"--out-dir {str(out_dir)!r} is one run's folder (it holds "
                          "metrics.jsonl): give the comparison's folder, which holds one folder "
                          "per run")
    jobs = plan(train_args, frameworks, nps, modes, args.launcher, out_dir, sys.executable,
                resume=args.resume, compressions=args.compression)
    used: dict[str, list] = {"framework": frameworks, "mode": modes, "out_dir": [out_dir],
                             "resume": ["auto" if args.resume else "never"]}
    for notice in unused_config_keys(train_args, used):
        print(f"harness compare: {notice}", file=sys.stderr, flush=True)
    if not args.dry_run:             # a task: each framework can load it, before any run
        from harness.task import check_frameworks

        check_frameworks(train_args, frameworks)
    existing = [j.name for j in jobs if (out_dir / j.name).exists()]
    if existing and not args.dry_run and not args.resume:
        raise ConfigError(f"{out_dir} already holds runs {', '.join(existing)}: choose a new "
                          "--out-dir (the default is a fresh timestamped folder), or add --resume "
                          "to continue that comparison")
    commands = [shlex.join(j.argv) for j in jobs]
    if args.dry_run:
        print("\n".join(commands))
        return 0
    stop = StopFlag().install()       # a stop signal also reaches the running launcher (runner)
    try:
        for i, job in enumerate(jobs, 1):
            print(f"\n=== [{i}/{len(jobs)}] {job.name}: {shlex.join(job.argv)}",
                  file=sys.stderr, flush=True)
            code = run(job.argv)
            if code == EXIT_PREEMPTED or stop.requested:
                print(f"harness compare: stopped during {job.name} (preempted); continue with "
                      f"the same command plus --resume --out-dir {shlex.quote(str(out_dir))}",
                      file=sys.stderr, flush=True)
                return EXIT_PREEMPTED
            if code != 0:
                raise HarnessError(f"run {job.name} failed with exit code {code}; its command "
                                   f"was: {shlex.join(job.argv)}. Runs finished so far are in "
                                   f"{out_dir}; `harness report` can still compare them.")
    finally:
        stop.uninstall()
    build_report([out_dir / j.name for j in jobs], out_dir, commands)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import build_report, report_ids, reported_runs

    given = [Path(p) for p in args.runs]
    # `harness report cmp/*` names the comparison's own outputs too
    paths = [p for p in given if not (len(given) > 1 and p.name in ("report.md", "figures")
                                      and (p.parent / "report.md").is_file())]
    if args.out:
        out = Path(args.out)
    else:
        if len(given) > 1:    # rep/x/run rep/y/run: rep, not the first run's parent
            out = Path(os.path.commonpath([p.resolve().parent for p in given]))
        else:
            out = paths[0]
        there = reported_runs(out / "report.md")
        runs = all((p / "metrics.jsonl").is_file() for p in paths)    # else: which is not
        if runs and there is not None and there != report_ids(paths, out):
            raise ConfigError(f"{out / 'report.md'} reports other runs ({', '.join(there)}), and "
                              "this report would replace it: give --out FOLDER for a report of "
                              "these runs (or list all of that report's runs)")
    build_report(paths, out)
    return 0


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="run frameworks/modes/rank counts side by side and report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="TOML", help="run config shared by every run")
    p.add_argument("--frameworks", default="torch,tensorflow", help="default: %(default)s")
    p.add_argument("--np", default="1,2", help="ranks (workers for async); default: %(default)s")
    p.add_argument("--modes", default="sync", help="sync, async or both; default: %(default)s")
    p.add_argument("--compression", metavar="LIST",
                   help="gradient compression as an axis, e.g. none,topk,randomk:0.25,powersgd:2,"
                        "local:8 (a ratio or rank after ':'; local SGD's period, and "
                        "local:16:2 for 2 dense epochs first); default: the config's own")
    p.add_argument("--launcher", default="horovodrun", choices=("horovodrun", "mpirun", "srun"),
                   help="launcher for sync runs (async runs use mpirun, or srun under SLURM)")
    p.add_argument("--out-dir", help="folder for the runs and the report (default: "
                   "results/compare-<timestamp>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--resume", action="store_true",
                   help="continue the comparison in --out-dir (e.g. a requeued job): finished "
                        "runs are kept, an interrupted one resumes from its checkpoint")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- followed by `harness train` arguments for every run")
    p.set_defaults(func=cmd_compare)


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="compare finished result folders (report.md + figures)")
    p.add_argument("runs", nargs="+", help="result folders (results/<run>)")
    p.add_argument("--out", help="where to write report.md and figures/ (default: the runs' "
                   "common parent folder; for one run, its own folder)")
    p.set_defaults(func=cmd_report)
