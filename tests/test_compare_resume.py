"""harness compare under preemption: a preempted run stops the comparison (exit 75); the same
command with --resume continues it in its out-dir (issue 12, item 16; slurm/compare.sbatch)."""

import argparse

import pytest

from harness.errors import ConfigError
from launchers.compare import cmd_compare


def test_compare_stops_at_a_preempted_run_and_resume_continues(tmp_path, monkeypatch):
    import harness.report
    import launchers.runner

    calls = []

    def fake_run(argv):
        calls.append(argv)
        return 75 if len(calls) == 1 else 0          # the first run is preempted

    monkeypatch.setattr(launchers.runner, "run", fake_run)
    monkeypatch.setattr(harness.report, "build_report", lambda *a, **k: None)
    out = tmp_path / "cmp"
    ns = argparse.Namespace(config=None, frameworks="torch", np="1,2", modes="sync",
                            compression=None, launcher="mpirun", out_dir=str(out),
                            dry_run=False, resume=False, train_args=["--", "--model", "mlp"])
    assert cmd_compare(ns) == 75 and len(calls) == 1          # the second run never started
    (out / "torch-sync-np1").mkdir(parents=True)             # what the first run left
    with pytest.raises(ConfigError, match="add --resume"):
        cmd_compare(ns)
    ns.resume = True
    assert cmd_compare(ns) == 0
    assert [a[a.index("--run-name") + 1] for a in calls[1:]] == ["torch-sync-np1",
                                                                 "torch-sync-np2"]
    assert [a[a.index("--resume") + 1] for a in calls] == ["never", "auto", "auto"]
