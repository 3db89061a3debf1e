"""Datasets as numpy arrays and the rank sharding both frameworks share.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 samples, no download).
* ``synthetic``: seeded random images in the model's input shape (CIFAR/ImageNet-like).
* ``npz``: the user's arrays ``x_train, y_train, x_test, y_test``. Members stored uncompressed
  (``np.savez``) are memory-mapped; compressed ones (``np.savez_compressed``) are read into memory.
  Token windows for a language model are integer ``x`` of shape ``(N, seq_len)`` with ``y`` of
  the same shape (the next token at each position).
* ``pysource``: byte-level text of the Python standard library's own top-level modules, which
  ship with every Python (no download): a fixed, sorted file list, split into train and test
  by file, cut into windows of ``seq_len`` tokens.

The built-in datasets hold channels-last float32 images ``(N, H, W, C)`` and int64 class
labels; a task's own data (:func:`Data`) holds whatever its model and loss take: arrays or a
map-style dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import platform
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import ConfigError, DataError

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
SYNTHETIC_MEMORY_LIMIT = 2 << 30   # bytes of synthetic training images per rank


class ArraySplit:
    """Samples held as two arrays (in memory or memory-mapped): ``x[i], y[i]``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, float_x: bool = False) -> None:
        self.x, self.y = x, y
        #: the built-in image data: every x becomes float32 (uint8 images included)
        self.float_x = float_x

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, idx: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        return gather(self.x, self.y, idx, self.float_x)


class MapSplit:
    """A map-style dataset: ``len(ds)`` samples, ``ds[i]`` is one ``(x, y)`` pair of numpy
    arrays or numbers (a ``torch.utils.data.Dataset`` of numpy samples is one). The harness's
    sampler picks the indices, so every rank sees its shard and a resume continues exactly."""

    def __init__(self, ds: Any, what: str) -> None:
        self.ds, self.what = ds, what
        try:
            self.n = len(ds)
        except TypeError:
            raise DataError(f"{what} ({type(ds).__name__}) has no len(): give arrays (x, y) or a "
                            "map-style dataset with __len__ and __getitem__") from None
        if self.n == 0:
            raise DataError(f"{what} is empty")
        x, y = self._sample(0)
        self._shape = tuple(np.shape(x))
        self._check(min(self.n, self.CHECKED), np.shape(y))

    #: samples whose shapes are checked before training (later ones when their batch is drawn)
    CHECKED = 4096

    def _check(self, count: int, y_shape: tuple) -> None:
        """The first ``count`` samples all have sample 0's x and y shapes (DataError)."""
        for i in range(1, count):
            x, y = self._sample(i)
            for what, got, want in (("x", np.shape(x), self._shape), ("y", np.shape(y), y_shape)):
                if tuple(got) != tuple(want):
                    raise DataError(f"{self.what}[{i}] has {what} of shape {tuple(got)}, sample 0 "
                                    f"of {tuple(want)}: every sample must have the same shape "
                                    "(pad or crop them in __getitem__)")

    def __len__(self) -> int:
        return self.n

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def _sample(self, i: int) -> tuple[Any, Any]:
        item = self.ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"{self.what}[{i}] is a {type(item).__name__}, not an (x, y) pair: "
                            "make __getitem__ return (x, y)")
        return item[0], item[1]

    def batch(self, idx: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        index = range(self.n)[idx] if isinstance(idx, slice) else idx
        xs, ys = [], []
        for i in index:
            x, y = self._sample(int(i))
            x = np.asarray(x)
            if x.shape != self._shape:
                raise DataError(f"{self.what}[{int(i)}] has x of shape {x.shape}, sample 0 of "
                                f"{self._shape}: every sample must have the same shape (pad or "
                                "crop them in __getitem__)")
            xs.append(x)
            ys.append(np.asarray(y))
        try:
            y_batch = np.stack(ys)
        except ValueError:
            raise DataError(f"{self.what}: the y of samples {list(map(int, index))[:4]}... "
                            f"differ in shape ({', '.join(str(v.shape) for v in ys[:3])}): every "
                            "sample's y must have the same shape") from None
        return _compact(np.stack(xs)), _compact(y_batch)


Split = ArraySplit | MapSplit


@dataclass
class Dataset:
    """A run's training and test samples (``harness.Data`` builds one from a user's data)."""

    name: str
    train: Split
    test: Split
    num_classes: int | None = None
    #: what else identifies the data (pysource: the Python version, files and a digest)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.sample_shape

    # the arrays of array-backed data (the built-in datasets, npz files)
    def _arrays(self, split: Split) -> ArraySplit:
        if not isinstance(split, ArraySplit):
            raise TypeError(f"{self.name} is a map-style dataset; it has no arrays")
        return split

    @property
    def x_train(self) -> np.ndarray:
        return self._arrays(self.train).x

    @property
    def y_train(self) -> np.ndarray:
        return self._arrays(self.train).y

    @property
    def x_test(self) -> np.ndarray:
        return self._arrays(self.test).x

    @property
    def y_test(self) -> np.ndarray:
        return self._arrays(self.test).y

    def fingerprint(self) -> dict:
        """What makes two runs' data the same, for comparison reports."""
        return {"name": self.name, "train": len(self.train), "test": len(self.test),
                "input_shape": list(self.input_shape), "classes": self.num_classes,
                **self.source}


def Data(train: Any, test: Any, name: str = "data", num_classes: int | None = None) -> Dataset:
    """A task's data: ``train`` and ``test`` are each arrays ``(x, y)`` (numpy or memory-mapped;
    float64 becomes float32, integer arrays such as token ids stay integers) or a map-style
    dataset (``__len__``, ``__getitem__(i) -> (x, y)``); a ``DataLoader`` gives its
    ``.dataset`` (its own sampler and batch size are not used: the run's are)."""
    splits = [_split(part, f"{name} {what}") for part, what in ((train, "train"), (test, "test"))]
    if splits[0].sample_shape != splits[1].sample_shape:
        raise DataError(f"{name}: train samples have shape {splits[0].sample_shape} but test "
                        f"samples {splits[1].sample_shape}; they must match")
    # the model is traced for the train split's dtypes: the test split must give the same
    (xa, ya), (xb, yb) = (s.batch(slice(0, 1)) for s in splits)
    for what, a, b in (("x", xa, xb), ("y", ya, yb)):
        if a.dtype != b.dtype or a.shape[1:] != b.shape[1:]:
            raise DataError(f"{name}: train {what} is {a.dtype} of sample shape {a.shape[1:]}, "
                            f"test {what} {b.dtype} of {b.shape[1:]}; give both splits the same "
                            "dtype and shape")
    return Dataset(name, splits[0], splits[1], num_classes)


def _split(part: Any, what: str) -> Split:
    if isinstance(part, (ArraySplit, MapSplit)):
        return part
    if isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part):
        x, y = part
        for name, a in (("x", x), ("y", y)):
            if a.dtype.kind not in "fiub":
                raise DataError(f"{what}: {name} has dtype {a.dtype}; use numeric arrays")
        if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
            raise DataError(f"{what}: x has shape {x.shape} and y {y.shape}; they need the same "
                            "number of samples along their first axis")
        if len(x) == 0:
            raise DataError(f"{what} is empty")
        for name, a in (("x", x), ("y", y)):
            bad = _first_non_finite(a)
            if bad is not None:
                raise DataError(f"{what}: {name} holds NaN/Inf (first in sample {bad}); clean or "
                                "impute those values before training")
        return ArraySplit(x, y)
    if isinstance(part, tuple):
        raise DataError(f"{what}: a tuple must be two numpy arrays (x, y), got "
                        f"{', '.join(type(a).__name__ for a in part)}")
    if not hasattr(part, "__getitem__") and hasattr(part, "dataset"):
        # a torch DataLoader: the harness samples, shards and batches its dataset itself
        return MapSplit(part.dataset, f"{what} ({type(part).__name__}.dataset)")
    return MapSplit(part, what)


def _compact(a: np.ndarray) -> np.ndarray:
    """float64 to float32 (what models train in), contiguous."""
    if a.dtype == np.float64:
        return np.ascontiguousarray(a, dtype=np.float32)
    return np.ascontiguousarray(a)


def load_dataset(name: str, model_input_shape: tuple[int, ...], model_classes: int,
                 data_path: str | None = None, synthetic_samples: int = 1024,
                 seed: int = 0, tokens: bool = False, text_tokens: int = 0) -> Dataset:
    """A built-in dataset for a model of the given input shape and classes; ``tokens``: the
    model takes token ids (gpt), so synthetic data is random tokens."""
    if name == "digits":
        return _digits()
    if name == "synthetic" and tokens:
        return _synthetic_tokens(model_input_shape[0], model_classes, synthetic_samples, seed)
    if name == "synthetic":
        return _synthetic(model_input_shape, model_classes, synthetic_samples, seed)
    if name == "pysource":
        return pysource(model_input_shape[0], text_tokens)
    if name == "npz":
        if not data_path:
            raise ConfigError("dataset = 'npz' needs data_path")
        return load_npz(data_path)
    raise ConfigError(f"dataset = {name!r} is not one of 'digits', 'synthetic', 'npz', "
                      "'pysource'")


def _arrays_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, classes: int) -> Dataset:
    return Dataset(name, ArraySplit(x_train, y_train, float_x=True),
                   ArraySplit(x_test, y_test, float_x=True), classes)


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits (no download): 1797 rows of 64 pixels and the label. Read
    from its CSV as ``load_digits`` reads it, without importing scikit-learn, whose import took
    2.3 s of every rank's start; ``load_digits`` where the file is not where it was."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                table = np.loadtxt(f, delimiter=",")
            if table.shape == (1797, 65):
                return table
            break                              # not the file it was: ask scikit-learn
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.column_stack([d.data, d.target])


def _digits() -> Dataset:
    table = _digits_table()
    x = (table[:, :64].reshape(-1, 8, 8).astype(np.float32) / 16.0)[..., None]  # in [0, 1]
    y = table[:, 64].astype(np.int64)
    order = np.random.default_rng(20240601).permutation(len(x))   # fixed split, any run seed
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    return _arrays_dataset("digits", x[train], y[train], x[test], y[test], 10)


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
    return _arrays_dataset("synthetic", x[:n], y[:n], x[n:], y[n:], classes)


def _synthetic_tokens(seq_len: int, vocab: int, n: int, seed: int) -> Dataset:
    rng = np.random.default_rng([seed, 7])
    n_test = max(1, min(n // 4, 512))
    x = rng.integers(0, vocab, (n + n_test, seq_len), dtype=np.int64)
    y = rng.integers(0, vocab, (n + n_test, seq_len), dtype=np.int64)
    return Dataset("synthetic", ArraySplit(x[:n], y[:n]), ArraySplit(x[n:], y[n:]), vocab)


# --- pysource: the standard library's source as bytes ------------------------------------

PYSOURCE_VOCAB = 256            # bytes
PYSOURCE_TEST_EVERY = 10        # every 10th file of the sorted list is a test file


def pysource_files() -> list[Path]:
    """The standard library's top-level modules (``<stdlib>/*.py``), sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def pysource(seq_len: int, train_tokens: int = 0) -> Dataset:
    """Byte windows of the standard library's source: files ``i % 10 == 9`` of the sorted list
    are the test split. Each split is the concatenation of its files; ``train_tokens`` (0: all)
    windows' worth of ``seq_len`` tokens are taken evenly spread over the training text, a
    quarter as many over the test text. ``y`` is ``x`` shifted by one byte."""
    files = pysource_files()
    if len(files) < PYSOURCE_TEST_EVERY:
        raise DataError(f"dataset = 'pysource' found {len(files)} modules in "
                        f"{sysconfig.get_paths()['stdlib']}: this Python has no standard library "
                        "source; use dataset = 'npz' with your own token windows")
    texts: dict[str, list[bytes]] = {"train": [], "test": []}
    for i, f in enumerate(files):
        texts["test" if i % PYSOURCE_TEST_EVERY == PYSOURCE_TEST_EVERY - 1 else "train"].append(
            f.read_bytes())
    digest = hashlib.sha256()
    splits: dict[str, ArraySplit] = {}
    log_p = np.zeros(PYSOURCE_VOCAB)
    unigram = 0.0
    for what, share in (("train", 1), ("test", 4)):
        data = np.frombuffer(b"".join(texts[what]), np.uint8)
        digest.update(data.tobytes())
        windows = (len(data) - 1) // seq_len
        want = windows if not train_tokens else max(1, min(windows, train_tokens // seq_len
                                                           // share))
        if windows < 1:
            raise DataError(f"dataset = 'pysource': the {what} text has {len(data)} bytes, fewer "
                            f"than one window of seq_len = {seq_len}: lower seq_len")
        starts = np.linspace(0, windows - 1, want).round().astype(np.int64) * seq_len
        idx = starts[:, None] + np.arange(seq_len + 1)
        tokens = data[idx].astype(np.int64)
        splits[what] = ArraySplit(np.ascontiguousarray(tokens[:, :-1]),
                                  np.ascontiguousarray(tokens[:, 1:]))
        if what == "train":
            counts = np.bincount(data, minlength=PYSOURCE_VOCAB) + 1.0    # add-one smoothing
            log_p = np.log(counts / counts.sum())
        else:                       # the test targets' perplexity under those frequencies
            unigram = float(np.exp(-log_p[tokens[:, 1:].ravel()].mean()))
    source = {"python": platform.python_version(), "files": len(files),
              "sha256": digest.hexdigest()[:16], "seq_len": seq_len,
              "unigram_test_perplexity": round(unigram, 4)}
    return Dataset("pysource", splits["train"], splits["test"], PYSOURCE_VOCAB, source)


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


def check_npz_path(path: str | Path) -> None:
    """The npz file exists (checked before a launcher starts ranks, and by each rank)."""
    if not Path(path).is_file():
        raise DataError(f"data_path {str(path)!r} does not exist: point data_path at an .npz "
                        f"file with arrays {', '.join(ARRAYS)}")


def load_npz(path: str | Path) -> Dataset:
    p = Path(path)
    check_npz_path(p)
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
            raise DataError(f"{name}: x_{split} has shape {x.shape}; expected (N, features), "
                            "channels-last images (N, H, W, C) or token windows (N, seq_len)")
        if y.dtype.kind not in "iu":
            raise DataError(f"{name}: y_{split} has dtype {y.dtype}; labels must be integer "
                            "class indices (e.g. y.astype(np.int64))")
        if _token_windows(x, y):
            if len(x) == 0:
                raise DataError(f"{name}: x_{split} is empty")
            continue
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
    tokens = [_token_windows(a[f"x_{s}"], a[f"y_{s}"]) for s in ("train", "test")]
    if tokens[0] != tokens[1]:
        raise DataError(f"{name}: one split holds token windows (integer x and y of the same "
                        "shape) and the other does not; give both splits the same kind")
    y_train = np.asarray(a["y_train"], dtype=np.int64)
    y_test = np.asarray(a["y_test"], dtype=np.int64)
    lo = min(y_train.min(), y_test.min())
    if tokens[0]:
        lo = min(lo, a["x_train"].min(), a["x_test"].min())
    if lo < 0:
        raise DataError(f"{name}: labels{' and tokens' if tokens[0] else ''} must be >= 0, "
                        f"found {lo}")
    classes = int(max(y_train.max(), y_test.max())) + 1
    if tokens[0]:               # token ids stay integers; the vocabulary covers x and y
        classes = max(classes, int(a["x_train"].max()) + 1, int(a["x_test"].max()) + 1)
        return Dataset(name, ArraySplit(np.asarray(a["x_train"], np.int64), y_train),
                       ArraySplit(np.asarray(a["x_test"], np.int64), y_test), classes)
    return _arrays_dataset(name, a["x_train"], y_train, a["x_test"], y_test, classes)


def _token_windows(x: np.ndarray, y: np.ndarray) -> bool:
    """Language-model windows: integer x (N, seq_len) and y of the same shape."""
    return x.dtype.kind in "iu" and x.ndim == 2 and y.shape == x.shape


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


def check_model_input(model: str, shape: tuple[int, ...], data: Dataset | None = None) -> None:
    tokens = data is not None and isinstance(data.train, ArraySplit) and \
        _token_windows(data.train.x, data.train.y)
    if model == "gpt" and not (tokens and len(shape) == 1):
        raise DataError(f"model 'gpt' needs token windows (integer x and y of shape (N, "
                        f"seq_len)) but the data has samples of shape {shape}: use dataset = "
                        "'pysource', or save token windows in the npz")
    if model != "gpt" and tokens:
        raise DataError(f"the data holds token windows of {shape[0]} tokens, for model = "
                        f"'gpt', not {model!r}: set model = 'gpt'")
    if model not in ("mlp", "gpt") and len(shape) != 3:
        raise DataError(f"model {model!r} needs channels-last images (N, H, W, C) but the data "
                        f"has samples of shape {shape}; use model = 'mlp' or reshape the arrays")


# --- sharding --------------------------------------------------------------------------------

def split_batch(global_batch: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s slice of a global batch over ``size`` ranks, as even as it goes (the
    first ``global_batch % size`` ranks take one sample more): (samples, offset)."""
    base, extra = divmod(global_batch, size)
    return base + (rank < extra), rank * base + min(rank, extra)


class Sharder:
    """Which samples each rank trains on, identically for both frameworks.

    Step ``s`` of an epoch uses the global batch ``perm[s*G:(s+1)*G]`` (G = batch x ranks) and
    rank ``r`` takes its ``r``-th slice, so np=2 with batch B sees exactly the samples of np=1
    with batch 2B. The permutation depends only on (seed, epoch). The last partial global batch
    is dropped, so every rank runs the same number of steps and none waits forever.

    ``global_batch`` (elastic runs) fixes G whatever the world size: ranks take slices that
    differ by at most one sample when G does not divide by it.
    """

    def __init__(self, n: int, batch: int, rank: int, size: int, seed: int, shuffle: bool,
                 global_batch: int | None = None) -> None:
        self.n, self.batch, self.rank, self.size = n, batch, rank, size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch * size if global_batch is None else global_batch
        #: where this rank's slice starts in the global batch
        self.offset = rank * batch
        if global_batch is not None:      # split as evenly as it goes (elastic resizes)
            self.batch, self.offset = split_batch(global_batch, rank, size)
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {n} samples, fewer than one global batch "
                              f"({batch} per rank x {size} ranks = {self.global_batch}): lower "
                              "batch_size or use fewer ranks")
        self._epoch, self._perm = -1, np.arange(n)

    def indices(self, epoch: int, step: int) -> np.ndarray | slice:
        start = step * self.global_batch + self.offset
        if not self.shuffle:
            return slice(start, start + self.batch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm[start:start + self.batch]


def gather(x: np.ndarray, y: np.ndarray, idx: np.ndarray | slice,
           float_x: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The batch as contiguous arrays (a view when possible): x as float32 (``float_x``, the
    built-in image data) or float64 narrowed to float32 (a task's data, whose integer inputs
    such as token ids stay integers); y float64 narrowed to float32."""
    xb, yb = x[idx], y[idx]
    if float_x and (xb.dtype != np.float32 or not xb.flags.c_contiguous):
        xb = np.ascontiguousarray(xb, dtype=np.float32)
    elif not float_x:
        xb = _compact(xb)
    if yb.dtype == np.float64:
        yb = yb.astype(np.float32)
    return xb, yb


def eval_shard(n: int, rank: int, size: int) -> slice:
    """Rank r evaluates samples r, r+size, ...: every test sample exactly once."""
    return slice(rank, n, size)
