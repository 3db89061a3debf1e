"""Quiet logs: TensorFlow's start-up notices filtered by TF_CPP_MIN_LOG_LEVEL (the user's, else
2), everything else written during the import kept; TensorBoard without TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import PY, REPO, have, run
from harness.quiet import keep_line, native_log_filter

ONEDNN = ("I0000 00:00:1795777102.233564   20899 port.cc:153] oneDNN custom operations are on. "
          "You may see slightly different numerical results.\n")
ABSL = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n")
WARN = "W0000 00:00:1795777102.233564   20899 some_op.cc:12] a warning\n"
ERROR = "E0000 00:00:1795777102.233564   20899 some_op.cc:12] a real error\n"


def test_lines_below_the_level_are_dropped_and_others_kept():
    assert not keep_line(ONEDNN, 2) and not keep_line(ABSL, 2) and not keep_line(WARN, 2)
    assert keep_line(ERROR, 2) and keep_line("Traceback (most recent call last):\n", 2)
    assert keep_line(WARN, 1) and not keep_line(ONEDNN, 1)
    assert all(keep_line(line, 0) for line in (ONEDNN, ABSL, WARN, ERROR))


def test_the_filter_catches_native_writes_to_fd_2_and_replays_the_rest(capfd):
    with native_log_filter(2):
        for line in (ABSL, ONEDNN, "the user's own line\n", ERROR):
            os.write(2, line.encode())
        print("a Python line", file=sys.stderr)
    err = capfd.readouterr().err
    assert "oneDNN" not in err and "absl" not in err
    assert "the user's own line" in err and "a real error" in err and "a Python line" in err


IMPORT = "from harness.backends.horovod_tf import import_keras; import_keras('keras3')"


def test_hidden_modules_cannot_be_imported_within_and_can_after(tmp_path, monkeypatch):
    from harness.backends.horovod_tf import hidden_modules

    (tmp_path / "hidden_probe.py").write_text("VALUE = 7\n")   # a module nothing imported
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hidden_probe", raising=False)
    with hidden_modules(["hidden_probe", "json"]):
        with pytest.raises(ImportError):
            import hidden_probe  # noqa: F401
        import json                                       # already imported: not hidden
        assert json.dumps(1) == "1"
    import hidden_probe
    assert hidden_probe.VALUE == 7
    sys.modules.pop("hidden_probe")


@pytest.mark.skipif(not have("tensorflow"), reason="TensorFlow is not installed")
@pytest.mark.framework
def test_importing_tensorflow_prints_no_start_up_notices_unless_the_user_asks():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}   # the default
    # ... and Keras loaded without scikit-learn and matplotlib, which stay importable after
    code = (IMPORT + "; import sys; print('sklearn' in sys.modules, 'matplotlib' in sys.modules)"
            "; import sklearn, matplotlib.pyplot; print('importable')")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "oneDNN" not in p.stderr and "absl" not in p.stderr, p.stderr
    assert p.stdout.split() == ["False", "False", "importable"], p.stdout
    p = run([PY, "-c", IMPORT], timeout=120, check=True, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert "oneDNN custom operations are on" in p.stderr, p.stderr     # the user's level


def test_tensorboard_writer_does_not_import_tensorflow(tmp_path):
    code = ("import sys; from pathlib import Path; from harness.tb import TensorBoardWriter; "
            f"w = TensorBoardWriter(Path({str(tmp_path)!r}), 10); "
            "w.record('step', {'time': 1.0, 'step': 1, 'loss': 0.5}); w.close(); "
            "print('tensorflow' in sys.modules)")
    p = run([PY, "-c", code], timeout=60, check=True, cwd=REPO)
    assert p.stdout.strip() == "False"
    assert list(tmp_path.glob("events.out.tfevents.*"))
