"""Datasets, npz loading (memory-mapped when uncompressed) and rank sharding."""

from pathlib import Path

import numpy as np
import pytest

from harness.data import Sharder, gather, load_dataset, load_npz
from harness.errors import ConfigError, DataError


def arrays(n=40, shape=(4, 4, 1), classes=3):
    rng = np.random.default_rng(0)
    return {"x_train": rng.random((n, *shape), dtype=np.float32),
            "y_train": rng.integers(0, classes, n), "x_test": rng.random((10, *shape),
                                                                           dtype=np.float32),
            "y_test": rng.integers(0, classes, 10)}


def test_digits_is_bundled_and_split():
    d = load_dataset("digits", (8, 8, 1), 10)
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
    assert d.num_classes == 10


def test_digits_read_from_the_csv_equal_scikit_learns_and_load_without_importing_it():
    """The bundled CSV is read directly (scikit-learn's import cost every rank 2.3 s); the
    arrays are scikit-learn's own, bit for bit, in the split every earlier run used."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    d, ref = load_dataset("digits", (8, 8, 1), 10), load_digits()
    x = (ref.images.astype(np.float32) / 16.0)[..., None]
    order = np.random.default_rng(20240601).permutation(len(x))
    np.testing.assert_array_equal(d.x_test, x[order[:360]])
    np.testing.assert_array_equal(d.x_train, x[order[360:]])
    np.testing.assert_array_equal(d.y_train, ref.target[order[360:]])
    np.testing.assert_array_equal(d.y_test, ref.target[order[:360]])
    assert d.y_train.dtype == np.int64
    code = ("import sys; from harness.data import load_dataset; "
            "load_dataset('digits', (8, 8, 1), 10); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_digits_come_from_scikit_learns_loader_where_its_file_is_not_found(monkeypatch):
    import importlib.util

    from harness.data import _digits_table

    found = _digits_table()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    np.testing.assert_array_equal(_digits_table(), found)


def test_uncompressed_npz_is_memory_mapped(tmp_path):
    a = arrays()
    np.savez(tmp_path / "d.npz", **a)
    d = load_npz(tmp_path / "d.npz")
    assert isinstance(d.x_train, np.memmap)
    np.testing.assert_array_equal(np.asarray(d.x_train), a["x_train"])
    np.testing.assert_array_equal(d.y_test, a["y_test"])
    np.savez_compressed(tmp_path / "c.npz", **a)
    c = load_npz(tmp_path / "c.npz")
    np.testing.assert_array_equal(c.x_train, a["x_train"])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), "missing array"),
    (lambda a: a.update(y_train=a["y_train"][:5]), "y_train has shape"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "labels must be integer"),
    (lambda a: a.update(x_test=np.zeros((10, 5, 4, 1), np.float32)), "must match"),
    (lambda a: a.update(x_train=np.zeros((40, 4, 4), np.float32)), "expected \\(N, features\\)"),
    (lambda a: a.update(y_train=-a["y_train"] - 1), "labels must be >= 0"),
    (lambda a: a.update(x_train=np.array(["a"] * 40)), "numeric dtype"),
    (lambda a: a["x_train"].__setitem__((5, 0), np.nan),
     "x_train holds NaN/Inf .first in sample 5"),
    (lambda a: a["x_test"].__setitem__((2, 1), np.inf), "x_test holds NaN/Inf .first in sample 2"),
])
def test_bad_npz_arrays(tmp_path, change, message):
    a = arrays()
    change(a)
    np.savez(tmp_path / "d.npz", **a)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "d.npz")


def test_missing_or_non_npz_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(DataError, match="not an .npz file"):
        load_npz(tmp_path / "x.npz")


def test_sharding_two_ranks_equals_one_rank_with_double_batch():
    one = Sharder(100, 8, 0, 1, seed=3, shuffle=True)
    two = [Sharder(100, 4, r, 2, seed=3, shuffle=True) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 12
    for epoch in range(2):
        for step in range(12):
            both = np.concatenate([s.indices(epoch, step) for s in two])
            np.testing.assert_array_equal(both, one.indices(epoch, step))
    assert not np.array_equal(one.indices(0, 0), one.indices(1, 0))   # reshuffled per epoch


def test_more_ranks_than_samples_is_refused():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        Sharder(10, 4, 0, 4, seed=0, shuffle=True)


def test_gather_makes_contiguous_float32():
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    xb, yb = gather(x, np.arange(6), np.array([4, 1]))
    assert xb.dtype == np.float32 and xb.flags.c_contiguous and list(yb) == [4, 1]
