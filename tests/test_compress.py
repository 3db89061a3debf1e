"""Gradient compression (harness/compress.py) against its definition, in NumPy: what each
method keeps, what it sends, and the error-feedback identity. The frameworks are held to the
same numbers in test_compression.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import compress as C

SHAPES = ((16, 1, 3, 3), (16,), (10, 64), (10,))          # the digits cnn's shape of layers
N = sum(math.prod(s) for s in SHAPES)


def gradient(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


def make(method: str, ef: bool = True, **kw) -> C.Compressor:
    return C.make(method, C.NumpyOps(), N, shapes=SHAPES, error_feedback=ef,
                  **({"ratio": 0.1, "rank": 2} | kw))


def test_fp16_and_bf16_round_each_value():
    v = gradient()
    assert np.array_equal(make("fp16").exchange(v), v.astype(np.float16).astype(np.float32))
    out = make("bf16").exchange(v)
    # bfloat16 keeps float32's exponent and 8 bits of mantissa: relative error <= 2^-9
    assert np.all(np.abs(out - v) <= np.abs(v) * 2.0 ** -8)
    assert len(np.unique(out.view(np.uint32) & 0xFFFF)) == 1          # low 16 bits are zero


def test_int8_scales_each_bucket_by_its_largest_value():
    v = gradient()
    out = make("int8", ef=False).exchange(v)
    for b in range(math.ceil(N / C.BUCKET)):
        part = slice(b * C.BUCKET, (b + 1) * C.BUCKET)
        scale = np.abs(v[part]).max() / 127
        assert np.all(np.abs(out[part] - v[part]) <= scale / 2 + 1e-7)
        assert np.allclose(np.round(out[part] / scale), out[part] / scale, atol=1e-3)


def test_sign_sends_the_sign_times_the_buckets_mean_magnitude():
    v = gradient()
    out = make("sign", ef=False).exchange(v)
    for b in range(math.ceil(N / C.BUCKET)):
        part = slice(b * C.BUCKET, min(N, (b + 1) * C.BUCKET))
        scale = np.abs(v[part]).mean()
        assert np.allclose(out[part], np.where(v[part] >= 0, scale, -scale), rtol=1e-6)


def test_topk_keeps_exactly_the_largest_magnitudes():
    v = gradient()
    out = make("topk", ef=False, ratio=0.05).exchange(v)
    k = math.ceil(0.05 * N)
    kept = np.flatnonzero(out)
    assert len(kept) == k
    assert np.abs(v[kept]).min() >= np.sort(np.abs(v))[-k]
    assert np.array_equal(out[kept], v[kept])


def test_randomk_visits_every_value_once_per_cycle_the_same_on_every_rank():
    c, k = make("randomk", ef=False, ratio=0.1), math.ceil(0.1 * N)
    seen = np.zeros(N, int)
    for _ in range(N // k):
        seen += make_nonzero(c.exchange(np.ones(N, np.float32)))
    assert seen.max() == 1 and seen.sum() == (N // k) * k
    other = make("randomk", ef=False, ratio=0.1)            # another rank: the same indices
    assert np.array_equal(make_nonzero(other.exchange(np.ones(N, np.float32))),
                          make_nonzero(make("randomk", ef=False, ratio=0.1).exchange(
                              np.ones(N, np.float32))))


def make_nonzero(out: np.ndarray) -> np.ndarray:
    return (out != 0).astype(int)


def test_powersgd_sends_rank_r_matrices_and_vectors_whole():
    v = gradient()
    out = make("powersgd", ef=False, rank=2).exchange(v)
    off = 0
    for shape in SHAPES:
        size = math.prod(shape)
        part, got = v[off:off + size], out[off:off + size]
        if len(shape) == 1:
            assert np.array_equal(got, part)                    # biases travel uncompressed
        else:
            assert np.linalg.matrix_rank(got.reshape(shape[0], -1), tol=1e-4) <= 2
        off += size


@pytest.mark.parametrize("method", C.EF_METHODS)
def test_error_feedback_loses_nothing_only_delays_it(method):
    """Sum of what was sent over T steps + the residual left = sum of the gradients."""
    c = make(method)
    sent, given = np.zeros(N), np.zeros(N)
    for t in range(6):
        g = gradient(t)
        given += g
        sent += c.exchange(g)
    left = c.state_arrays()["residual"][0]
    assert np.allclose(sent + left, given, atol=1e-4)
    assert np.abs(left).max() > 0             # a lossy method leaves something behind


@pytest.mark.parametrize("method", C.CLASSES)
def test_payload_bytes_follow_from_the_method(method):
    c = make(method, ratio=0.01, rank=2)
    c.exchange(gradient())
    buckets = math.ceil(N / C.BUCKET)
    k = math.ceil(0.01 * N)
    expected = {"fp16": 2 * N, "bf16": 2 * N, "int8": buckets * C.BUCKET + 4 * buckets,
                "sign": buckets * C.BUCKET // 8 + 4 * buckets, "topk": 8 * k,
                "randomk": 4 * k,
                # P (m x r) and the vectors, then Q (cols x r): conv 16 x 9, fc 10 x 64
                "powersgd": 4 * (16 * 2 + 10 * 2 + 16 + 10 + 9 * 2 + 64 * 2)}[method]
    assert c.payload_bytes == expected


def test_topk_at_one_percent_sends_at_most_a_twentieth_of_dense():
    c = make("topk", ratio=0.01)
    c.exchange(gradient())
    assert c.payload_bytes <= 4 * N / 20


def test_ring_bytes():
    assert C.ring_bytes(1000, 1, "allreduce") == 0
    assert C.ring_bytes(1000, 2, "allreduce") == 1000 == C.ring_bytes(1000, 2, "allgather")
    assert C.ring_bytes(1000, 4, "allreduce") == 1500
    assert C.ring_bytes(1000, 4, "allgather") == 3000


@pytest.mark.parametrize("method", ["topk", "randomk", "powersgd"])
def test_state_restores_exactly(method):
    """A compressor restored from another's state continues with the same numbers."""
    a, b = make(method), make(method)
    for t in range(3):
        a.exchange(gradient(t))
    fresh = b.restore(a.state_arrays(), rank=0)
    assert fresh == []
    for t in range(3, 5):
        assert np.array_equal(a.exchange(gradient(t)), b.exchange(gradient(t)))


def test_a_residual_of_another_world_size_starts_from_zeros():
    a, b = make("topk"), make("topk")
    a.exchange(gradient())
    stacked = {k: np.concatenate([v, v]) for k, v in a.state_arrays().items()}   # 2 ranks'
    assert b.restore(stacked, rank=0) == ["residual"]
    assert not b.state_arrays()["residual"].any()


def test_bfloat16_rounds_to_nearest_even():
    ops = C.NumpyOps()
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 3e38], np.float32)
    back = ops.cast(ops.cast(x, "bfloat16"), "float32")
    assert back.tolist()[:4] == [1.0, 1.0, 1.0 + 2 ** -6, -2.5]


class ThreeIdenticalRanks:
    """An mpi4py-like communicator of 3 ranks that all hold this rank's data."""

    def Get_size(self) -> int:
        return 3

    def Allgather(self, send, recv) -> None:
        recv[:] = np.concatenate([send] * 3)

    def Allreduce(self, send, recv) -> None:
        recv[:] = send * 3

    def Bcast(self, buf, root=0) -> None:
        pass


@pytest.mark.parametrize("method", list(C.CLASSES))
def test_three_ranks_sum_their_shares_and_count_ring_bytes(method):
    """With 3 ranks holding the same gradient, the total is 3x one rank's share, and the
    bytes follow the collective: fp16 over MPI (no float16 sum) gathers."""
    one = make(method)
    three = C.make(method, C.NumpyOps(ThreeIdenticalRanks()), N, shapes=SHAPES, ratio=0.1,
                   rank=2)
    v = gradient()
    mine, total = one.exchange(v), three.exchange(v)
    if method != "powersgd":          # its P and Q are reduced before the factors are formed
        np.testing.assert_allclose(total, 3 * mine, rtol=1e-5, atol=1e-5)
    gathers = method in ("fp16", "bf16", "int8", "sign", "topk")
    assert three.sent_bytes == (2 * one.payload_bytes if gathers
                                else round(4 / 3 * one.payload_bytes))


def test_a_non_finite_step_leaves_the_state_as_it_was():
    """nan_policy = skip: the step is skipped, and its NaN stays out of the residual, Q and
    the cursor, so the next step is finite again."""
    for method in ("int8", "topk", "randomk", "powersgd"):
        c = make(method, skip_nonfinite=True)
        c.exchange(gradient(0))
        before = c.state_arrays()
        bad = gradient(1)
        bad[5] = np.nan
        assert not np.isfinite(c.exchange(bad)).all()
        after = c.state_arrays()
        for name in before:
            assert np.array_equal(before[name], after[name]), (method, name)
        assert np.isfinite(c.exchange(gradient(2))).all(), method


def test_powersgd_resumed_from_another_world_size_keeps_its_q():
    """Q is the same on every rank: a checkpoint of any world size restores it (zeros would
    stop every matrix's update for good); the per-rank residual restarts."""
    a, b = make("powersgd"), make("powersgd")
    for t in range(3):
        a.exchange(gradient(t))
    saved = {k: np.concatenate([v, v]) for k, v in a.state_arrays().items()}   # 2 ranks'
    assert b.restore(saved, rank=0) == ["residual"]
    assert np.array_equal(b.state_arrays()["q000"], a.state_arrays()["q000"])
    fresh = make("powersgd")
    assert sorted(fresh.restore({}, rank=0)) == sorted(fresh.state_arrays())
    assert np.abs(fresh.exchange(gradient())).max() > 0       # the seeded Q, not zeros


@pytest.mark.parametrize("method", C.PUSH_METHODS)
def test_a_parameter_server_push_carries_what_the_sync_exchange_would(method):
    """A worker's encoded push, decoded by a server's codec, is what one rank's compressed
    exchange gives (error feedback carried over three steps), in the bytes it claims."""
    rng = np.random.default_rng(3)
    worker, server = C.PushCodec(method, 3000, ratio=0.05), C.PushCodec(method, 3000, ratio=0.05)
    ref = C.make(method, C.NumpyOps(), 3000, ratio=0.05)
    for _ in range(3):
        v = rng.standard_normal(3000).astype(np.float32)
        buf = worker.encode(v)
        assert buf.dtype == np.uint8 and buf.nbytes == worker.nbytes < 3000 * 4 / 3
        np.testing.assert_array_equal(server.decode(buf), ref.exchange(v))
    with pytest.raises(ValueError, match="no compressed push for 'sign'"):
        C.PushCodec("sign", 10)
