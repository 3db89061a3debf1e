"""Comparison reports from result folders: ``report.md``, PNG figures and a terminal table.

Every number shown comes from a record in a run's ``metrics.jsonl`` (the ``summary`` record of
its latest start for the table; ``step``/``epoch`` records for the curves). Nothing is estimated:
a value that was not measured shows as "n/a". Runs of different models or data are refused.

A run whose latest start has no summary (preempted, crashed or still running) is marked
"unfinished": the summary of an earlier start describes other weights, and often another config.
Rows are named by folder, with as many parent folders as it takes to tell them apart.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from harness import compress
from harness.errors import ConfigError
from harness.files import atomic_write
from harness.localsgd import KEYS as LOCAL_SGD_KEYS
from harness.metrics import latest_by_step, read_records


@dataclass
class Run:
    path: Path
    name: str                            # unique among the runs of one report
    run: dict[str, Any]                  # the "run" record of the latest start
    summary: dict[str, Any]              # the latest start's "summary" record ({} if unfinished)
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    unfinished: str | None = None        # why the latest start has no summary

    @property
    def cfg(self) -> dict[str, Any]:
        return self.run["config"]

    @property
    def framework(self) -> str:
        return self.cfg["framework"]

    @property
    def mode(self) -> str:
        c = self.cfg
        if c["mode"] == "sync":
            return "sync" + ("" if c.get("tf_loop", "custom") == "custom" else "-fit")
        return f"ps-{c['ps_consistency']}"

    @property
    def gradient_path(self) -> str | None:
        """The path the run's gradients took (its record; None before runs recorded it)."""
        return (self.run.get("backend") or {}).get("gradient_path")

    @property
    def workers(self) -> int:
        world = self.run.get("world") or {}       # the latest start's world, finished or not
        return int(world.get("workers") or world.get("size") or self.summary.get("workers")
                   or self.summary.get("world_size") or 1)

    @property
    def compression(self) -> str:
        """The gradient compression and its setting ("none", "topk 1%", "powersgd r4")."""
        return compression_label(self.cfg)

    @property
    def label(self) -> str:
        own = "" if self.compression == "none" else f" {self.compression}"
        return self.extra.get("label") or f"{self.framework} {self.mode} x{self.workers}{own}"

    @property
    def model(self) -> str:
        """The task's name (the built-in model's name for built-in runs)."""
        return (self.run.get("model") or {}).get("name") or self.cfg["model"]

    @property
    def metrics(self) -> list[str]:
        """The task's metric names (classifiers recorded before tasks: accuracy)."""
        return list((self.run.get("model") or {}).get("metrics", ["acc"]))

    @property
    def tokens_per_sample(self) -> int:
        """A language model's tokens per sample (its report counts tokens), else 0."""
        return int((self.run.get("model") or {}).get("tokens_per_sample") or 0)

    @property
    def loss_name(self) -> str:
        return (self.run.get("model") or {}).get("loss", "cross_entropy")


def load_run(path: Path) -> Run:
    """The run in ``path``: config and numbers of its latest start only.

    ``restart`` numbers the starts (every record carries it). A summary written by an earlier
    start is never used: if the latest start has none, the run is ``unfinished``.
    """
    metrics = path / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"result folder {path} does not exist: pass the folders that "
                          "`harness train` wrote, e.g. results/<run>")
    if not metrics.is_file():
        inside = sorted(p.parent.name for p in path.glob("*/metrics.jsonl")) \
            if path.is_dir() else []
        hint = (f"it holds the runs {', '.join(inside[:6])}"
                f"{', ...' if len(inside) > 6 else ''}: give them (`harness report {path}/*`)"
                if inside else
                "pass the folders that `harness train` wrote, e.g. results/<run>")
        raise ConfigError(f"{path} is not a result folder: it has no metrics.jsonl ({hint})")
    records = read_records(metrics)
    runs = [r for r in records if r.get("kind") == "run"]
    if not runs:
        raise ConfigError(f"{metrics} has no run record: the run never started")
    last = max(int(r.get("restart") or 0) for r in records)
    latest = [r for r in records if int(r.get("restart") or 0) == last]
    run = next((r for r in reversed(latest) if r.get("kind") == "run"), runs[-1])
    summaries = [r for r in latest if r.get("kind") == "summary"]
    unfinished = None
    if not summaries:
        preempted = [r for r in latest if r.get("kind") == "preempted"]
        start = f"its latest start (start {last + 1})"
        unfinished = (f"{start} was preempted at step {preempted[-1].get('step')}"
                      if preempted else f"{start} has no summary: it stopped with an error or "
                      "is still running")
        if any(r.get("kind") == "summary" for r in records):
            unfinished += "; the summary of an earlier start is not shown"
    steps = latest_by_step(records, "step")
    epochs = latest_by_step([r for r in records if r.get("kind") == "epoch"], "epoch", "epoch")
    # a drill (HARNESS_FAULT) in any start: its steps are in the run's numbers
    faults = list(dict.fromkeys(str(r["fault"]) for r in runs if r.get("fault")))
    return Run(path, path.name, run, summaries[-1] if summaries else {}, steps, epochs,
               {"restarts": last + 1, "faults": faults}, unfinished)


def unique_names(paths: list[Path]) -> list[str]:
    """Folder names, each with as many parent folders as it takes to be unique:
    ``[a/x/run, a/y/run, a/base]`` gives ``[x/run, y/run, base]``."""
    parts = [p.resolve().parts for p in paths]
    depth = [1] * len(paths)
    for _ in range(max(len(pp) for pp in parts) + 1):
        names = [str(Path(*pp[-d:])) for pp, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        if not clash:
            return names
        depth = [d + 1 if n in clash else d for n, d in zip(names, depth)]
    return [str(Path(*pp)) for pp in parts]        # distinct folders: never reached


def name_runs(runs: list[Run]) -> None:
    """Unique row names (by folder) and figure labels (framework, mode, workers; the row name
    is added where two runs would share a label)."""
    for r, name in zip(runs, unique_names([r.path for r in runs])):
        r.name = name
    labels = [r.label for r in runs]
    for r, label in zip(runs, labels):
        if labels.count(label) > 1:
            r.extra["label"] = f"{label} ({r.name})"


def check_comparable(runs: list[Run]) -> list[str]:
    """Refuse different models or data; return notes on other differences."""
    ref = runs[0]
    for r in runs[1:]:
        if r.model != ref.model:
            raise ConfigError(f"runs are not comparable: {ref.path} trains {ref.model!r} "
                              f"but {r.path} trains {r.model!r}; report runs of one "
                              "model at a time")
        if r.run["data"] != ref.run["data"]:
            raise ConfigError(f"runs are not comparable: {ref.path} uses data {ref.run['data']} "
                              f"but {r.path} uses {r.run['data']}; report runs on the same data")
    notes = []
    for key in ("lr", "batch_size", "global_batch_size", "epochs", "seed", "optimizer",
                "momentum", "weight_decay", "lr_scaling", "warmup_epochs", "gpt_layers",
                "gpt_dim", "gpt_heads"):
        values = {str(r.cfg.get(key)) for r in runs}
        if len(values) > 1:
            notes.append(f"{key} differs between runs: {', '.join(sorted(values))}")
    paths = {r.name: r.gradient_path for r in runs if r.cfg["mode"] == "sync" and r.workers > 1}
    paths = {name: path for name, path in paths.items() if path is not None}
    if len(set(paths.values())) > 1:
        notes.append("the gradient path differs between runs: " +
                     ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) +
                     " (allreduce = 'auto' takes each run's fastest measured path; "
                     "allreduce = 'horovod' runs every one on Horovod)")
    for r in runs:
        sizes = [seg.get("world_size") for seg in
                 (r.summary.get("elastic") or {}).get("segments", [])]
        if len(set(sizes)) > 1:
            notes.append(f"{r.path} is an elastic run that trained at "
                         f"{' -> '.join(map(str, sizes))} ranks: its row mixes them (workers: "
                         f"its start's; samples/s total: the median step of every size; per "
                         f"device: over the last size); the Elastic runs section gives each "
                         f"size's own")
        faults = r.extra.get("faults") or []
        if faults:
            notes.append(f"{r.path} ran with an injected fault (HARNESS_FAULT="
                         f"{', '.join(faults)}): its numbers are a drill's")
    return notes


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def compression_label(cfg: dict[str, Any]) -> str:
    """The exchange as the report names it: "none", "topk 1%", "powersgd r4", "local SGD H8",
    "post-local SGD H16 (2 dense epochs)"."""
    period = cfg.get("local_sgd_period") or 0
    if period:
        start = cfg.get("local_sgd_start_epoch") or 0
        return (f"post-local SGD H{period} ({start} dense epochs)" if start else
                f"local SGD H{period}") + (" weighted" if cfg.get("local_sgd_weighted") else "")
    method = cfg.get("compression", "none")
    if method in ("topk", "randomk"):
        method += f" {100 * cfg.get('compression_ratio', 0.01):g}%"
    elif method == "powersgd":
        method += f" r{cfg.get('powersgd_rank', 4)}"
    if method.split()[0] in ("int8", "sign", "topk", "randomk", "powersgd") and \
            not cfg.get("error_feedback", True):
        method += " no-EF"
    return method


#: the keys of how gradients travel (compression and local SGD): a compressed run's dense
#: twin differs in these alone
EXCHANGE_KEYS = (*compress.KEYS, *LOCAL_SGD_KEYS)

# Config keys that say where and how a run was recorded, not what was measured.
NOT_THE_EXPERIMENT = ("out_dir", "run_name", "resume", "log_every", "horovod_timeline",
                      "stall_timeout_s")


def experiment_key(r: Run) -> str:
    """What must match for one run to be another's scaling baseline: the whole config (framework,
    mode, model, hyperparameters...) and the data; the world size is not in the config."""
    cfg = {k: v for k, v in r.cfg.items() if k not in NOT_THE_EXPERIMENT}
    return json.dumps([cfg, r.run.get("data")], sort_keys=True, default=str)


def scaling_baselines(runs: list[Run]) -> tuple[dict[Path, Run | None], list[str]]:
    """Each run's single-worker baseline: the finished run with the same experiment key and one
    worker (a single-worker run is its own). None, with a note, when there is none or more than
    one: another config's throughput is no baseline, and a guess between two is none either."""
    ones: dict[str, list[Run]] = {}
    for r in runs:
        if r.workers == 1 and r.unfinished is None:
            ones.setdefault(experiment_key(r), []).append(r)
    base: dict[Path, Run | None] = {}
    notes = []
    for r in runs:
        if r.workers == 1:
            base[r.path] = r
            continue
        found = ones.get(experiment_key(r), [])
        base[r.path] = found[0] if len(found) == 1 else None
        if r.unfinished is not None:
            continue                                  # n/a anyway; the unfinished note says why
        if not found:
            notes.append(f"scaling eff. of {r.name} is n/a: the report has no finished "
                         "single-worker run with the same config and data")
        elif len(found) > 1:
            notes.append(f"scaling eff. of {r.name} is n/a: {len(found)} single-worker runs "
                         f"have its config ({', '.join(b.name for b in found)}); report one")
    return base, notes


def scaling_efficiency(runs: list[Run]) -> dict[Path, float | None]:
    """E(n) = X(n) / (n X(1)) against the measured single-worker run of the same config and data
    (samples/s from each run's summary record), keyed by run folder. None without a baseline."""
    base, _ = scaling_baselines(runs)
    out = {}
    for r in runs:
        b = base[r.path]
        x1 = b.summary.get("samples_per_s_total") if b is not None else None
        xn = r.summary.get("samples_per_s_total")
        out[r.path] = xn / (r.workers * x1) if x1 and xn else None
    return out


COLUMNS = [
    ("run", "name", None), ("framework", "framework", None), ("mode", "mode", None),
    ("workers", "workers", "d"), ("final acc", "final_eval_acc", ".4f"),
    ("best acc", "best_eval_acc", ".4f"), ("time to target (s)", "time_to_target_s", ".2f"),
    ("samples/s total", "samples_per_s_total", ",.0f"),
    ("samples/s/device", "samples_per_s_per_device", ",.0f"),
    ("sent/step (KB)", "sent_bytes_per_step", "kB"),
    ("step p50 (ms)", "step_time_p50_s", "ms"), ("step p90 (ms)", "step_time_p90_s", "ms"),
    ("scaling eff.", "scaling", ".3f"), ("train wall (s)", "train_wall_s", ".1f"),
]


UNFINISHED = "unfinished"     # first result cell of a run whose latest start has no summary
_ACCURACY = ("final_eval_acc", "best_eval_acc", "time_to_target_s")


#: a language model's columns in place of the samples/s ones
LM_COLUMNS = {"samples_per_s_total": ("tokens/s total", "tokens_per_s_total", ",.0f"),
              "samples_per_s_per_device": ("tokens/s/device", "tokens_per_s_per_device", ",.0f")}


def columns(runs: list[Run]) -> list[tuple[str, str, str | None]]:
    """The table's columns: a classifier's accuracy columns, or else the task's own test
    loss and metrics by their names (``final mse``, ``final mae``); a language model's
    perplexity and tokens/s where a classifier's has accuracy and samples/s."""
    ref = runs[0]
    if ref.tokens_per_sample:
        lm = [LM_COLUMNS.get(c[1], c) for c in COLUMNS if c[1] not in _ACCURACY]
        return lm[:4] + [("final perplexity", "final_eval_perplexity", ".3f")] + \
            [(f"final {m}", f"final_eval_{m}", ".4f") for m in ref.metrics] + lm[4:]
    if "acc" in ref.metrics:
        return COLUMNS
    own = [(f"final {ref.loss_name}", "final_eval_loss", ".4f")] + \
        [(f"final {m}", f"final_eval_{m}", ".4f") for m in ref.metrics]
    out = [c for c in COLUMNS if c[1] not in _ACCURACY]
    return out[:4] + own + out[4:]


def table_rows(runs: list[Run]) -> list[list[str]]:
    eff = scaling_efficiency(runs)
    rows = []
    cols = columns(runs)
    first = cols[4][1]                # the first result column
    for r in runs:
        row = []
        for _, key, spec in cols:
            if key in ("name", "framework", "mode"):
                row.append(getattr(r, key))
            elif key == "workers":
                row.append(str(r.workers))
            elif key == "scaling":
                row.append(_fmt(eff[r.path], spec or ".4f"))
            elif r.unfinished is not None:
                row.append(UNFINISHED if key == first else _fmt(None))
            elif spec in ("ms", "kB"):
                v = r.summary.get(key)
                row.append(_fmt(v * (1000 if spec == "ms" else 1e-3) if v is not None else None,
                                ".2f" if spec == "ms" else ",.1f"))
            else:
                row.append(_fmt(r.summary.get(key), spec or ".4f"))
        rows.append(row)
    return rows


def figures(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    colors = {"torch": "tab:red", "tensorflow": "tab:blue"}
    shades = {"torch": ["#f4a582", "#d6604d", "#b2182b", "#67001f"],
              "tensorflow": ["#92c5de", "#4393c3", "#2166ac", "#053061"]}
    workers = sorted({r.workers for r in runs})

    def style(r: Run) -> dict:   # colour: framework (darker = more workers); line: mode
        shade = shades.get(r.framework, ["gray"] * 4)[min(workers.index(r.workers), 3)]
        line = "-" if r.mode == "sync" else (":" if r.mode == "sync-fit" else "--")
        return {"color": shade, "linestyle": line, "label": r.label}

    # the test curve: a language model's perplexity, else accuracy, else the task's first
    # metric, else its test loss
    ref = runs[0]
    metric = "acc" if "acc" in ref.metrics else next(iter(ref.metrics), None)
    key = f"eval_{metric}" if metric else "eval_loss"
    test = "test accuracy" if metric == "acc" else f"test {metric or ref.loss_name}"
    if ref.tokens_per_sample:
        key, test = "eval_perplexity", "test perplexity"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for r in runs:
        st = [s for s in r.steps if isinstance(s.get("loss"), (int, float))]
        axes[0, 0].plot([s["step"] for s in st], [s["loss"] for s in st], alpha=0.8,
                        **style(r))
        axes[0, 1].plot([s["wall_s"] for s in st], [s["loss"] for s in st], alpha=0.8,
                        **style(r))
        ev = [e for e in r.epochs if e.get(key) is not None]
        axes[1, 0].plot([e["step"] for e in ev], [e[key] for e in ev], marker="o",
                        **style(r))
        axes[1, 1].plot([e["wall_s"] for e in ev], [e[key] for e in ev], marker="o",
                        **style(r))
    for ax, (x, y) in zip(axes.flat, [("step (updates)", "training loss (rank 0's batch)"),
                                      ("wall time (s)", "training loss (rank 0's batch)"),
                                      ("step (updates)", test),
                                      ("wall time (s)", test)]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    done = [r for r in runs if r.unfinished is None]     # unfinished runs have no throughput
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [r.label for r in done]
    unit = "tokens" if ref.tokens_per_sample else "samples"
    total = [r.summary.get(f"{unit}_per_s_total") or 0 for r in done]
    per_dev = [r.summary.get(f"{unit}_per_s_per_device") or 0 for r in done]
    p50 = [(r.summary.get("step_time_p50_s") or 0) * 1000 for r in done]
    p90 = [(r.summary.get("step_time_p90_s") or 0) * 1000 for r in done]
    cols = [colors.get(r.framework, "gray") for r in done]
    axes[0].barh(labels, total, color=cols)
    axes[0].set_xlabel(f"{unit}/s, total")
    axes[1].barh(labels, per_dev, color=cols)
    axes[1].set_xlabel(f"{unit}/s per device")
    axes[2].barh(labels, p50, color=cols, label="p50")
    axes[2].scatter(p90, labels, color="black", marker="|", s=200, label="p90", zorder=3)
    axes[2].set_xlabel("step time (ms)")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    eff = scaling_efficiency(runs)
    multi = [r for r in runs if r.workers > 1 and eff[r.path] is not None]
    if multi:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([r.label for r in multi], [float(eff[r.path] or 0.0) for r in multi],
               color=[colors.get(r.framework, "gray") for r in multi])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("scaling efficiency X(n) / (n X(1))")
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        paths.append(out / "scaling.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    timed = [r for r in runs if breakdown(r)]
    if timed:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(timed) + 1.6))
        left = [0.0] * len(timed)
        for part, color in zip(BREAKDOWN, ("tab:gray", "tab:green", "tab:orange", "tab:purple")):
            ms = [1000 * (breakdown(r).get(f"{part}_s") or 0.0) for r in timed]
            ax.barh([r.label for r in timed], ms, left=left, color=color, label=part)
            left = [a + b for a, b in zip(left, ms)]
        ax.invert_yaxis()
        ax.set_xlabel("median step time on rank 0 (ms)")
        ax.legend(ncol=4, fontsize=8, loc="lower right")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        paths.append(out / "breakdown.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if "acc" in runs[0].metrics:
        path = compression_figure(runs, out, plt)
        if path is not None:
            paths.append(path)

    ps = [r for r in runs if r.summary.get("staleness_histogram")]
    if ps:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(ps)
        for i, r in enumerate(ps):
            hist = {int(k): v for k, v in r.summary["staleness_histogram"].items()}
            ax.bar([k + i * width for k in hist], list(hist.values()), width=width,
                   label=r.label, color=colors.get(r.framework, "gray"),
                   alpha=0.5 + 0.5 * (i % 2))
        ax.set_xlabel("staleness (server versions between pull and push)")
        ax.set_ylabel("updates")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "staleness.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def dense_baselines(runs: list[Run]) -> dict[Path, Run | None]:
    """Each finished compressed run's dense twin: the finished run with compression = none and
    otherwise the same config, data and workers (None when there is none)."""
    def key(r: Run) -> str:
        cfg = {k: v for k, v in r.cfg.items()
               if k not in NOT_THE_EXPERIMENT and k not in EXCHANGE_KEYS}
        return json.dumps([cfg, r.run.get("data"), r.workers], sort_keys=True, default=str)

    dense = {key(r): r for r in runs if r.compression == "none" and r.unfinished is None}
    return {r.path: dense.get(key(r)) for r in runs
            if r.compression != "none" and r.unfinished is None}


def compression_section(runs: list[Run]) -> list[str]:
    """The trade-off of each compressed run against its dense twin: accuracy, bytes, time."""
    twins = dense_baselines(runs)
    if not twins:
        return []
    lines = ["## Gradient compression", "",
             "Each compressed run (or local SGD run) against the dense run with the same config, "
             "data and workers. Bytes are what rank 0 sent per step for the gradient exchange "
             "(ring algorithms' count from the payloads; a 1-rank run sends none; local SGD: its "
             "weight averages over all steps; a parameter-server worker: its pushes). A "
             "compressed run wins where "
             "the network, not the computation, bounds the step: on one host's shared memory "
             "the dense exchange is nearly free, so compression mostly costs time here.", "",
             "| run | compression | final acc | vs dense (points) | sent/step (KB) | "
             "of dense | samples/s | vs dense | time to target (s) |", "|" + "---|" * 9]
    for r in runs:
        if r.path not in twins:
            continue
        d, s = twins[r.path], r.summary
        acc, sent, rate = (s.get("final_eval_acc"), s.get("sent_bytes_per_step"),
                           s.get("samples_per_s_total"))
        da = d.summary.get("final_eval_acc") if d else None
        ds = d.summary.get("sent_bytes_per_step") if d else None
        dr = d.summary.get("samples_per_s_total") if d else None
        lines.append(
            f"| {r.name} | {r.compression} | {_fmt(acc)} | "
            f"{_fmt(100 * (acc - da) if acc is not None and da is not None else None, '+.1f')} | "
            f"{_fmt(sent / 1e3 if sent is not None else None, ',.1f')} | "
            f"{_fmt(sent / ds if sent is not None and ds else None, '.3f')} | "
            f"{_fmt(rate, ',.0f')} | {_fmt(rate / dr if rate and dr else None, '.2f')} | "
            f"{_fmt(s.get('time_to_target_s'), '.2f')} |")

    pairs = [(r, d) for r in runs if (d := twins.get(r.path)) is not None]
    crossed = [f"{r.name} ran on {r.gradient_path}, its dense run {d.name} on "
               f"{d.gradient_path}" for r, d in pairs
               if None not in (r.gradient_path, d.gradient_path)
               and r.gradient_path != d.gradient_path]
    if crossed:
        # allreduce = 'auto' keeps fp16 on Horovod (it sums in float16) while the dense run
        # may take mpi4py: the samples/s ratio then holds the paths' difference too
        lines.append("")
        lines.append(f"The gradient path differs from the dense run's ({'; '.join(crossed)}): "
                     "its samples/s ratio includes the paths' difference; set allreduce "
                     "explicitly to compare compression alone.")
    missing = [r.name for r in runs if r.path in twins and twins[r.path] is None]
    if missing:
        lines.append("")
        lines.append(f"No dense run with the same config for {', '.join(missing)}: add "
                     "compression none to the comparison to see their trade-off.")
    return lines + [""]


def elastic_section(runs: list[Run]) -> list[str]:
    """Elastic runs: each stretch at one world size with its own throughput, and the resets."""
    el = [r for r in runs if r.summary.get("elastic")]
    if not el:
        return []
    lines = ["## Elastic runs", "",
             "Throughput per segment of constant world size: the steps run in it (redone "
             "steps included) x the global batch over its wall time. A reset is a rank lost "
             "(the others went back to their last commit and redid the steps since) or hosts "
             "added or removed.", "",
             "| run | ranks | steps | wall (s) | samples/s | per rank |", "|" + "---|" * 6]
    for r in el:
        for seg in r.summary["elastic"].get("segments", []):
            rate, n = seg.get("samples_per_s"), seg.get("world_size")
            lines.append(
                f"| {r.name} | {n} | {seg.get('start_step')}-{seg.get('end_step', '?')} | "
                f"{_fmt(seg.get('start_wall_s'), '.1f')}-{_fmt(seg.get('end_wall_s'), '.1f')} | "
                f"{_fmt(rate, ',.0f')} | {_fmt(rate / n if rate and n else None, ',.0f')} |")
    lines.append("")
    for r in el:
        for x in r.summary["elastic"].get("resets", []):
            redo = f", {x['steps_redone']} step(s) redone" if x.get("steps_redone") else ""
            lines.append(f"- {r.name}: {x.get('reason')} at {_fmt(x.get('wall_s'), '.1f')} s: "
                         f"{x.get('old_size')} -> {x.get('new_size')} ranks, from step "
                         f"{x.get('step')}{redo}")
    return lines + [""]


def compression_figure(runs: list[Run], out: Path, plt: Any) -> Path | None:
    """Final accuracy against bytes sent per step and against training time."""
    shown = [r for r in runs if r.unfinished is None and r.workers > 1 and
             r.summary.get("sent_bytes_per_step")]
    if len({r.compression for r in shown}) < 2:
        return None
    colors = {"torch": "tab:red", "tensorflow": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in shown:
        acc = r.summary.get("final_eval_acc")
        if acc is None:
            continue
        c = colors.get(r.framework, "gray")
        for ax, x in zip(axes, (r.summary["sent_bytes_per_step"] / 1e3,
                                r.summary.get("train_wall_s"))):
            ax.scatter([x], [acc], color=c)
            ax.annotate(f"{r.compression} x{r.workers}", (x, acc), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("sent per step and rank (KB, log scale)")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title("red: PyTorch, blue: TensorFlow", fontsize=9)
    fig.tight_layout()
    path = out / "compression.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: the step parts of a summary's ``time_breakdown`` (harness.metrics.BREAKDOWN_PARTS)
BREAKDOWN = ("data", "compute", "exchange", "harness")


def breakdown(r: Run) -> dict[str, Any]:
    """A finished sync run's step breakdown ({} for parameter-server and older runs)."""
    b = r.summary.get("time_breakdown") or {}
    return b if b.get("compute_s") is not None or b.get("harness_s") is not None else {}


def explain_step(r: Run, base: Run | None, eff: float | None) -> str:
    """One sentence: where the run's step time goes and, against its single-worker run, what
    its scaling efficiency lost it to."""
    b = breakdown(r)
    parts = {p: b.get(f"{p}_s") for p in BREAKDOWN}
    total = sum(v for v in parts.values() if v is not None)
    if total <= 0:
        return f"- {r.name}: no step breakdown recorded."
    shares = ", ".join(f"{p} {1000 * v:.2f} ms ({v / total:.0%})" for p, v in parts.items()
                       if v is not None)
    text = f"- **{r.name}**: a step takes {1000 * total:.2f} ms on rank 0: {shares}"
    if parts["exchange"] is None:
        text += " (the exchange runs inside the backward pass on this path: not separable)"
    ranks = (b.get("ranks_s") or {}).get("compute") or [None, None]
    if r.workers > 1 and None not in ranks and ranks[1] > 0:
        text += (f"; compute over the ranks {1000 * ranks[0]:.2f}-{1000 * ranks[1]:.2f} ms"
                 + (" (a straggler)" if ranks[1] > 1.25 * ranks[0] else ""))
    bb = breakdown(base) if base is not None and base is not r else {}
    if eff is not None and base is not None and bb:
        deltas = sorted(((p, (parts[p] or 0.0) - (bb.get(f"{p}_s") or 0.0)) for p in BREAKDOWN
                         if parts[p] is not None and bb.get(f"{p}_s") is not None),
                        key=lambda d: -d[1])
        text += (f". Scaling efficiency {eff:.2f} against {base.name}, whose step took "
                 f"{1000 * sum(bb.get(f'{p}_s') or 0.0 for p in BREAKDOWN):.2f} ms: "
                 + ", ".join(f"{p} {1000 * d:+.2f} ms" for p, d in deltas))
        if eff < 1 and deltas and deltas[0][1] > 0:
            text += f"; the loss is mostly {deltas[0][0]}"
        elif eff >= 1 and deltas and deltas[-1][1] < 0:
            text += f"; above 1 because {deltas[-1][0]} per step fell"
            threads = [(x.run.get("environment") or {}).get("env", {}).get("OMP_NUM_THREADS")
                       for x in (r, base)]
            if deltas[-1][0] == "compute" and None not in threads and threads[0] != threads[1]:
                text += (f" (each rank computes with its share of the cores: {threads[0]} "
                         f"thread(s) a rank here, {threads[1]} in {base.name})")
    start, first = r.summary.get("startup_s"), r.summary.get("first_step_s")
    if start is not None:
        text += (f". Start-up before the training loop: {start:.1f} s (interpreter, imports, "
                 "data, model)" + (f"; the loop's first step took {1000 * first:.0f} ms "
                                   "(graph tracing, warm-up), so wall-time curves start there"
                                   if first is not None else ""))
    return text + "."


def explain_ps(r: Run, base: Run | None, eff: float | None) -> str:
    """One sentence for a parameter-server run: a worker's step and its wait on push/pull, from
    the summary (the server records them per applied push)."""
    s = r.summary
    step, wait = s.get("step_time_p50_s"), s.get("push_pull_latency_p50_s")
    if step is None or wait is None:
        return f"- {r.name}: no step or push/pull times recorded."
    text = (f"- **{r.name}**: a worker's step (compute, then the push and pull round trip) "
            f"takes {1000 * step:.2f} ms, the round trip {1000 * wait:.2f} ms ({wait / step:.0%};"
            f" medians); staleness {s.get('staleness_mean') or 0.0:.2f} versions on average")
    if eff is not None and base is not None and base is not r:
        b_step, b_wait = base.summary.get("step_time_p50_s"), \
            base.summary.get("push_pull_latency_p50_s")
        if b_step is not None and b_wait is not None:
            text += (f". Scaling efficiency {eff:.2f} against {base.name}: step "
                     f"{1000 * (step - b_step):+.2f} ms, push/pull wait "
                     f"{1000 * (wait - b_wait):+.2f} ms")
    return text + "."


def breakdown_section(runs: list[Run]) -> list[str]:
    timed = [r for r in runs if breakdown(r) or r.summary.get("staleness_histogram")]
    if not timed:
        return []
    base, _ = scaling_baselines(runs)
    eff = scaling_efficiency(runs)
    lines = ["## Where each step's time goes", "",
             "Rank 0's median of each part of a step, measured on every rank from its own "
             "clock (no barrier added): **data** (the batch), **compute** (forward, backward "
             "and update), **exchange** (waiting for the reduced gradients once the local "
             "ones exist), **harness** (everything else the loop does: metrics, progress, "
             "lr, the stop agreement). The training wall time starts at the training loop: "
             "start-up before it (interpreter, imports, data, model) is listed apart, and its "
             "first step (graph tracing) is named. Parameter-server runs: a worker's median "
             "step and its wait on push and pull.", ""]
    lines += [explain_step(r, base.get(r.path), eff.get(r.path)) if breakdown(r) else
              explain_ps(r, base.get(r.path), eff.get(r.path)) for r in timed]
    return lines + [""]


FIRST_LOSS_TOLERANCE = 1e-5     # step-1 losses of runs from the same weights and batch


def fidelity(runs: list[Run]) -> list[str]:
    """Do the runs start from the same weights, and do their first losses agree?

    Runs of a task with a canonical weight layout record the checksum of their initial
    weights in that layout; equal checksums mean the same start, and then runs with the same
    number of workers see the same first batch, so their step-1 losses must agree within
    FIRST_LOSS_TOLERANCE. Runs without one start from each framework's own initialisation.
    """
    frameworks = {r.framework for r in runs}
    if len(frameworks) < 2:
        return []
    lines = ["## Fidelity", ""]
    models = [(r, r.run.get("model") or {}) for r in runs]
    unknown = [r.name for r, m in models if "canonical" not in m]
    if unknown:
        return lines + [f"Not checked: {', '.join(unknown)} recorded no initial-weight layout "
                        "(written before runs recorded one).", ""]
    own = [r.name for r, m in models if not m.get("canonical")]
    if own:
        lines += [f"The initial weights differ: {', '.join(own)} initialised with the "
                  "framework's own initialisers (the task has no canonical weight layout), so "
                  "the runs are compared on the same data and schedule, not from the same start.",
                  ""]
        return lines
    sums = {m.get("initial_weights_checksum") for _, m in models}
    if len(sums) > 1:
        known = sorted(v for v in sums if v is not None)
        lines += ["The initial weights differ: the runs' canonical initial-weight checksums "
                  f"are {', '.join(f'{v:.6g}' for v in known)}.", ""]
        return lines
    lines += [f"Every run starts from the same initial weights (canonical checksum "
              f"{sums.pop():.6g}). Step-1 loss on rank 0's first batch, by number of workers "
              f"(must agree within {FIRST_LOSS_TOLERANCE:g}):", ""]
    for workers in sorted({r.workers for r in runs}):
        group = [r for r in runs if r.workers == workers and r.mode.startswith("sync")
                 and r.steps and r.steps[0].get("step") == 1]
        if len({r.framework for r in group}) < 2:
            continue
        first = {r.name: float(r.steps[0]["loss"]) for r in group}
        spread = max(first.values()) - min(first.values())
        verdict = "agree" if spread <= FIRST_LOSS_TOLERANCE else "DIFFER"
        lines.append(f"- {workers} worker(s): " + ", ".join(f"{k} {v:.7f}" for k, v in
                                                           first.items())
                     + f": spread {spread:.2g}, {verdict}")
    lines.append("")
    return lines


def render_markdown(runs: list[Run], notes: list[str], figs: list[Path], out_dir: Path,
                    commands: list[str] | None = None) -> str:
    header = [c[0] for c in columns(runs)]
    lines = ["# Comparison report", "",
             f"Model **{runs[0].model}** on **{runs[0].run['data']['name']}** "
             f"({runs[0].run['data']['train']} training / {runs[0].run['data']['test']} test "
             "samples). Every number below is read from the runs' `metrics.jsonl` files: the "
             "table from the `summary` record of each run's latest start, the curves from "
             "`step` and `epoch` records. Throughput is the global batch over the median step "
             "time (warm-up steps excluded); scaling efficiency is X(n) / (n X(1)) against the "
             "measured single-worker run of the same config and data (n/a when the report "
             "holds none).", ""]
    if runs[0].cfg.get("target_accuracy") is not None:
        lines += [f"Target accuracy for time-to-accuracy: {runs[0].cfg['target_accuracy']}.", ""]
    if runs[0].tokens_per_sample:
        unigram = runs[0].run["data"].get("unigram_test_perplexity")
        lines += [f"A language model: {runs[0].tokens_per_sample} tokens per sample; "
                  "perplexity is exp(test cross-entropy per token)"
                  + (f"; the unigram baseline (the training text's byte frequencies) has test "
                     f"perplexity {unigram:.3f}" if unigram else "") + ".", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    lines.append("")
    unfinished = [r for r in runs if r.unfinished is not None]
    if unfinished:
        lines += [f"**Unfinished runs** (marked \"{UNFINISHED}\"; resume them to get their "
                  "numbers):", ""] + [f"- {r.name}: {r.unfinished}" for r in unfinished] + [""]
    if notes:
        lines += ["**Differences between runs:**", ""] + [f"- {n}" for n in notes] + [""]
    scaling_notes = scaling_baselines(runs)[1]
    if scaling_notes:
        lines += ["**Scaling efficiency:**", ""] + [f"- {n}" for n in scaling_notes] + [""]
    lines += fidelity(runs)
    lines += breakdown_section(runs)
    if "acc" in runs[0].metrics:
        lines += compression_section(runs)
    for f in figs:
        lines += [f"![{f.stem}]({f.relative_to(out_dir).as_posix()})", ""]
    lines += elastic_section(runs)
    ps = [r for r in runs if r.summary.get("staleness_histogram")]
    if ps:
        lines += ["## Parameter-server runs", "",
                  "| run | updates/s | staleness mean | p99 | max | max clock lead | "
                  "push/pull p50 (ms) | p99 (ms) | failed workers |", "|" + "---|" * 9]
        for r in ps:
            s = r.summary
            lines.append(
                f"| {r.name} | {_fmt(s.get('updates_per_s'), ',.0f')} | "
                f"{_fmt(s.get('staleness_mean'), '.2f')} | {_fmt(s.get('staleness_p99'), '.1f')}"
                f" | {s.get('staleness_max')} | {s.get('max_clock_lead')} | "
                f"{_fmt(_ms(s.get('push_pull_latency_p50_s')), '.2f')} | "
                f"{_fmt(_ms(s.get('push_pull_latency_p99_s')), '.2f')} | "
                f"{s.get('failed_workers') or 'none'} |")
        lines.append("")
        for r in ps:
            for wid, j in (r.summary.get("joined_workers") or {}).items():
                lines.append(f"- {r.name}: worker {wid} joined from {j['host']} at update "
                             f"{j['at_version']} in the place of slot {j['slot']} (from clock "
                             f"{j['from_clock']}); it ended at clock {j['clock']}, {j['state']}")
        if any(r.summary.get("joined_workers") for r in ps):
            lines.append("")
    lines += ["## Runs: environment and commands", ""]
    for r in runs:
        env = r.run["environment"]
        b = r.run["backend"]
        versions = ", ".join(f"{k} {v}" for k, v in sorted(b["versions"].items()))
        lines += [f"### {r.name}", "",
                  f"- folder: `{r.path}`; starts: {r.extra['restarts']}",
                  f"- gradient path: {b['gradient_path']}; world: {r.run['world']}",
                  f"- versions: {versions}; Python {env['python']}",
                  f"- machine: {env['host']}, {env['cpu']} ({env['cpus']} CPUs); git "
                  f"{env.get('git_commit')}",
                  f"- settings: `{json.dumps(b.get('settings', {}), sort_keys=True)}`",
                  *([f"- injected fault: `HARNESS_FAULT={', '.join(r.extra['faults'])}`"]
                    if r.extra.get("faults") else []),
                  f"- rank 0 command: `{env['command']}`", ""]
    if commands:
        lines += ["## Launch commands", "", "```"] + commands + ["```", ""]
    return "\n".join(lines)


def print_table(runs: list[Run]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{runs[0].model} on {runs[0].run['data']['name']}")
    for name, _, _ in columns(runs):
        text = name in ("run", "framework", "mode")
        t.add_column(name, justify="left" if text else "right", no_wrap=text,
                     min_width=max(len(r.name) for r in runs) if name == "run" else None)
    for row in table_rows(runs):
        t.add_row(*row)
    Console(width=200).print(t)


#: report.md's last line names the runs it reports (relative to its folder), so a report of
#: other runs does not replace it unasked (``harness report``)
REPORT_OF = "<!-- harness report of:"


def report_ids(paths: list[Path], out_dir: Path) -> list[str]:
    return sorted(os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in paths)


def reported_runs(report: Path) -> list[str] | None:
    """The runs an existing report.md reports (None: no report, or one without the line)."""
    try:
        text = report.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(text.splitlines()):
        if line.startswith(REPORT_OF) and line.endswith("-->"):
            try:
                ids = json.loads(line[len(REPORT_OF):-3])
            except ValueError:
                return None
            return ids if isinstance(ids, list) else None
    return None


def build_report(paths: list[Path], out_dir: Path, commands: list[str] | None = None,
                 show: bool = True) -> Path:
    if not paths:
        raise ConfigError("no result folders given: pass results/<run> folders")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file: give a folder (report.md and "
                          "figures/ are written into it)")
    seen: dict[Path, Path] = {}
    for p in map(Path, paths):
        if p.resolve() in seen:
            raise ConfigError(f"result folder {p} is given twice (also as {seen[p.resolve()]}): "
                              "list each run once")
        seen[p.resolve()] = p
    runs = [load_run(Path(p)) for p in paths]
    name_runs(runs)
    notes = check_comparable(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(runs, out_dir / "figures")
    md = render_markdown(runs, notes, figs, out_dir, commands)
    md += f"\n{REPORT_OF} {json.dumps(report_ids(paths, out_dir))} -->\n"
    report = out_dir / "report.md"
    blob = md.encode("utf-8")

    def write(f: BinaryIO) -> None:
        f.write(blob)

    atomic_write(report, write)
    for r in runs:
        if r.unfinished is not None:
            print(f"harness: warning: {r.path} is unfinished: {r.unfinished}; its row in the "
                  f"report says {UNFINISHED!r} (resume the run to finish it)", file=sys.stderr,
                  flush=True)
    if show:
        print_table(runs)
        for n in notes + scaling_baselines(runs)[1]:
            print(f"note: {n}")
        print(f"report: {report}")
    return report
