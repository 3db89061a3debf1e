"""Datasets as numpy arrays and the rank sharding both frameworks share.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 samples, no download).
* ``synthetic``: seeded random images in the model's input shape (CIFAR/ImageNet-like).
* ``npz``: the user's arrays ``x_train, y_train, x_test, y_test``. Members stored uncompressed
  (``np.savez``) are memory-mapped; compressed ones (``np.savez_compressed``) are read into memory.

Images are channels-last float32 ``(N, H, W, C)``; labels are int64 class indices.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import ConfigError, DataError

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
SYNTHETIC_MEMORY_LIMIT = 2 << 30   # bytes of synthetic training images per rank


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> dict:
        """What makes two runs' data the same, for comparison reports."""
        return {"name": self.name, "train": int(len(self.x_train)), "test": int(len(self.x_test)),
                "input_shape": list(self.input_shape), "classes": self.num_classes}


def load_dataset(name: str, model_input_shape: tuple[int, ...], model_classes: int,
                 data_path: str | None = None, synthetic_samples: int = 1024,
                 seed: int = 0) -> Dataset:
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(model_input_shape, model_classes, synthetic_samples, seed)
    if name == "npz":
        if not data_path:
            raise ConfigError("dataset = 'npz' needs data_path")
        return load_npz(data_path)
    raise ConfigError(f"dataset = {name!r} is not one of 'digits', 'synthetic', 'npz'")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits   # bundled with scikit-learn: no download

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]          # (1797, 8, 8, 1) in [0, 1]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(20240601).permutation(len(x))   # fixed split, any run seed
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def _synthetic(shape: tuple[int, ...], classes: int, n: int, seed: int) -> Dataset:
    per_sample = int(np.prod(shape)) * 4
    if n * per_sample > SYNTHETIC_MEMORY_LIMIT:
        fit = SYNTHETIC_MEMORY_LIMIT // per_sample
        raise ConfigError(f"synthetic_samples = {n} images of shape {shape} need "
                          f"{n * per_sample / 2**30:.1f} GiB per rank: use at most {fit}")
    rng = np.random.default_rng([seed, 7])
    n_test = max(1, min(n // 4, 512))
    x = rng.standard_normal((n + n_test, *shape), dtype=np.float32)
    y = rng.integers(0, classes, n + n_test, dtype=np.int64)
    return Dataset("synthetic", x[:n], y[:n], x[n:], y[n:], classes)


# --- npz -------------------------------------------------------------------------------------

def _mmap_member(path: Path, zf: zipfile.ZipFile, member: str) -> np.ndarray | None:
    """Memory-map an uncompressed .npy member of a zip file; None if it is compressed."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        data_start = info.header_offset + 30 + name_len + extra_len
        f.seek(data_start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise DataError(f"{path}: array {member!r} holds Python objects; save numeric arrays")
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")


def load_npz(path: str | Path) -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data_path {str(p)!r} does not exist: point data_path at an .npz file "
                        f"with arrays {', '.join(ARRAYS)}")
    try:
        zf = zipfile.ZipFile(p)
    except zipfile.BadZipFile:
        raise DataError(f"data_path {str(p)!r} is not an .npz file (np.savez writes one)") from None
    with zf:
        members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
        missing = [a for a in ARRAYS if a not in members]
        if missing:
            raise DataError(f"{p}: missing array(s) {', '.join(missing)}; it has "
                            f"{', '.join(sorted(members)) or 'none'}. Save with "
                            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
        arrays = {}
        with np.load(p, allow_pickle=False) as npz:
            for a in ARRAYS:
                try:
                    arr = _mmap_member(p, zf, members[a])
                    arrays[a] = npz[a] if arr is None else arr   # compressed: read into memory
                except ValueError as e:
                    raise DataError(f"{p}: array {a!r} cannot be read ({e}); save numeric "
                                    "arrays with np.savez") from None
    return _validated(p.name, arrays)


def _validated(name: str, a: dict[str, np.ndarray]) -> Dataset:
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.dtype.kind not in "fiu":
            raise DataError(f"{name}: x_{split} has dtype {x.dtype}; use a numeric dtype "
                            "(float32 preferred)")
        if x.ndim not in (2, 4):
            raise DataError(f"{name}: x_{split} has shape {x.shape}; expected (N, features) or "
                            "channels-last images (N, H, W, C)")
        if y.dtype.kind not in "iu":
            raise DataError(f"{name}: y_{split} has dtype {y.dtype}; labels must be integer "
                            "class indices (e.g. y.astype(np.int64))")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{name}: y_{split} has shape {y.shape} for {len(x)} samples in "
                            f"x_{split}; expected ({len(x)},)")
        if len(x) == 0:
            raise DataError(f"{name}: x_{split} is empty")
        bad = _first_non_finite(x)
        if bad is not None:
            raise DataError(f"{name}: x_{split} holds NaN/Inf (first in sample {bad}); clean or "
                            "impute those values before training")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"{name}: x_train samples have shape {a['x_train'].shape[1:]} but x_test "
                        f"samples {a['x_test'].shape[1:]}; they must match")
    y_train = np.asarray(a["y_train"], dtype=np.int64)
    y_test = np.asarray(a["y_test"], dtype=np.int64)
    lo = min(y_train.min(), y_test.min())
    if lo < 0:
        raise DataError(f"{name}: labels must be >= 0, found {lo}")
    classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(name, a["x_train"], y_train, a["x_test"], y_test, classes)


def _first_non_finite(x: np.ndarray, chunk_bytes: int = 64 << 20) -> int | None:
    """Index of the first sample holding NaN/Inf, read in chunks (x may be memory-mapped)."""
    if x.dtype.kind != "f":
        return None
    per = max(1, chunk_bytes // max(1, x[:1].nbytes))
    for i in range(0, len(x), per):
        ok = np.isfinite(x[i:i + per]).reshape(min(per, len(x) - i), -1).all(axis=1)
        if not ok.all():
            return i + int(np.argmin(ok))
    return None


def check_model_input(model: str, shape: tuple[int, ...]) -> None:
    if model != "mlp" and len(shape) != 3:
        raise DataError(f"model {model!r} needs channels-last images (N, H, W, C) but the data "
                        f"has samples of shape {shape}; use model = 'mlp' or reshape the arrays")


# --- sharding --------------------------------------------------------------------------------

class Sharder:
    """Which samples each rank trains on, identically for both frameworks.

    Step ``s`` of an epoch uses the global batch ``perm[s*G:(s+1)*G]`` (G = batch x ranks) and
    rank ``r`` takes its ``r``-th slice, so np=2 with batch B sees exactly the samples of np=1
    with batch 2B. The permutation depends only on (seed, epoch). The last partial global batch
    is dropped, so every rank runs the same number of steps and none waits forever.
    """

    def __init__(self, n: int, batch: int, rank: int, size: int, seed: int, shuffle: bool) -> None:
        self.n, self.batch, self.rank, self.size = n, batch, rank, size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch * size
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {n} samples, fewer than one global batch "
                              f"({batch} per rank x {size} ranks = {self.global_batch}): lower "
                              "batch_size or use fewer ranks")
        self._epoch, self._perm = -1, np.arange(n)

    def indices(self, epoch: int, step: int) -> np.ndarray | slice:
        start = step * self.global_batch + self.rank * self.batch
        if not self.shuffle:
            return slice(start, start + self.batch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm[start:start + self.batch]


def gather(x: np.ndarray, y: np.ndarray, idx: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
    """The batch as contiguous float32/int64 arrays (a view when possible)."""
    xb, yb = x[idx], y[idx]
    if xb.dtype != np.float32 or not xb.flags.c_contiguous:
        xb = np.ascontiguousarray(xb, dtype=np.float32)
    return xb, yb


def eval_shard(n: int, rank: int, size: int) -> slice:
    """Rank r evaluates samples r, r+size, ...: every test sample exactly once."""
    return slice(rank, n, size)
