"""Frameworks' start-up notices kept off the terminal, the harness's own lines left alone.

TensorFlow logs its oneDNN and CPU-feature notices through absl while its shared libraries load,
before it reads ``TF_CPP_MIN_LOG_LEVEL``, so the variable alone does not silence them: every
TensorFlow rank printed them twice, between the harness's lines. ``native_log_filter`` sends
file descriptor 2 to a temporary file while the import runs, then writes back every line that
the log level lets through (and everything that is not a TensorFlow log line: a real error
still shows). The level is the user's ``TF_CPP_MIN_LOG_LEVEL`` when set, else the harness's 2
(INFO and WARNING off), TensorFlow's own meaning of the variable.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

#: what the harness sets when the user did not: INFO and WARNING lines off, errors shown
DEFAULT_TF_LOG_LEVEL = "2"
#: ``I0000 00:00:1795777102.233564   20899 port.cc:153] oneDNN custom operations are on...``
_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
#: absl's preface to the first line logged before its initialisation
_ABSL_PREFACE = "WARNING: All log messages before absl::InitializeLog() is called are written " \
                "to STDERR"
#: the second line of cpu_feature_guard's INFO notice
_CONTINUATION = "To enable the following instructions:"


def tf_log_level() -> int:
    """The level in effect: the user's TF_CPP_MIN_LOG_LEVEL, else the harness's default (set
    now, so that every later TensorFlow import and the ranks started from here see it)."""
    value = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_LOG_LEVEL)
    try:
        return int(value)
    except ValueError:
        return 0             # TensorFlow reads a non-number as 0: everything shows


def keep_line(line: str, level: int) -> bool:
    """Whether a line written during the import still reaches the terminal at ``level``."""
    m = _LOG_LINE.match(line)
    if m:
        return _SEVERITY[m.group(1)] >= level
    if line.startswith(_ABSL_PREFACE) or line.startswith(_CONTINUATION):
        return level < 1
    return True


@contextmanager
def native_log_filter(level: int | None = None) -> Iterator[None]:
    """While the block runs, native code's stderr lines below ``level`` are dropped."""
    level = tf_log_level() if level is None else level
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if keep_line(ln, level)]
            if kept:
                os.write(2, "".join(kept).encode())

