"""Gradient compression of the flat exchange, written once for every framework.

Each method is one algorithm over a small set of tensor operations (:class:`Ops`) that the
framework supplies: PyTorch's and TensorFlow's (``harness/backends/ops_*.py``) and NumPy's
(:class:`NumpyOps`, the reference the tests hold both frameworks to). So the two frameworks run
the same algorithm, with the same bucket sizes, index choices and scales, and send the same
bytes; only the arithmetic underneath differs (float rounding).

The exchange sees this rank's gradients as one flat float32 vector ``v``, already multiplied by
1/size (the flat exchange scales the loss), and returns the sum over ranks of each rank's
compressed ``v``: the average of the compressed gradients. With error feedback (EF) each rank
keeps what its compression dropped (the residual) and adds it to the next step's ``v``, so
nothing is lost, only delayed (Seide et al. 2014; Karimireddy et al. 2019, EF-signSGD).

==========  =================================================  ==========================
method      what each rank sends                               collective
==========  =================================================  ==========================
fp16        every value as float16 (2 bytes)                   allreduce (sum in float16)
bf16        every value as bfloat16 (2 bytes)                  allgather, sum in float32
int8        int8 values and one float32 scale per 512 values   allgather, sum in float32
sign        1 bit per value and one float32 scale per 512      allgather, sum in float32
topk        the k largest ``|v|``: int32 index + float32       allgather, scatter-sum
randomk     k values at indices all ranks draw alike (float32)  allreduce of the k values
powersgd    rank-r factors P (m x r) and Q (n x r) per matrix;  two allreduces (P, then Q)
            vectors (biases, norms) uncompressed
==========  =================================================  ==========================

Sparse and low-rank payloads travel through Horovod's (or MPI's) allgather and allreduce;
nothing here is a transport. Bytes are counted from the payloads' static shapes: ``sent_bytes``
is what one rank sends per step under ring algorithms (allreduce of m bytes: 2(p-1)/p x m;
allgather: (p-1) x m), which at 2 ranks is the payload itself.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from harness.backends.mpi_comm import as_bytes


METHODS = ("none", "fp16", "bf16", "int8", "sign", "topk", "randomk", "powersgd")
#: methods whose dropped part is kept per rank and added back (``error_feedback``)
EF_METHODS = ("int8", "sign", "topk", "randomk", "powersgd")
#: methods that only run on the flat exchange (``fp16`` also runs in Horovod's optimizers)
FLAT_ONLY = ("bf16", "int8", "sign", "topk", "randomk", "powersgd")
#: the config keys a compressor's state depends on
KEYS = ("compression", "compression_ratio", "powersgd_rank", "error_feedback")
#: values that share one scale (int8, sign)
BUCKET = 512
_EPS = 1e-8


class Ops(Protocol):
    """The tensor operations a compressor needs from a framework. ``T`` is the framework's
    tensor; state handles are whatever ``variable`` returns (a ``tf.Variable``, a box)."""

    size: int
    #: whether ``allreduce_sum`` sums float16 (Horovod does; MPI does not)
    sums_half: bool

    def all_finite(self, x: Any) -> Any: ...
    def constant(self, a: np.ndarray) -> Any: ...
    def zeros(self, n: int) -> Any: ...
    def cast(self, x: Any, dtype: str) -> Any: ...
    def bitcast(self, x: Any, dtype: str) -> Any: ...
    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any: ...
    def concat(self, xs: list) -> Any: ...
    def pad(self, x: Any, n: int) -> Any: ...
    def round(self, x: Any) -> Any: ...
    def abs(self, x: Any) -> Any: ...
    def clip(self, x: Any, lo: float, hi: float) -> Any: ...
    def where(self, cond: Any, a: Any, b: Any) -> Any: ...
    def sum(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any: ...
    def max(self, x: Any, axis: int, keepdims: bool = False) -> Any: ...
    def sqrt(self, x: Any) -> Any: ...
    def topk_indices(self, x: Any, k: int) -> Any: ...
    def gather(self, x: Any, idx: Any) -> Any: ...
    def scatter_sum(self, idx: Any, values: Any, n: int) -> Any: ...
    def matmul(self, a: Any, b: Any, transpose_a: bool = False,
               transpose_b: bool = False) -> Any: ...
    def stack(self, xs: list, axis: int) -> Any: ...
    def transpose(self, x: Any) -> Any: ...
    def pack_bits(self, bits: Any) -> Any: ...
    def unpack_bits(self, packed: Any) -> Any: ...
    def allreduce_sum(self, x: Any, name: str) -> Any: ...
    def allgather(self, x: Any, name: str) -> Any: ...
    def broadcast(self, x: Any, name: str) -> Any: ...
    def nbytes(self, x: Any) -> int: ...
    def variable(self, name: str, init: np.ndarray) -> Any: ...
    def read(self, var: Any) -> Any: ...
    def assign(self, var: Any, value: Any) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...


def ring_bytes(payload: int, size: int, collective: str) -> int:
    """Bytes one rank sends for a ``payload``-byte collective under a ring algorithm."""
    if size <= 1:
        return 0
    if collective == "allreduce":
        return int(round(2 * (size - 1) / size * payload))
    return (size - 1) * payload


def dense_sent_bytes(n: int, size: int, itemsize: int = 4) -> int:
    """What the uncompressed exchange of ``n`` float32 values sends per rank and step."""
    return ring_bytes(n * itemsize, size, "allreduce")


class Compressor:
    """One rank's compressed exchange of the flat gradient vector (length ``n``).

    ``exchange(v)`` returns the sum over ranks of every rank's compressed ``v`` and, with
    error feedback, keeps this rank's residual. ``state_arrays``/``restore`` hold what a
    checkpoint must carry for an exact resume (residuals, PowerSGD's Q, random-k's cursor).
    ``skip_nonfinite`` (``nan_policy = "skip"``): a step whose ``v`` is not finite on some rank
    gives a non-finite total on every rank (so all skip the update) and leaves the state as it
    was, so one bad batch does not poison the residual or PowerSGD's Q for the rest of the run.
    """

    method = "none"

    def __init__(self, ops: Ops, n: int, *, error_feedback: bool = True, seed: int = 0,
                 shapes: tuple[tuple[int, ...], ...] = (), ratio: float = 0.01,
                 rank: int = 4, channels_last: bool = False,
                 skip_nonfinite: bool = False) -> None:
        self.ops, self.n, self.channels_last = ops, n, channels_last
        self.skip_nonfinite = skip_nonfinite
        self.error_feedback = error_feedback and self.method in EF_METHODS
        self.seed, self.shapes, self.ratio, self.rank = seed, shapes, ratio, rank
        self.payload_bytes = 0
        self.sent_bytes = 0
        self._state: dict[str, Any] = {}
        self._initial: dict[str, np.ndarray] = {}
        #: state that is the same on every rank (a checkpoint of any world size restores it)
        self._shared: set[str] = set()
        self._finite: Any = None
        self._counting = True
        if self.error_feedback:
            self._add_state("residual", np.zeros(n, np.float32))

    def _add_state(self, name: str, initial: np.ndarray, shared: bool = False) -> None:
        self._state[name] = self.ops.variable(name, initial)
        self._initial[name] = np.array(initial)
        if shared:
            self._shared.add(name)

    def _set(self, name: str, value: Any) -> None:
        """Update a state, or keep it on a step with non-finite gradients (skip_nonfinite)."""
        if self._finite is not None:
            value = self.ops.where(self._finite, value, self.ops.read(self._state[name]))
        self.ops.assign(self._state[name], value)

    # --- the collectives, counted ---
    def _allreduce(self, x: Any, name: str) -> Any:
        self._count(x, "allreduce")
        return self.ops.allreduce_sum(x, f"harness.{self.method}.{name}")

    def _allgather(self, x: Any, name: str) -> Any:
        self._count(x, "allgather")
        return self.ops.allgather(x, f"harness.{self.method}.{name}")

    def _count(self, x: Any, collective: str) -> None:
        if self._counting:
            size = self.ops.nbytes(x)
            self.payload_bytes += size
            self.sent_bytes += ring_bytes(size, self.ops.size, collective)

    # --- one step ---
    def exchange(self, v: Any) -> Any:
        """Sum over ranks of each rank's compressed ``v`` (+ its residual, with EF)."""
        ops = self.ops
        if self._counting:
            self.payload_bytes = self.sent_bytes = 0
        self._finite = ops.all_finite(v) if self.skip_nonfinite else None
        if self._finite is not None:
            # all of v non-finite: whatever a method selects or scales carries it, so every
            # rank's total is non-finite and every rank skips the step alike (a top-k that
            # passed over this rank's NaN would let the others apply it)
            v = ops.where(self._finite, v, v + float("nan"))
        if self.error_feedback:
            v = v + ops.read(self._state["residual"])
        total, mine = self._exchange(v)
        if self.error_feedback:
            self._set("residual", v - mine)
        self._counting = False        # the payload shapes are static: counted once
        return total

    def _exchange(self, v: Any) -> tuple[Any, Any]:
        """(sum over ranks, what this rank's share of that sum is: v minus the residual)."""
        raise NotImplementedError

    # --- checkpoints: every rank's state, stacked by rank ---
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every rank's state, stacked (size, ...) on every rank (a collective: all ranks
        call it at the same point)."""
        ops, out = self.ops, {}
        for name in sorted(self._state):
            x = ops.read(self._state[name])
            out[name] = ops.to_numpy(ops.allgather(ops.reshape(x, (1, *_shape(x))),
                                                   f"harness.state.{name}"))
        return out

    def restore(self, stacked: dict[str, np.ndarray] | None, rank: int) -> list[str]:
        """A collective: rank 0's ``stacked`` arrays (from its checkpoint; None on the other
        ranks) go to every rank, which takes its own row. State that is the same on every rank
        (PowerSGD's Q, random-k's cursor) comes from any world size's checkpoint; per-rank
        state (residuals) from one of this world size only. What the checkpoint lacks, or
        holds in another shape, starts from its initial value: returns those names."""
        ops, fresh = self.ops, []
        for name, initial in self._initial.items():
            saved = None if stacked is None else stacked.get(name)
            if saved is not None and saved.shape[1:] == initial.shape \
                    and saved.dtype == initial.dtype \
                    and (name in self._shared or saved.shape[0] == ops.size):
                a = np.repeat(saved[:1], ops.size, axis=0) if name in self._shared else saved
            else:
                a = np.repeat(initial[None], ops.size, axis=0)
                fresh.append(name)
            got = ops.to_numpy(ops.broadcast(ops.constant(np.array(a)),
                                             f"harness.restore.{name}"))
            ops.assign(self._state[name], ops.constant(np.ascontiguousarray(got[rank])))
        return fresh


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


class Fp16(Compressor):
    method = "fp16"

    def _exchange(self, v):
        ops = self.ops
        half = ops.cast(v, "float16")
        if ops.sums_half:
            return ops.cast(self._allreduce(half, "values"), "float32"), v
        # MPI has no float16 sum: gathered, summed in float32
        got = ops.cast(self._allgather(half, "values"), "float32")
        return ops.sum(ops.reshape(got, (ops.size, self.n)), axis=0), v


class Bf16(Compressor):
    """bfloat16 has no sum in Horovod or MPI: its bits travel as int16, summed in float32."""

    method = "bf16"

    def _exchange(self, v):
        ops = self.ops
        wire = ops.bitcast(ops.cast(v, "bfloat16"), "int16")
        got = ops.cast(ops.bitcast(self._allgather(wire, "values"), "bfloat16"), "float32")
        return ops.sum(ops.reshape(got, (ops.size, self.n)), axis=0), v


class _Bucketed(Compressor):
    """Values in buckets of BUCKET, each with one float32 scale (the vector zero-padded)."""

    def __init__(self, ops: Ops, n: int, **kw: Any) -> None:
        super().__init__(ops, n, **kw)
        self.buckets = max(1, math.ceil(n / BUCKET))
        self.padded = self.buckets * BUCKET

    def _rows(self, v):
        return self.ops.reshape(self.ops.pad(v, self.padded), (self.buckets, BUCKET))

    def _flat(self, rows):
        return self.ops.reshape(rows, (self.padded,))[:self.n]


class Int8(_Bucketed):
    """Symmetric int8 per bucket: scale = max|v| / 127, q = round(v / scale)."""

    method = "int8"

    def _exchange(self, v):
        ops = self.ops
        rows = self._rows(v)
        scale = ops.max(ops.abs(rows), axis=1, keepdims=True) / 127.0
        safe = ops.where(scale > 0, scale, ops.zeros(1) + 1.0)
        q = ops.clip(ops.round(rows / safe), -127.0, 127.0)
        mine = self._flat(q * scale)
        q_all = self._allgather(ops.cast(ops.reshape(q, (self.padded,)), "int8"), "values")
        s_all = self._allgather(ops.reshape(scale, (self.buckets,)), "scales")
        q_all = ops.reshape(ops.cast(q_all, "float32"), (ops.size, self.buckets, BUCKET))
        s_all = ops.reshape(s_all, (ops.size, self.buckets, 1))
        total = ops.reshape(ops.sum(q_all * s_all, axis=0), (self.padded,))[:self.n]
        return total, mine


class Sign(_Bucketed):
    """1-bit sign with the bucket's mean |v| as its scale (EF-signSGD): +scale or -scale."""

    method = "sign"

    def _exchange(self, v):
        ops = self.ops
        rows = self._rows(v)
        # the padding's zeros do not dilute the last bucket's mean
        counts = np.full((self.buckets, 1), float(BUCKET), np.float32)
        counts[-1, 0] = self.n - (self.buckets - 1) * BUCKET
        scale = ops.sum(ops.abs(rows), axis=1, keepdims=True) / ops.constant(counts)
        positive = ops.reshape(rows, (self.padded,)) >= 0
        signs = ops.where(positive, ops.zeros(1) + 1.0, ops.zeros(1) - 1.0)
        mine = self._flat(ops.reshape(signs, (self.buckets, BUCKET)) * scale)
        bits_all = self._allgather(ops.pack_bits(positive), "bits")
        s_all = self._allgather(ops.reshape(scale, (self.buckets,)), "scales")
        signs_all = ops.cast(ops.unpack_bits(bits_all), "float32") * 2.0 - 1.0
        signs_all = ops.reshape(signs_all, (ops.size, self.buckets, BUCKET))
        s_all = ops.reshape(s_all, (ops.size, self.buckets, 1))
        total = ops.reshape(ops.sum(signs_all * s_all, axis=0), (self.padded,))[:self.n]
        return total, mine


def sparse_k(n: int, ratio: float) -> int:
    return max(1, min(n, int(math.ceil(ratio * n))))


class TopK(Compressor):
    """The k = ceil(ratio x n) values of largest magnitude, as (int32 index, float32 value)."""

    method = "topk"

    def _exchange(self, v):
        ops = self.ops
        k = sparse_k(self.n, self.ratio)
        idx = ops.topk_indices(v, k)
        values = ops.gather(v, idx)
        mine = ops.scatter_sum(idx, values, self.n)
        idx_all = self._allgather(idx, "indices")
        values_all = self._allgather(values, "values")
        # rank by rank, in rank order: within a rank the indices differ, so no two values
        # meet in one scatter, and every rank sums the overlaps in the same order (a single
        # scatter of all ranks' values adds them in whatever order a GPU's atomics take)
        total = mine if ops.size == 1 else None
        for r in range(ops.size if ops.size > 1 else 0):
            part = ops.scatter_sum(idx_all[r * k:(r + 1) * k], values_all[r * k:(r + 1) * k],
                                   self.n)
            total = part if total is None else total + part
        return total, mine


class RandomK(Compressor):
    """k values at indices every rank draws alike, so only the values travel (one allreduce).
    The indices walk a random permutation of all n, k per step (from the run's seed, wrapping
    around its end), so every value is sent once in every ceil(n/k) steps or so (exactly once
    every n/k steps where k divides n): random, and none is left out for long."""

    method = "randomk"

    def __init__(self, ops: Ops, n: int, **kw: Any) -> None:
        super().__init__(ops, n, **kw)
        self.k = sparse_k(n, self.ratio)
        perm = np.random.default_rng([self.seed, 17]).permutation(n).astype(np.int64)
        self._perm = ops.variable("perm", perm)
        self._offsets = ops.constant(np.arange(self.k, dtype=np.int64))
        self._add_state("cursor", np.zeros(1, np.int64), shared=True)

    def _exchange(self, v):
        ops = self.ops
        cursor = ops.read(self._state["cursor"])
        where = (cursor * self.k + self._offsets) % self.n
        idx = ops.gather(ops.read(self._perm), where)
        values = ops.gather(v, idx)
        mine = ops.scatter_sum(idx, values, self.n)
        total = ops.scatter_sum(idx, self._allreduce(values, "values"), self.n)
        self._set("cursor", cursor + 1)
        return total, mine


class PowerSGD(Compressor):
    """Rank-r PowerSGD (Vogels et al. 2019) per weight matrix (a tensor of shape (m, ...) is an
    m x rest matrix), warm-started Q, error feedback against the averaged approximation as
    PyTorch's hook does; vectors and matrices that would not shrink travel uncompressed in the
    first allreduce. Q starts from the run's seed, the same on every rank and framework.

    A weight's matrix has its output units as rows in both frameworks: PyTorch keeps them
    first ((out, in, kh, kw)), Keras last ((kh, kw, in, out), ``channels_last``), so Keras's
    are transposed on the way in and out and the two send factors of the same shapes; for a
    dense layer the same factors (a convolution's columns are ordered (in, kh, kw) in one
    and (kh, kw, in) in the other, so its seeded Q meets them in another order)."""

    method = "powersgd"

    def __init__(self, ops: Ops, n: int, **kw: Any) -> None:
        super().__init__(ops, n, **kw)
        rng = np.random.default_rng([self.seed, 29])
        self.matrices: list[tuple[int, int, int, int]] = []   # (offset, m, cols, r)
        self.dense: list[tuple[int, int]] = []                # (offset, length)
        off = 0
        for shape in self.shapes:
            size = int(np.prod(shape)) if shape else 1
            m = int(shape[-1] if self.channels_last else shape[0]) if len(shape) >= 2 else 0
            cols = size // m if m else 0
            r = min(self.rank, m, cols) if m else 0
            if m and r * (m + cols) < m * cols:
                self.matrices.append((off, m, cols, r))
            else:
                self.dense.append((off, size))
            off += size
        if off != n:
            raise ValueError(f"PowerSGD: the shapes hold {off} values, the vector {n}")
        for i, (_, _, cols, r) in enumerate(self.matrices):
            self._add_state(f"q{i:03d}", rng.standard_normal((cols, r)).astype(np.float32),
                            shared=True)

    def _matrix(self, values, m: int, cols: int):
        if self.channels_last:
            return self.ops.transpose(self.ops.reshape(values, (cols, m)))
        return self.ops.reshape(values, (m, cols))

    def _vector(self, matrix, m: int, cols: int):
        return self.ops.reshape(self.ops.transpose(matrix) if self.channels_last else matrix,
                                (m * cols,))

    def _orthonormal(self, p):
        """Gram-Schmidt on P's columns (the same arithmetic in every framework)."""
        ops, cols = self.ops, []
        for j in range(int(p.shape[1])):
            c = p[:, j]
            for q in cols:
                c = c - ops.sum(q * c) * q
            cols.append(c / (ops.sqrt(ops.sum(c * c)) + _EPS))
        return ops.stack(cols, axis=1)

    def _exchange(self, v):
        ops = self.ops
        ms = [self._matrix(v[off:off + m * cols], m, cols) for off, m, cols, _ in self.matrices]
        qs = [ops.read(self._state[f"q{i:03d}"]) for i in range(len(self.matrices))]
        ps = [ops.matmul(mat, q) for mat, q in zip(ms, qs)]
        first = [ops.reshape(p, (-1,)) for p in ps] + [v[o:o + s] for o, s in self.dense]
        first = self._allreduce(ops.concat(first), "p")
        pos, ps_sum = 0, []
        for (_, m, _, r) in self.matrices:
            ps_sum.append(ops.reshape(first[pos:pos + m * r], (m, r)))
            pos += m * r
        dense_sum = []
        for _, s in self.dense:
            dense_sum.append(first[pos:pos + s])
            pos += s
        ps_hat = [self._orthonormal(p) for p in ps_sum]
        new_qs = [ops.matmul(mat, p, transpose_a=True) for mat, p in zip(ms, ps_hat)]
        if new_qs:
            second = self._allreduce(ops.concat([ops.reshape(q, (-1,)) for q in new_qs]), "q")
        total: dict[int, Any] = {}
        mine: dict[int, Any] = {}
        pos = 0
        for i, ((off, m, cols, r), p) in enumerate(zip(self.matrices, ps_hat)):
            q = ops.reshape(second[pos:pos + cols * r], (cols, r))
            pos += cols * r
            self._set(f"q{i:03d}", q)
            total[off] = self._vector(ops.matmul(p, q, transpose_b=True), m, cols)
            # the residual is against the average's approximation (as PyTorch's hook keeps
            # it), in this rank's share of the sum: 1/size of it
            mine[off] = total[off] * (1.0 / ops.size)
        for (off, s), d in zip(self.dense, dense_sum):
            total[off], mine[off] = d, v[off:off + s]       # sent whole: nothing kept
        order = sorted(total)
        return ops.concat([total[o] for o in order]), ops.concat([mine[o] for o in order])


CLASSES: dict[str, type[Compressor]] = {
    c.method: c for c in (Fp16, Bf16, Int8, Sign, TopK, RandomK, PowerSGD)}


def make(method: str, ops: Ops, n: int, **kw: Any) -> Compressor:
    return CLASSES[method](ops, n, **kw)


def for_run(cfg: Any, ops: Ops, shapes: tuple[tuple[int, ...], ...],
            channels_last: bool = False) -> Compressor | None:
    """The run's compressor of a flat vector of parameters shaped ``shapes`` (Keras's:
    ``channels_last``), or None (no compression, or one rank: nothing is sent)."""
    if cfg.compression == "none" or ops.size == 1:
        return None
    n = sum(int(np.prod(s)) for s in shapes)
    return make(cfg.compression, ops, n, shapes=tuple(shapes), ratio=cfg.compression_ratio,
                rank=cfg.powersgd_rank, error_feedback=cfg.error_feedback, seed=cfg.seed,
                channels_last=channels_last, skip_nonfinite=cfg.nan_policy == "skip")


class HorovodCollectives:
    """The collectives of an ``Ops`` through Horovod: the same calls in horovod.torch and
    horovod.tensorflow. Without Horovod (``hvd`` None: one rank) each is the identity."""

    hvd: Any = None
    sums_half = True

    def allreduce_sum(self, x, name):
        return x if self.hvd is None else self.hvd.allreduce(x, op=self.hvd.Sum, name=name)

    def allgather(self, x, name):
        return x if self.hvd is None else self.hvd.allgather(x, name=name)

    def broadcast(self, x, name):
        return x if self.hvd is None else self.hvd.broadcast(x, root_rank=0, name=name)


class _Box:
    """A state value of an eager framework (NumPy here; PyTorch in its ops)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class NumpyOps:
    """The reference: NumPy arrays on one rank (collectives are the identity), or over an
    mpi4py communicator (``comm``), as the mpi4py gradient path could use it."""

    _DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8,
               "int16": np.int16, "uint8": np.uint8, "int32": np.int32, "int64": np.int64}

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.sums_half = comm is None

    def all_finite(self, x):
        return np.isfinite(x).all()

    def constant(self, a):
        return np.asarray(a)

    def zeros(self, n):
        return np.zeros(n, np.float32)

    def cast(self, x, dtype):
        if dtype == "bfloat16":          # float32 rounded to bfloat16 (nearest, ties to even),
            bits = np.ascontiguousarray(x, np.float32).view(np.uint32)   # kept in uint16 bits
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        if x.dtype == np.uint16 and dtype == "float32":                  # from bfloat16 bits
            return (x.astype(np.uint32) << 16).view(np.float32)
        with np.errstate(invalid="ignore"):  # NaN to int8 on a skipped step: any value will do
            return x.astype(self._DTYPES[dtype])

    def bitcast(self, x, dtype):
        return x.view(np.uint16 if dtype == "bfloat16" else self._DTYPES[dtype])

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def concat(self, xs):
        return np.concatenate(xs)

    def pad(self, x, n):
        return np.pad(x, (0, n - len(x)))

    def round(self, x):
        return np.round(x)

    def abs(self, x):
        return np.abs(x)

    def clip(self, x, lo, hi):
        return np.clip(x, lo, hi)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims, dtype=np.float32)

    def max(self, x, axis, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    def sqrt(self, x):
        return np.sqrt(x)

    def topk_indices(self, x, k):
        a = np.abs(x)
        idx = np.argpartition(-a, k - 1)[:k]
        return idx[np.argsort(-a[idx], kind="stable")].astype(np.int32)

    def gather(self, x, idx):
        return x[idx]

    def scatter_sum(self, idx, values, n):
        out = np.zeros(n, np.float32)
        np.add.at(out, idx, values)
        return out

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return (a.T if transpose_a else a) @ (b.T if transpose_b else b)

    def stack(self, xs, axis):
        return np.stack(xs, axis=axis)

    def transpose(self, x):
        return x.T

    def pack_bits(self, bits):
        return np.packbits(bits)

    def unpack_bits(self, packed):
        return np.unpackbits(packed)

    def allreduce_sum(self, x, name):
        if self.comm is None:
            return x.copy()
        out = np.empty_like(x)
        self.comm.Allreduce(np.ascontiguousarray(x), out)
        return out

    def allgather(self, x, name):
        if self.comm is None:
            return x.copy()
        out = np.empty((self.size * x.shape[0], *x.shape[1:]), x.dtype)
        # as bytes: mpi4py maps no MPI datatype to float16 (fp16's gather), and a gather
        # only copies
        self.comm.Allgather(as_bytes(np.ascontiguousarray(x)), as_bytes(out))
        return out

    def broadcast(self, x, name):
        if self.comm is not None:
            self.comm.Bcast(as_bytes(x), root=0)
        return x

    def nbytes(self, x):
        return int(x.nbytes)

    def variable(self, name, init):
        return _Box(np.array(init))

    def read(self, var):
        return var.value

    def assign(self, var, value):
        var.value = np.asarray(value, var.value.dtype).reshape(var.value.shape)

    def to_numpy(self, x):
        return np.asarray(x)


# --- the parameter server's compressed pushes ---------------------------------------------

#: methods a parameter-server worker can push with (mode = "async")
PUSH_METHODS = ("topk", "int8")


class _Capture(NumpyOps):
    """One rank whose allgathers keep what they would have sent: a compressor over it encodes
    a push with the same selection, scales and error feedback as the sync exchange."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, np.ndarray] = {}

    def allgather(self, x, name):
        self.sent[name.rsplit(".", 1)[-1]] = np.ascontiguousarray(x)
        return x.copy()


class PushCodec:
    """A parameter-server worker's compressed push of one ``n``-value shard, as one byte
    buffer of static size (``nbytes``): top-k's int32 indices then float32 values, or int8's
    values then one float32 scale per BUCKET. The worker encodes (keeping its residual with
    error feedback); the server decodes into a dense gradient."""

    def __init__(self, method: str, n: int, ratio: float = 0.01,
                 error_feedback: bool = True) -> None:
        if method not in PUSH_METHODS:
            raise ValueError(f"no compressed push for {method!r}: {', '.join(PUSH_METHODS)}")
        self.method, self.n = method, n
        self.parts: list[tuple[str, np.dtype, int]]
        if method == "topk":
            k = sparse_k(n, ratio)
            self.parts = [("indices", np.dtype(np.int32), k), ("values", np.dtype(np.float32), k)]
        else:
            buckets = max(1, math.ceil(n / BUCKET))
            self.parts = [("values", np.dtype(np.int8), buckets * BUCKET),
                          ("scales", np.dtype(np.float32), buckets)]
        self.nbytes = sum(dtype.itemsize * count for _, dtype, count in self.parts)
        self._ops: _Capture | None = None
        self._compressor: Compressor | None = None
        self._ratio, self._ef = ratio, error_feedback

    def encode(self, v: np.ndarray) -> np.ndarray:
        """``v`` (float32, n) compressed into a new uint8 buffer of ``nbytes``."""
        if self._compressor is None:           # the worker's side only: its residual
            self._ops = _Capture()
            self._compressor = make(self.method, self._ops, self.n, ratio=self._ratio,
                                    error_feedback=self._ef)
        assert self._ops is not None
        self._compressor.exchange(np.asarray(v, np.float32))
        return np.concatenate([self._ops.sent[name].view(np.uint8).ravel()
                               for name, _, _ in self.parts])

    def decode(self, buf: np.ndarray) -> np.ndarray:
        """The dense float32 gradient (n) that ``buf`` carries."""
        got, off = {}, 0
        for name, dtype, count in self.parts:
            size = dtype.itemsize * count
            got[name] = buf[off:off + size].view(dtype)
            off += size
        if self.method == "topk":
            out = np.zeros(self.n, np.float32)
            out[got["indices"]] = got["values"]
            return out
        rows = got["values"].astype(np.float32).reshape(-1, BUCKET) * got["scales"][:, None]
        return rows.reshape(-1)[:self.n]
