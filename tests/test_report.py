"""Comparison runs and reports: figures render, table numbers match the JSONL, incomparable
runs are refused."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import harness, needs_horovod, needs_mpi, read_jsonl, run

pytestmark = [needs_horovod, needs_mpi, pytest.mark.mpi]

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "compare"
    # mpirun starts the sync runs' Horovod as horovodrun does, in less time (horovodrun's
    # launch lines: test_compare_plan; real horovodrun runs: test_sync, test_tasks)
    p = run(harness("compare", "--frameworks", "torch,tensorflow", "--np", "1,2", "--modes",
                    "sync,async", "--launcher", "mpirun", "--out-dir", out, "--", "--model",
                    "mlp", "--epochs", "2",
                    "--momentum", "0.5", "--target-accuracy", "0.8"), timeout=600, check=True)
    return out, p.stdout


def parse_table(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[0] in ("run",) + tuple(rows) or \
                len(cells) != len(header):
            continue
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_compare_writes_report_with_valid_figures(comparison):
    out, stdout = comparison
    md = (out / "report.md").read_text()
    figs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert {"figures/curves.png", "figures/throughput.png", "figures/scaling.png",
            "figures/staleness.png"} <= set(figs)
    for f in figs:
        data = (out / f).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, f
    assert "torch-sync-np2" in stdout and "scaling eff." in stdout      # terminal table
    assert "## Runs: environment and commands" in md and "mpirun -np 2" in md
    assert "figures/breakdown.png" in figs
    # every sync run explained from its step breakdown, the 2-rank ones against their 1-rank run
    section = md.split("## Where each step's time goes", 1)[1].split("\n## ", 1)[0]
    for fw in ("torch", "tensorflow"):
        assert f"- **{fw}-sync-np1**: a step takes" in section
        line = next(x for x in section.splitlines() if x.startswith(f"- **{fw}-sync-np2**"))
        assert "Scaling efficiency" in line and "exchange" in line and "Start-up" in line
    for fw in ("torch", "tensorflow"):
        line = next(x for x in section.splitlines() if x.startswith(f"- **{fw}-ps-2w**"))
        assert "push and pull round trip" in line and "Scaling efficiency" in line
    # the command as launched, not the path of harness/__main__.py
    assert re.search(r"rank 0 command: `\S*python\S* -m harness train ", md), md
    assert "__main__.py" not in md
    # TensorBoard: one event folder per run, under the comparison folder
    assert {p.parent.parent.name for p in out.glob("*/tb/events.out.tfevents.*")} == \
        {f"{fw}-{m}" for fw in ("torch", "tensorflow")
         for m in ("sync-np1", "sync-np2", "ps-1w", "ps-2w")}


def test_built_in_models_start_equal_in_both_frameworks_and_their_first_losses_agree(
        comparison):
    """The built-in models are tasks with a canonical weight layout: the report's fidelity
    check compares the sync runs' step-1 losses for each number of workers."""
    out, _ = comparison
    md = (out / "report.md").read_text()
    fidelity = md[md.index("## Fidelity"):].split("\n## ")[0]
    assert "Every run starts from the same initial weights" in fidelity
    lines = [line for line in fidelity.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == ["- 1 worker(s)", "- 2 worker(s)"]
    assert all(line.endswith(", agree") for line in lines), lines


def test_table_numbers_come_from_the_jsonl(comparison):
    out, _ = comparison
    rows = parse_table((out / "report.md").read_text())
    assert set(rows) == {"torch-sync-np1", "torch-sync-np2", "tensorflow-sync-np1",
                         "tensorflow-sync-np2", "torch-ps-1w", "torch-ps-2w",
                         "tensorflow-ps-1w", "tensorflow-ps-2w"}
    summaries = {}
    for name, row in rows.items():
        s = [r for r in read_jsonl(out / name / "metrics.jsonl") if r["kind"] == "summary"][-1]
        summaries[name] = s
        assert row["final acc"] == f"{s['final_eval_acc']:.4f}"
        assert row["samples/s total"] == f"{s['samples_per_s_total']:,.0f}"
        assert row["step p50 (ms)"] == f"{s['step_time_p50_s'] * 1000:.2f}"
        tt = s["time_to_target_s"]
        assert row["time to target (s)"] == ("n/a" if tt is None else f"{tt:.2f}")
    for fw in ("torch", "tensorflow"):
        x1 = summaries[f"{fw}-sync-np1"]["samples_per_s_total"]
        x2 = summaries[f"{fw}-sync-np2"]["samples_per_s_total"]
        assert rows[f"{fw}-sync-np2"]["scaling eff."] == f"{x2 / (2 * x1):.3f}"


def test_report_from_existing_folders_and_refusal_of_incomparable_runs(comparison, tmp_path):
    out, _ = comparison
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(out / "torch-sync-np2", a)
    shutil.copytree(out / "tensorflow-sync-np2", b)
    run(harness("report", a, b, "--out", tmp_path / "rep"), check=True)
    assert (tmp_path / "rep" / "report.md").exists()
    # a run of another model on the same data is not comparable
    c = tmp_path / "c"
    shutil.copytree(out / "torch-sync-np1", c)
    text = (c / "metrics.jsonl").read_text().replace('"model": "mlp"', '"model": "cnn"') \
        .replace('"name": "mlp"', '"name": "cnn"')
    (c / "metrics.jsonl").write_text(text)
    p = run(harness("report", a, c, "--out", tmp_path / "bad"))
    assert p.returncode == 2 and "not comparable" in p.stderr and "'cnn'" in p.stderr
    assert not (tmp_path / "bad" / "report.md").exists()
    p = run(harness("report", tmp_path))
    assert p.returncode == 2 and "no metrics.jsonl" in p.stderr
