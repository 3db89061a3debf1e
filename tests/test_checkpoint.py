"""Checkpoints: atomic writes, safe loads, fallback to the previous good one."""

import errno
import os

import numpy as np
import pytest

from harness import checkpoint as ck
from harness.errors import CheckpointError, TrainingAborted


def make(step, value=1.0):
    return ck.Checkpoint({"position": {"step": step}, "framework": "torch", "model": "mlp"},
                         {"fc1.weight": np.full((2, 3), value, np.float32)},
                         {"0/momentum_buffer": np.zeros(3, np.float32)})


def test_save_load_and_retention(tmp_path):
    for step in (10, 20, 30):
        ck.save(tmp_path, make(step, step))
    assert [p.name for p in ck.latest_paths(tmp_path)] == ["ckpt-000000030.npz",
                                                           "ckpt-000000020.npz"]
    c = ck.load_latest(tmp_path)
    assert c.step == 30 and c.weights["fc1.weight"][0, 0] == 30
    assert not list(tmp_path.glob(".*tmp"))


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    ck.save(tmp_path, make(10))
    newest = ck.save(tmp_path, make(20))
    newest.write_bytes(newest.read_bytes()[:100])      # truncated
    warnings = []
    c = ck.load_latest(tmp_path, warn=warnings.append)
    assert c.step == 10 and "corrupt or truncated" in warnings[0]


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "ckpt-000000005.npz").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ck.load_latest(tmp_path)


def test_pickled_payload_is_not_executed(tmp_path):
    path = tmp_path / "ckpt-000000001.npz"
    np.savez(path, **{"meta.json": np.frombuffer(b'{"format_version": 1}', np.uint8),
                      "w/evil": np.array([object()], dtype=object)})
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load(path)


def test_nan_weights_are_never_saved(tmp_path):
    ck.save(tmp_path, make(10))
    bad = make(20)
    bad.weights["fc1.weight"][0, 0] = np.nan
    with pytest.raises(TrainingAborted, match=r"NaN/Inf values \(the previous checkpoint, "
                       r"ckpt-000000010.npz, is kept\)"):
        ck.save(tmp_path, bad)
    assert [p.name for p in ck.latest_paths(tmp_path)] == ["ckpt-000000010.npz"]
    with pytest.raises(TrainingAborted, match=r"\(no checkpoint was written before it\)"):
        ck.save(tmp_path / "fresh", bad)            # it claimed a previous one was kept


def test_disk_full_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    ck.save(tmp_path, make(10))
    real = np.savez

    def full(f, **kw):
        real(f, **kw)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(CheckpointError, match="disk is full.*ckpt-000000010.npz is intact"):
        ck.save(tmp_path, make(20))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000010.npz"]


def test_unwritable_folder_is_detected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        ck.check_writable(blocker / "checkpoints")


def test_incompatible_checkpoint(tmp_path):
    c = make(1)
    with pytest.raises(CheckpointError, match="framework = 'torch'.*'tensorflow'"):
        ck.check_compatible(c, {"framework": "tensorflow"})
