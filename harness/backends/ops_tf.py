"""TensorFlow's tensor operations for the compressors in harness/compress.py (graph-friendly:
state lives in non-trainable tf.Variables), with Horovod's collectives (or none, on one
rank)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from harness.compress import HorovodCollectives


class TFOps(HorovodCollectives):
    """``hvd``: horovod.tensorflow (None: one rank, collectives are the identity)."""

    def __init__(self, hvd: Any = None) -> None:
        self.hvd = hvd
        self.size = 1 if hvd is None else hvd.size()
        self._bit_weights = tf.constant([128, 64, 32, 16, 8, 4, 2, 1], tf.int32)
        self._bit_shifts = tf.constant([7, 6, 5, 4, 3, 2, 1, 0], tf.uint8)

    def all_finite(self, x):
        return tf.reduce_all(tf.math.is_finite(x))

    def constant(self, a):
        return tf.constant(np.array(a))

    def zeros(self, n):
        return tf.zeros([n], tf.float32)

    def cast(self, x, dtype):
        return tf.cast(x, tf.as_dtype(dtype))

    def bitcast(self, x, dtype):
        return tf.bitcast(x, tf.as_dtype(dtype))

    def reshape(self, x, shape):
        return tf.reshape(x, shape)

    def concat(self, xs):
        return tf.concat(xs, 0)

    def pad(self, x, n):
        return tf.pad(x, [[0, n - int(x.shape[0])]])

    def round(self, x):
        return tf.round(x)

    def abs(self, x):
        return tf.abs(x)

    def clip(self, x, lo, hi):
        return tf.clip_by_value(x, lo, hi)

    def where(self, cond, a, b):
        return tf.where(cond, a, b)

    def sum(self, x, axis=None, keepdims=False):
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis, keepdims=False):
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def sqrt(self, x):
        return tf.sqrt(x)

    def topk_indices(self, x, k):
        return tf.math.top_k(tf.abs(x), k, sorted=True).indices

    def gather(self, x, idx):
        return tf.gather(x, idx)

    def scatter_sum(self, idx, values, n):
        return tf.math.unsorted_segment_sum(values, idx, n)

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

    def stack(self, xs, axis):
        return tf.stack(xs, axis=axis)

    def transpose(self, x):
        return tf.transpose(x)

    def pack_bits(self, bits):
        bytes_ = tf.reduce_sum(tf.cast(tf.reshape(bits, [-1, 8]), tf.int32) * self._bit_weights,
                               axis=1)
        return tf.cast(bytes_, tf.uint8)

    def unpack_bits(self, packed):
        bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed[:, None], self._bit_shifts),
                                      tf.constant(1, tf.uint8))
        return tf.reshape(bits, [-1])

    def nbytes(self, x):
        return int(x.shape.num_elements()) * x.dtype.size

    def variable(self, name, init):
        return tf.Variable(init, trainable=False, name=f"harness_{name}")

    def read(self, var):
        return var.read_value()

    def assign(self, var, value):
        return var.assign(tf.reshape(tf.cast(value, var.dtype), var.shape))

    def to_numpy(self, x):
        return np.asarray(x.numpy())
