"""Reports from hand-made result folders (no training): row names, which start's numbers are
shown, scaling baselines, and `harness compare` refusing a plan that repeats a run.

Each folder is written the way `harness train` writes it (``metrics.jsonl`` with ``run``,
``step``, ``epoch``, ``preempted`` and ``summary`` records carrying a ``restart`` counter, plus
``config.json`` and ``summary.json``); expected values are computed from what the test wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.errors import ConfigError
import harness.report
from harness.report import build_report

DATA = {"name": "digits", "train": 1437, "test": 360, "sha256": "d1g1t5"}


def start(restart: int, *, workers: int = 1, summary: dict | None = None,
          preempted_at: int | None = None, steps: int = 4, **cfg) -> list[dict]:
    """The records of one start of a run: what `harness train` appends to metrics.jsonl.
    ``summary`` (the fields that differ from a plain finished start) makes it a finished start;
    ``preempted_at`` one that was preempted; neither, one that crashed or is still running."""
    config = RunConfig(**cfg).to_dict()
    ps = config["mode"] == "async"
    world = ({"size": workers + config["ps_servers"], "servers": config["ps_servers"],
              "workers": workers, "launcher": "mpi4py"} if ps
             else {"size": workers, "launcher": "test"})
    out = [{"kind": "run", "restart": restart, "config": config, "world": world,
            "environment": {"python": "3.11", "host": "h", "cpu": "c", "cpus": 2,
                            "git_commit": None, "command": "harness train"},
            "backend": {"framework": config["framework"], "gradient_path": "local",
                        "versions": {"numpy": "2"}, "settings": {}},
            "model": {"name": config["model"], "parameters": 10, "flops_per_sample": 1},
            "data": DATA, "resumed_from": None, "start_step": 0}]
    for s in range(1, steps + 1):
        out.append({"kind": "step", "restart": restart, "step": s, "loss": 1.0 / s,
                    "wall_s": 0.1 * s})
    out.append({"kind": "epoch", "restart": restart, "epoch": 1, "step": steps,
                "eval_acc": 0.5, "wall_s": 0.1 * steps})
    if preempted_at is not None:
        out.append({"kind": "preempted", "restart": restart, "step": preempted_at})
    if summary is not None:
        p50 = 0.01
        fields = {"final_eval_acc": 0.9, "best_eval_acc": 0.9, "time_to_target_s": None,
                  "samples_per_s_total": 1000.0, "step_time_p50_s": p50,
                  "step_time_p90_s": 2 * p50, "train_wall_s": 3.0, "steps": steps,
                  "world_size": world["size"], **({"workers": workers} if ps else {})}
        fields.update(summary)
        total = fields["samples_per_s_total"]
        fields["samples_per_s_per_device"] = total / workers if total is not None else None
        out.append({"kind": "summary", "restart": restart, **fields})
    return out


def write_run(folder: Path, *starts: list[dict]) -> Path:
    folder.mkdir(parents=True)
    records = [r for s in starts for r in s]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [r for r in records if r["kind"] == "run"]
    (folder / "config.json").write_text(json.dumps(runs[-1]))
    summaries = [r for r in records if r["kind"] == "summary"]
    if summaries:                            # written at the end of a finished start, never removed
        (folder / "summary.json").write_text(json.dumps(summaries[-1]))
    return folder


def summary_of(folder: Path, restart: int | None = None) -> dict:
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "summary"
            and (restart is None or r["restart"] == restart)][-1]


def table(report: Path) -> dict[str, dict[str, str]]:
    """The main table of report.md, as {row name: {column: cell}}; a repeated name fails."""
    lines = report.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[first].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] not in rows, f"two rows named {cells[0]!r}"
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def eff(xn: float, n: int, x1: float) -> str:
    return f"{xn / (n * x1):.3f}"


@pytest.fixture
def no_figures(monkeypatch):
    """Skip the PNGs (a second each) where a test reads only the table."""
    monkeypatch.setattr(harness.report, "figures", lambda runs, out: [])


# --- item 11: rows of folders with the same name ----------------------------------------------

def test_same_named_folders_get_distinct_rows_with_their_own_numbers(tmp_path, capsys):
    base = write_run(tmp_path / "rep" / "base", start(0, workers=1, summary={
        "samples_per_s_total": 200.0}))
    x = write_run(tmp_path / "rep" / "x" / "run", start(0, workers=2, summary={
        "samples_per_s_total": 300.0, "final_eval_acc": 0.81}))
    y = write_run(tmp_path / "rep" / "y" / "run", start(0, workers=2, summary={
        "samples_per_s_total": 500.0, "final_eval_acc": 0.83}))
    report = build_report([x, y, base], tmp_path / "out")
    rows = table(report)
    assert set(rows) == {"x/run", "y/run", "base"}
    x1 = summary_of(base)["samples_per_s_total"]
    for name, folder in (("x/run", x), ("y/run", y)):
        s = summary_of(folder)
        assert rows[name]["scaling eff."] == eff(s["samples_per_s_total"], 2, x1)
        assert rows[name]["final acc"] == f"{s['final_eval_acc']:.4f}"
        assert rows[name]["samples/s total"] == f"{s['samples_per_s_total']:,.0f}"
    md = report.read_text()
    assert "### x/run" in md and "### y/run" in md
    out = capsys.readouterr().out                 # the terminal table names them the same way
    assert "x/run" in out and "y/run" in out


def test_unique_names_add_parents_only_where_needed(tmp_path):
    from harness.report import unique_names

    paths = [tmp_path / "a" / "x" / "run", tmp_path / "a" / "y" / "run", tmp_path / "a" / "b",
             tmp_path / "p" / "q" / "r", tmp_path / "s" / "q" / "r"]
    assert unique_names(paths) == ["x/run", "y/run", "b", "p/q/r", "s/q/r"]


def test_a_folder_given_twice_is_refused_and_nothing_is_written(tmp_path):
    a = write_run(tmp_path / "a", start(0, summary={}))
    with pytest.raises(ConfigError, match="given twice"):
        build_report([a, tmp_path / "a" / ".." / "a"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- item 12: a run whose latest start did not finish -----------------------------------------

@pytest.mark.parametrize("how", ["preempted", "crashed"])
def test_latest_start_unfinished_is_marked_not_shown_with_an_earlier_summary(tmp_path, capsys,
                                                                              how):
    # start 0: a 1-epoch config that finished; start 1: the 3-epoch config, not finished
    stale = {"final_eval_acc": 0.6123, "best_eval_acc": 0.6123, "samples_per_s_total": 777.0}
    folder = write_run(tmp_path / "r", start(0, epochs=1, summary=stale),
                       start(1, epochs=3, steps=9,
                             preempted_at=7 if how == "preempted" else None))
    report = build_report([folder], tmp_path / "out")
    row = table(report)["r"]
    earlier = summary_of(folder, restart=0)
    assert row["final acc"] == "unfinished"
    for col in ("best acc", "samples/s total", "samples/s/device", "step p50 (ms)",
                "train wall (s)", "scaling eff."):
        assert row[col] == "n/a", col
    assert f"{earlier['final_eval_acc']:.4f}" not in " ".join(row.values())
    assert f"{earlier['samples_per_s_total']:,.0f}" not in " ".join(row.values())
    md = report.read_text()
    why = "preempted at step 7" if how == "preempted" else "has no summary"
    assert "**Unfinished runs**" in md and why in md and "earlier start" in md
    err = capsys.readouterr().err
    assert f"warning: {folder} is unfinished" in err and why in err


def test_only_the_latest_starts_summary_counts(tmp_path, no_figures):
    # start 0 finished, start 1 preempted, start 2 finished: the table shows start 2
    folder = write_run(tmp_path / "r",
                       start(0, epochs=1, summary={"final_eval_acc": 0.5}),
                       start(1, epochs=3, preempted_at=3),
                       start(2, epochs=3, summary={"final_eval_acc": 0.93,
                                                   "samples_per_s_total": 1234.0}))
    row = table(build_report([folder], tmp_path / "out"))["r"]
    latest = summary_of(folder, restart=2)
    assert row["final acc"] == f"{latest['final_eval_acc']:.4f}"
    assert row["samples/s total"] == f"{latest['samples_per_s_total']:,.0f}"


def test_unfinished_parameter_server_run_keeps_its_worker_count(tmp_path, no_figures):
    folder = write_run(tmp_path / "ps", start(0, workers=2, mode="async", summary={}),
                       start(1, workers=3, mode="async", preempted_at=5))
    row = table(build_report([folder], tmp_path / "out"))["ps"]
    run = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
           if '"kind": "run"' in line][-1]
    assert row["workers"] == str(run["world"]["workers"]) and row["final acc"] == "unfinished"


def test_an_unfinished_single_worker_run_is_no_baseline(tmp_path, no_figures):
    one = write_run(tmp_path / "one", start(0, workers=1, summary={}), start(1, workers=1))
    two = write_run(tmp_path / "two", start(0, workers=2, summary={}))
    rows = table(build_report([one, two], tmp_path / "out"))
    assert rows["two"]["scaling eff."] == "n/a"


# --- item 13: the scaling baseline is the same config with one worker, or none -----------------

def test_scaling_baseline_is_the_single_worker_run_of_the_same_config(tmp_path, no_figures):
    a = write_run(tmp_path / "a-np1-b32", start(0, workers=1, batch_size=32, summary={
        "samples_per_s_total": 1000.0}))
    b = write_run(tmp_path / "b-np1-b64", start(0, workers=1, batch_size=64, summary={
        "samples_per_s_total": 15.0}))
    c = write_run(tmp_path / "c-np2-b64", start(0, workers=2, batch_size=64, summary={
        "samples_per_s_total": 40.0}))
    d = write_run(tmp_path / "d-np2-lr", start(0, workers=2, batch_size=64, lr=0.2, summary={
        "samples_per_s_total": 50.0}))
    # differs only in where and how it was recorded: still c's config
    e = write_run(tmp_path / "e-np4-b64", start(0, workers=4, batch_size=64, run_name="e",
                                                out_dir="elsewhere", resume="never", summary={
                                                    "samples_per_s_total": 70.0}))
    report = build_report([a, b, c, d, e], tmp_path / "out")
    rows = table(report)
    x = {f.name: summary_of(f)["samples_per_s_total"] for f in (a, b, c, d, e)}
    assert rows[a.name]["scaling eff."] == eff(x[a.name], 1, x[a.name])      # its own baseline
    assert rows[b.name]["scaling eff."] == eff(x[b.name], 1, x[b.name])
    assert rows[c.name]["scaling eff."] == eff(x[c.name], 2, x[b.name])
    assert rows[e.name]["scaling eff."] == eff(x[e.name], 4, x[b.name])
    assert rows[d.name]["scaling eff."] == "n/a"                   # no np1 run with lr 0.2
    md = report.read_text()
    assert f"scaling eff. of {d.name} is n/a" in md


def test_no_baseline_across_frameworks_or_modes(tmp_path, no_figures):
    torch1 = write_run(tmp_path / "torch1", start(0, workers=1, summary={}))
    tf2 = write_run(tmp_path / "tf2", start(0, workers=2, framework="tensorflow", summary={}))
    ps2 = write_run(tmp_path / "ps2", start(0, workers=2, mode="async", summary={}))
    rows = table(build_report([torch1, tf2, ps2], tmp_path / "out"))
    assert rows["tf2"]["scaling eff."] == "n/a" and rows["ps2"]["scaling eff."] == "n/a"


def test_two_candidate_baselines_give_none_and_say_why(tmp_path, no_figures):
    one_a = write_run(tmp_path / "one-a", start(0, workers=1, summary={
        "samples_per_s_total": 100.0}))
    one_b = write_run(tmp_path / "one-b", start(0, workers=1, summary={
        "samples_per_s_total": 120.0}))
    two = write_run(tmp_path / "two", start(0, workers=2, summary={"samples_per_s_total": 150.0}))
    report = build_report([one_a, one_b, two], tmp_path / "out")
    assert table(report)["two"]["scaling eff."] == "n/a"
    assert "2 single-worker runs have its config (one-a, one-b)" in report.read_text()


# --- item 14: `harness compare` refuses a plan that repeats a run ------------------------------

@pytest.mark.parametrize("flag,value,dup", [("--np", "1,1", "1"), ("--np", "2,02", "2"),
                                            ("--frameworks", "torch,torch", "torch"),
                                            ("--modes", "sync,async,sync", "sync")])
@pytest.mark.parametrize("dry_run", [False, True])
def test_compare_refuses_duplicates_before_anything_runs(tmp_path, monkeypatch, capsys, flag,
                                                         value, dup, dry_run):
    import launchers.runner
    from harness.cli import main

    started = []
    monkeypatch.setattr(launchers.runner, "run", lambda argv, *a, **k: started.append(argv) or 0)
    monkeypatch.setattr(harness.report, "build_report", lambda *a, **k: started.append(a))
    out = tmp_path / "cmp"
    code = main(["compare", flag, value, "--out-dir", str(out),
                 *(["--dry-run"] if dry_run else []), "--", "--model", "mlp"])
    captured = capsys.readouterr()
    assert code == 2
    assert started == [] and not out.exists() and captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and f"{flag} {value!r}" in err and f"lists {dup} twice" in err
    assert "once" in err                                                   # the fix


def test_plan_refuses_a_run_planned_twice(tmp_path):
    from launchers.compare import plan

    with pytest.raises(ConfigError, match="planned twice"):
        plan(["--model", "mlp"], ["torch", "torch"], [1], ["sync"], "horovodrun", tmp_path,
             "python")


def test_harness_report_cli_on_two_folders_named_run(tmp_path):
    from conftest import harness, run

    rep = tmp_path / "rep"
    x = write_run(rep / "x" / "run", start(0, workers=1, summary={"samples_per_s_total": 90.0}))
    y = write_run(rep / "y" / "run", start(0, workers=2, summary={"samples_per_s_total": 120.0}))
    p = run(harness("report", x, y), check=True)
    rows = table(rep / "report.md")               # the folders' common parent by default
    assert set(rows) == {"x/run", "y/run"}
    x1 = summary_of(x)["samples_per_s_total"]
    assert rows["y/run"]["scaling eff."] == eff(summary_of(y)["samples_per_s_total"], 2, x1)
    assert rows["x/run"]["scaling eff."] == eff(x1, 1, x1)
    assert "x/run" in p.stdout and "y/run" in p.stdout


def test_harness_report_does_not_replace_a_report_of_other_runs(tmp_path, no_figures):
    """`harness report cmp/a cmp/b` writes to cmp/ by default, where a comparison's report of
    a, b and c already is: it is refused (the report unchanged) unless --out says where; the
    same runs again, or `harness report cmp/*` (its report.md and figures/ included), rewrite
    it."""
    import argparse

    from launchers.compare import cmd_report

    def report(*runs: Path, out: Path | None = None) -> int:
        return cmd_report(argparse.Namespace(runs=[str(r) for r in runs], out=out))

    cmp = tmp_path / "cmp"
    runs = [write_run(cmp / n, start(0, workers=w, summary={"samples_per_s_total": 90.0 * w}))
            for n, w in (("a", 1), ("b", 2), ("c", 2))]
    assert report(*runs) == 0
    text = (cmp / "report.md").read_text()
    assert text.rstrip().endswith('<!-- harness report of: ["a", "b", "c"] -->')
    with pytest.raises(ConfigError, match=re.escape(f"{cmp / 'report.md'} reports other runs "
                                                    "(a, b, c), and this report would replace "
                                                    "it: give --out FOLDER")):
        report(*runs[:2])
    assert (cmp / "report.md").read_text() == text
    assert report(*runs[:2], out=tmp_path / "ab") == 0
    assert set(table(tmp_path / "ab" / "report.md")) == {"a", "b"}
    (cmp / "figures").mkdir(exist_ok=True)
    assert report(*sorted(cmp.iterdir())) == 0                          # cmp/*
    assert set(table(cmp / "report.md")) == {"a", "b", "c"}
    one = tmp_path / "one"                             # a comparison of one run, one/*
    write_run(one / "a", start(0, workers=1, summary={"samples_per_s_total": 90.0}))
    (one / "report.md").write_text("old\n")
    (one / "figures").mkdir()
    assert report(*sorted(one.iterdir())) == 0
    assert set(table(one / "report.md")) == {"a"} and not (one / "a" / "report.md").exists()
    with pytest.raises(ConfigError, match=re.escape(                    # the comparison's folder
            f"{cmp} is not a result folder: it has no metrics.jsonl (it holds the runs a, b, c: "
            f"give them (`harness report {cmp}/*`))")):
        report(cmp)


# --- every column of the table, read from the latest summary ----------------------------------

MODES = {   # config of the run: the mode column it must show
    "sync": ({"framework": "torch"}, "sync"),
    "fit": ({"framework": "tensorflow", "tf_loop": "fit"}, "sync-fit"),
    "ssp": ({"framework": "torch", "mode": "async", "ps_consistency": "ssp"}, "ps-ssp"),
    "bsp": ({"framework": "tensorflow", "mode": "async", "ps_consistency": "bsp"}, "ps-bsp"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_column_of_a_finished_run_comes_from_its_summary(tmp_path, no_figures, mode):
    cfg, label = MODES[mode]
    folder = write_run(tmp_path / "r", start(0, workers=3, **cfg, summary={
        "final_eval_acc": 0.91234, "best_eval_acc": 0.95678, "time_to_target_s": 12.345,
        "samples_per_s_total": 12345.6, "step_time_p50_s": 0.0123456,
        "step_time_p90_s": 0.0234567, "train_wall_s": 98.76,
        "sent_bytes_per_step": 123456.0}))
    row = table(build_report([folder], tmp_path / "out"))["r"]
    s, run = summary_of(folder), json.loads((folder / "config.json").read_text())
    workers = run["world"].get("workers", run["world"]["size"])
    assert row == {
        "run": "r", "framework": run["config"]["framework"], "mode": label,
        "workers": str(workers),
        "final acc": f"{s['final_eval_acc']:.4f}", "best acc": f"{s['best_eval_acc']:.4f}",
        "time to target (s)": f"{s['time_to_target_s']:.2f}",
        "samples/s total": f"{s['samples_per_s_total']:,.0f}",
        "samples/s/device": f"{s['samples_per_s_per_device']:,.0f}",
        "sent/step (KB)": f"{s['sent_bytes_per_step'] / 1000:,.1f}",
        "step p50 (ms)": f"{s['step_time_p50_s'] * 1000:.2f}",
        "step p90 (ms)": f"{s['step_time_p90_s'] * 1000:.2f}",
        "scaling eff.": "n/a",                           # no single-worker run in the report
        "train wall (s)": f"{s['train_wall_s']:.1f}"}


def test_values_that_were_not_measured_show_as_n_a(tmp_path, no_figures):
    # a run that never reached its target, and whose throughput was not measured
    folder = write_run(tmp_path / "r", start(0, summary={
        "time_to_target_s": None, "samples_per_s_total": None, "step_time_p50_s": None,
        "step_time_p90_s": None, "best_eval_acc": float("nan")}))
    row = table(build_report([folder], tmp_path / "out"))["r"]
    for col in ("time to target (s)", "samples/s total", "samples/s/device", "step p50 (ms)",
                "step p90 (ms)", "best acc", "scaling eff."):
        assert row[col] == "n/a", col
    assert row["final acc"] == f"{summary_of(folder)['final_eval_acc']:.4f}"


def section(report: Path, title: str) -> dict[str, dict[str, str]]:
    """The table under ``## title`` in report.md, as {run: {column: cell}}."""
    lines = report.read_text().splitlines()
    at = lines.index(f"## {title}")
    first = next(i for i in range(at, len(lines)) if lines[i].startswith("| run |"))
    header = [c.strip() for c in lines[first].strip("|").split("|")]
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def ps_table(report: Path) -> dict[str, dict[str, str]]:
    """The parameter-server table of report.md, as {row name: {column: cell}}."""
    return section(report, "Parameter-server runs")


PS_SUMMARY = {"updates_per_s": 4321.5, "staleness_histogram": {"0": 5, "1": 3, "4": 1},
              "staleness_mean": 0.77777, "staleness_p99": 3.92, "staleness_max": 4,
              "max_clock_lead": 3, "push_pull_latency_p50_s": 0.00123456,
              "push_pull_latency_p99_s": 0.0098765, "failed_workers": {}}


def test_parameter_server_table_comes_from_the_summary(tmp_path, no_figures):
    folder = write_run(tmp_path / "ps", start(0, workers=2, mode="async", summary=PS_SUMMARY))
    s = summary_of(folder)
    assert ps_table(build_report([folder], tmp_path / "out"))["ps"] == {
        "run": "ps", "updates/s": f"{s['updates_per_s']:,.0f}",
        "staleness mean": f"{s['staleness_mean']:.2f}", "p99": f"{s['staleness_p99']:.1f}",
        "max": str(s["staleness_max"]), "max clock lead": str(s["max_clock_lead"]),
        "push/pull p50 (ms)": f"{s['push_pull_latency_p50_s'] * 1000:.2f}",
        "p99 (ms)": f"{s['push_pull_latency_p99_s'] * 1000:.2f}", "failed workers": "none"}


def test_a_worker_that_joined_is_listed_under_the_parameter_server_table(tmp_path, no_figures):
    joined = {"4": {"slot": 2, "from_clock": 9, "at_version": 31, "host": "node7", "clock": 132,
                    "state": "done"}}
    folder = write_run(tmp_path / "ps", start(0, workers=2, mode="async", summary={
        **PS_SUMMARY, "joined_workers": joined}))
    text = (build_report([folder], tmp_path / "out")).read_text()
    assert ("- ps: worker 4 joined from node7 at update 31 in the place of slot 2 (from clock "
            "9); it ended at clock 132, done") in text


def test_parameter_server_latency_not_measured_shows_as_n_a(tmp_path, no_figures):
    folder = write_run(tmp_path / "ps", start(0, workers=2, mode="async", summary={
        **PS_SUMMARY, "push_pull_latency_p50_s": None, "push_pull_latency_p99_s": None}))
    row = ps_table(build_report([folder], tmp_path / "out"))["ps"]
    assert row["push/pull p50 (ms)"] == "n/a" and row["p99 (ms)"] == "n/a"


# --- a user's own task: its metric names, and whether its runs started from the same weights --

def task_start(framework: str, canonical: bool, checksum: float, first_loss: float,
               **summary_fields) -> list[dict]:
    """One finished start of a regression task (mse loss, mae metric) in ``framework``."""
    records = start(0, framework=framework, summary={"final_eval_loss": 0.5,
                                                     "final_eval_mae": 0.25, **summary_fields})
    records[0]["model"] = {"name": "diabetes_mlp", "parameters": 10, "flops_per_sample": 0,
                           "loss": "mse", "metrics": ["mae"], "canonical": canonical,
                           "initial_weights_checksum": checksum if canonical else None}
    records[1]["loss"] = first_loss                              # the step-1 record
    return records


def test_a_tasks_report_names_its_own_loss_and_metrics_and_checks_fidelity(tmp_path,
                                                                           no_figures):
    runs = [write_run(tmp_path / fw, task_start(fw, True, 1.5, 0.7 + d))
            for fw, d in (("torch", 0.0), ("tensorflow", 4e-6))]
    report = build_report(runs, tmp_path / "out")
    rows, md = table(report), report.read_text()
    assert rows["torch"]["final mse"] == "0.5000" and rows["torch"]["final mae"] == "0.2500"
    assert not any("acc" in column for column in rows["torch"])     # no accuracy columns
    assert "Model **diabetes_mlp**" in md
    assert "same initial weights (canonical checksum 1.5)" in md
    assert re.search(r"- 1 worker\(s\): torch 0\.7000000, tensorflow 0\.7000040: spread 4e-06, "
                     r"agree", md), md
    # first losses further apart than 1e-5 are reported as a difference
    far = write_run(tmp_path / "far", task_start("tensorflow", True, 1.5, 0.7 + 3e-5))
    md = build_report([runs[0], far], tmp_path / "out2").read_text()
    assert "spread 3e-05, DIFFER" in md


def test_a_task_without_a_canonical_layout_is_reported_as_starting_from_other_weights(
        tmp_path, no_figures):
    a = write_run(tmp_path / "torch", task_start("torch", False, 0.0, 0.7))
    b = write_run(tmp_path / "tensorflow", task_start("tensorflow", False, 0.0, 0.9))
    md = build_report([a, b], tmp_path / "out").read_text()
    assert "The initial weights differ: torch, tensorflow initialised with the framework's own" \
        in md and "agree" not in md
    old = [write_run(tmp_path / fw / "old", task_start(fw, True, 1.5, 0.7)) for fw in
           ("torch", "tensorflow")]
    for run_dir in old:                      # runs recorded before the model entry said more
        text = (run_dir / "metrics.jsonl").read_text().replace('"canonical": true, ', "")
        (run_dir / "metrics.jsonl").write_text(text)
    md = build_report(old, tmp_path / "out3").read_text()
    assert "Not checked: torch/old, tensorflow/old recorded no initial-weight layout" in md
    c = write_run(tmp_path / "other", task_start("tensorflow", True, 2.5, 0.7))
    d = write_run(tmp_path / "first", task_start("torch", True, 1.5, 0.7))
    md = build_report([d, c], tmp_path / "out2").read_text()
    assert "checksums are 1.5, 2.5" in md


# --- issue 16: where each step's time goes ------------------------------------------------------

def breakdown(data: float, compute: float, exchange: float | None, harness: float,
              compute_range: tuple[float, float] | None = None) -> dict:
    parts = {"data": data, "compute": compute, "exchange": exchange, "harness": harness}
    ranks = {p: [v, v] for p, v in parts.items()}
    if compute_range:
        ranks["compute"] = list(compute_range)
    return {**{f"{p}_s": v for p, v in parts.items()}, "ranks_s": ranks}


def test_the_report_explains_each_runs_scaling_efficiency_from_its_step_breakdown(tmp_path):
    one = write_run(tmp_path / "one", start(0, workers=1, summary={
        "samples_per_s_total": 1000.0, "startup_s": 3.5, "first_step_s": 0.8,
        "time_breakdown": breakdown(0.0001, 0.0020, 0.0, 0.0001)}))
    two = write_run(tmp_path / "two", start(0, workers=2, summary={
        "samples_per_s_total": 1500.0, "startup_s": 4.0, "first_step_s": 0.9,
        "time_breakdown": breakdown(0.0001, 0.0021, 0.0008, 0.0001, (0.0020, 0.0030))}))
    md = build_report([one, two], tmp_path / "out", show=False).read_text()
    section = md.split("## Where each step's time goes", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("- **two**"))
    assert "a step takes 3.10 ms on rank 0" in line
    assert "exchange 0.80 ms (26%)" in line
    assert "Scaling efficiency 0.75 against one, whose step took 2.20 ms" in line  # 1500/2000
    assert "exchange +0.80 ms" in line and "compute +0.10 ms" in line
    assert "the loss is mostly exchange" in line
    assert "compute over the ranks 2.00-3.00 ms (a straggler)" in line
    assert "Start-up before the training loop: 4.0 s" in line
    assert "first step took 900 ms" in line
    assert (tmp_path / "out" / "figures" / "breakdown.png").exists()
    assert "![breakdown](figures/breakdown.png)" in md


def test_a_path_that_cannot_separate_the_exchange_says_so(tmp_path, no_figures):
    run = write_run(tmp_path / "tape", start(0, workers=2, summary={
        "time_breakdown": breakdown(0.0001, None, None, 0.0001)}))
    md = build_report([run], tmp_path / "out", show=False).read_text()
    assert "not separable" in md


def test_parameter_server_runs_are_explained_from_their_step_and_push_pull_times(tmp_path,
                                                                                no_figures):
    ps = {"mode": "async", "ps_consistency": "async"}
    one = write_run(tmp_path / "ps1", start(0, workers=1, summary={
        "samples_per_s_total": 1000.0, "step_time_p50_s": 0.002, "push_pull_latency_p50_s": 0.0005,
        "staleness_mean": 0.0, "staleness_histogram": {"0": 10}}, **ps))
    two = write_run(tmp_path / "ps2", start(0, workers=2, summary={
        "samples_per_s_total": 1200.0, "step_time_p50_s": 0.004, "push_pull_latency_p50_s": 0.001,
        "staleness_mean": 0.9, "staleness_histogram": {"0": 5, "1": 5}}, **ps))
    md = build_report([one, two], tmp_path / "out", show=False).read_text()
    line = next(x for x in md.splitlines() if x.startswith("- **ps2**"))
    assert "takes 4.00 ms, the round trip 1.00 ms (25%; medians)" in line
    assert "staleness 0.90 versions" in line
    assert "Scaling efficiency 0.60 against ps1: step +2.00 ms, push/pull wait +0.50 ms" in line


# --- issue 17: compressed runs against their dense twins --------------------------------------



def test_each_compressed_run_is_set_against_the_dense_run_of_its_config(tmp_path, no_figures):
    dense = {"final_eval_acc": 0.97, "sent_bytes_per_step": 150_000.0,
             "samples_per_s_total": 20_000.0}
    write_run(tmp_path / "dense", start(0, workers=2, summary=dense, model="cnn"))
    write_run(tmp_path / "topk", start(0, workers=2, model="cnn", compression="topk",
                                       summary={"final_eval_acc": 0.955,
                                                "sent_bytes_per_step": 3_000.0,
                                                "samples_per_s_total": 16_000.0}))
    write_run(tmp_path / "psgd-lr", start(0, workers=2, model="cnn", compression="powersgd",
                                          powersgd_rank=2, lr=0.2,
                                          summary={"final_eval_acc": 0.96}))
    build_report([tmp_path / n for n in ("dense", "topk", "psgd-lr")], tmp_path)
    rows = section(tmp_path / "report.md", "Gradient compression")
    assert rows["topk"]["compression"] == "topk 1%"
    assert rows["topk"]["vs dense (points)"] == "-1.5"
    assert rows["topk"]["of dense"] == "0.020"
    assert rows["topk"]["vs dense"] == "0.80"
    # another lr is another experiment: no dense twin, said so
    assert rows["psgd-lr"]["compression"] == "powersgd r2"
    assert rows["psgd-lr"]["vs dense (points)"] == "n/a"
    assert "No dense run with the same config for psgd-lr" in (tmp_path / "report.md").read_text()
    assert table(tmp_path / "report.md")["topk"]["sent/step (KB)"] == "3.0"


def test_a_compressed_run_on_another_path_than_its_dense_run_says_so(tmp_path, no_figures):
    """Found by a new-user hunt: under allreduce = 'auto', fp16 keeps Horovod while the dense
    run takes mpi4py, and the table's samples/s ratio held the paths' difference unsaid."""
    folders = []
    for name, compression, path in (("dense", "none", "mpi"), ("fp16", "fp16", "horovod"),
                                    ("topk", "topk", "mpi")):
        records = start(0, workers=2, model="cnn", compression=compression,
                        summary={"samples_per_s_total": 20_000.0})
        records[0]["backend"]["gradient_path"] = path
        folders.append(write_run(tmp_path / name, records))
    text = build_report(folders, tmp_path / "out").read_text()
    assert "The gradient path differs from the dense run's (fp16 ran on horovod, its dense " \
        "run dense on mpi): its samples/s ratio includes" in text
    assert "topk ran on" not in text


def test_a_report_without_compressed_runs_has_no_compression_section(tmp_path, no_figures):
    write_run(tmp_path / "a", start(0, workers=2, summary={}))
    build_report([tmp_path / "a"], tmp_path)
    assert "## Gradient compression" not in (tmp_path / "report.md").read_text()


def test_an_elastic_run_is_reported_per_segment_of_constant_size(tmp_path, no_figures):
    elastic = {"global_batch": 96, "start_ranks": 3, "min_ranks": 1, "commit_every": 10,
               "resets": [{"step": 14, "epoch": 2, "old_size": 3, "new_size": 2,
                           "reason": "rank lost", "wall_s": 10.5, "steps_redone": 5}],
               "segments": [{"world_size": 3, "start_step": 0, "start_wall_s": 0.0,
                             "end_step": 19, "end_wall_s": 1.9, "steps": 19,
                             "samples_per_s": 960.0},
                            {"world_size": 2, "start_step": 14, "start_wall_s": 10.6,
                             "end_step": 42, "end_wall_s": 13.4, "steps": 28,
                             "samples_per_s": 960.0}]}
    folder = write_run(tmp_path / "el", start(0, workers=2, summary={"elastic": elastic}))
    text = (build_report([folder], tmp_path / "out")).read_text()
    section = text[text.index("## Elastic runs"):]
    assert "| el | 3 | 0-19 | 0.0-1.9 | 960 | 320 |" in section
    assert "| el | 2 | 14-42 | 10.6-13.4 | 960 | 480 |" in section
    assert "- el: rank lost at 10.5 s: 3 -> 2 ranks, from step 14, 5 step(s) redone" in section
    # found by a new-user hunt: the main table's row mixes the sizes without a word
    assert f"- {folder} is an elastic run that trained at 3 -> 2 ranks: its row mixes them" \
        in text
    plain = write_run(tmp_path / "plain", start(0, workers=2, summary={}))
    plain_text = build_report([plain], tmp_path / "out2").read_text()
    assert "## Elastic runs" not in plain_text and "elastic run" not in plain_text


def test_a_language_model_report_shows_perplexity_and_tokens(tmp_path):
    records = start(0, summary={"final_eval_perplexity": 7.12345, "final_eval_acc": 0.49,
                                "tokens_per_s_total": 81234.5,
                                "tokens_per_s_per_device": 81234.5},
                    model="gpt", dataset="pysource")
    records[0]["model"].update(name="gpt", metrics=["acc"], tokens_per_sample=64)
    records[0]["data"] = {**DATA, "name": "pysource", "unigram_test_perplexity": 22.9922}
    records = [{**r, "eval_perplexity": 9.5} if r["kind"] == "epoch" else r for r in records]
    folder = write_run(tmp_path / "r", records)
    report = build_report([folder], tmp_path / "out")
    row = table(report)["r"]
    assert row["final perplexity"] == "7.123" and row["final acc"] == "0.4900"
    assert row["tokens/s total"] == "81,234" and row["tokens/s/device"] == "81,234"
    assert not {"samples/s total", "best acc", "time to target (s)"} & set(row)
    assert "unigram baseline (the training text's byte frequencies) has test perplexity " \
        "22.992" in report.read_text()
    assert (tmp_path / "out" / "figures" / "curves.png").is_file()
    # a gpt of another size is named under the table
    wider = [dict(r) for r in records]
    wider[0] = {**wider[0], "config": {**wider[0]["config"], "gpt_dim": 128}}
    report = build_report([folder, write_run(tmp_path / "w", wider)], tmp_path / "out2")
    assert "gpt_dim differs between runs: 128, 64" in report.read_text()


def test_lines_of_metrics_jsonl_that_are_not_records_are_skipped(tmp_path, no_figures):
    """A line that is JSON but not a record (a list, a number, an object without a kind) is
    skipped like a torn line, instead of crashing the report."""
    folder = write_run(tmp_path / "r", start(0, epochs=1, summary={"final_eval_acc": 0.9}))
    with (folder / "metrics.jsonl").open("a") as f:
        f.write("[1, 2]\n7\n{\"no\": \"kind\"}\n")
    assert table(build_report([folder], tmp_path / "out"))["r"]["final acc"] == "0.9000"


def test_a_run_with_an_injected_fault_is_marked_in_the_report(tmp_path, no_figures, monkeypatch):
    """Found by a new-user hunt: a drill's run (HARNESS_FAULT, e.g. a 0.25 s/step straggler)
    sat in a report beside ordinary runs with nothing to say why it was 250x slower."""
    from harness.driver import start_record
    from harness.metrics import MetricsWriter

    class Data:
        def fingerprint(self):
            return DATA

    monkeypatch.setenv("HARNESS_FAULT", "slow@1:1")
    folder = tmp_path / "drill"
    folder.mkdir()
    rec = start_record(folder, MetricsWriter(None), RunConfig(), {}, Data(), {"size": 1},
                       {}, None)
    assert rec["fault"] == "slow@1:1"
    assert json.loads((folder / "config.json").read_text())["fault"] == "slow@1:1"
    monkeypatch.delenv("HARNESS_FAULT")
    assert "fault" not in start_record(folder, MetricsWriter(None), RunConfig(), {}, Data(),
                                       {"size": 1}, {}, None)

    drill = start(0, preempted_at=2)
    drill[0]["fault"] = "slow@1:1"          # resumed without it: the first start's steps count
    report = build_report([write_run(tmp_path / "a", drill, start(1, summary={})),
                           write_run(tmp_path / "b", start(0, summary={}))],
                          tmp_path / "rep", show=False)
    md = report.read_text()
    assert f"- {tmp_path / 'a'} ran with an injected fault (HARNESS_FAULT=slow@1:1)" in md
    assert md.count("- injected fault: `HARNESS_FAULT=slow@1:1`") == 1


def test_a_report_says_when_the_runs_took_different_gradient_paths(tmp_path, no_figures):
    """allreduce = auto gives PyTorch mpi4py and TensorFlow Horovod at 2 ranks on CPU: the
    comparison says so under its table (1-rank runs exchange nothing and are not named)."""
    folders = []
    for fw, workers, path in (("torch", 2, "mpi"), ("tensorflow", 2, "horovod"),
                              ("torch", 1, "local")):
        records = start(0, workers=workers, summary={}, framework=fw)
        records[0]["backend"]["gradient_path"] = path
        folders.append(write_run(tmp_path / f"{fw}{workers}", records))
    text = build_report(folders, tmp_path / "out").read_text()
    assert "the gradient path differs between runs: tensorflow2 horovod, torch2 mpi " \
        "(allreduce = 'auto'" in text
    same = build_report(folders[:1] + folders[2:], tmp_path / "out2").read_text()
    assert "gradient path differs" not in same
