"""GPT in Keras (Keras 3 or tf_keras); layer names match models.gpt.spec.

Keras' own ``Embedding``, ``Dense`` and ``LayerNormalization`` (epsilon set to PyTorch's 1e-5;
Keras' default is 1e-3). Written here with TensorFlow ops, to agree with PyTorch:

* the learned position embedding (a table added to the token embeddings; Keras has no layer
  for it);
* causal attention on the fused ``qkv`` projection, as PyTorch's
  ``scaled_dot_product_attention(is_causal=True)`` computes it: softmax(q k^T / sqrt(d_head)),
  masked above the diagonal, times v. Keras' ``MultiHeadAttention`` keeps q, k and v in three
  (dim, heads, d_head) kernels; the fused layout maps onto them only with a reshape per
  checkpoint, and its mask convention differs between Keras versions;
* GELU: ``tf.nn.gelu(approximate=False)``, the exact (erf) GELU, PyTorch's default (the Keras
  activation's default changed between versions).
"""

from models.base import ModelSpec
from models.gpt.spec import LN_EPS


def _layers(keras):
    import tensorflow as tf

    class PositionEmbedding(keras.layers.Layer):
        """x + a learned (seq_len, dim) table; canonical name ``<name>.weight``."""

        def __init__(self, seq_len: int, dim: int, **kw) -> None:
            super().__init__(**kw)
            self.seq_len, self.dim = seq_len, dim

        def build(self, input_shape) -> None:
            self.table = self.add_weight(name="weight", shape=(self.seq_len, self.dim),
                                         initializer="zeros")

        def call(self, x):
            return x + tf.cast(self.table, x.dtype)[:tf.shape(x)[1]]

        def canonical_weights(self) -> dict:
            return {"weight": self.table}

    class CausalAttention(keras.layers.Layer):
        """(batch, t, 3 dim) fused q, k, v -> (batch, t, dim), heads as in the spec."""

        def __init__(self, heads: int, **kw) -> None:
            super().__init__(**kw)
            self.heads = heads

        def call(self, qkv):
            b, t = tf.shape(qkv)[0], tf.shape(qkv)[1]
            d = qkv.shape[-1] // 3
            dh = d // self.heads
            # (b, t, 3, heads, dh) -> (3, b, heads, t, dh)
            q, k, v = tf.unstack(tf.transpose(tf.reshape(qkv, (b, t, 3, self.heads, dh)),
                                              (2, 0, 3, 1, 4)))
            scores = tf.matmul(q, k, transpose_b=True) * (1.0 / dh ** 0.5)
            causal = tf.linalg.band_part(tf.ones((t, t), tf.bool), -1, 0)
            scores = tf.where(causal, scores, tf.constant(float("-inf"), scores.dtype))
            y = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
            return tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (b, t, d))

    class GELU(keras.layers.Layer):
        def call(self, x):
            return tf.nn.gelu(x, approximate=False)

    return PositionEmbedding, CausalAttention, GELU


def build(spec: ModelSpec, keras):
    PositionEmbedding, CausalAttention, GELU = _layers(keras)
    L = keras.layers
    (seq_len,), vocab = spec.input_shape, spec.num_classes
    dim, heads = spec.options["dim"], spec.options["heads"]

    def norm(name: str):
        return L.LayerNormalization(epsilon=LN_EPS, name=name)

    tokens = keras.Input(shape=(seq_len,), dtype="int64")
    x = L.Embedding(vocab, dim, name="tok_emb")(tokens)
    x = PositionEmbedding(seq_len, dim, name="pos_emb")(x)
    for i in range(spec.options["layers"]):
        p = f"blocks.{i}"
        a = L.Dense(3 * dim, name=f"{p}.attn.qkv")(norm(f"{p}.ln1")(x))
        a = L.Dense(dim, name=f"{p}.attn.proj")(CausalAttention(heads)(a))
        x = L.Add()([x, a])
        m = GELU()(L.Dense(4 * dim, name=f"{p}.mlp.fc")(norm(f"{p}.ln2")(x)))
        x = L.Add()([x, L.Dense(dim, name=f"{p}.mlp.proj")(m)])
    logits = L.Dense(vocab, use_bias=False, name="head")(norm("ln_f")(x))
    return keras.Model(tokens, logits, name="gpt")
