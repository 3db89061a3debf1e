"""A small GPT-style decoder-only language model, framework-free.

Token and learned position embeddings, ``layers`` pre-norm blocks (causal multi-head
self-attention, then an MLP of width 4 x ``dim`` with exact (erf) GELU, each added to the
residual stream), a final layer norm and an output head (not tied to the token embedding). No
dropout, so both frameworks compute the same function of the same weights.

A sample is ``seq_len`` token ids; the output is ``(seq_len, vocab)`` logits, one next-token
distribution per position. The canonical layout is PyTorch's (``nn.Linear`` weights are
``(out, in)``); the attention's fused ``qkv`` projection puts q, k and v one after another, and
within each, head ``h`` owns features ``h * dim/heads`` to ``(h + 1) * dim/heads``.

Initial weights follow GPT-2: normal with standard deviation 0.02 for the embeddings and every
linear layer, zero biases, layer norms at (1, 0).
"""

from models.base import DENSE, EMBEDDING, VECTOR, ModelSpec, SpecBuilder

DEFAULT_INPUT_SHAPE = (64,)       # seq_len
DEFAULT_CLASSES = 256             # vocabulary: bytes
DEFAULT_OPTIONS = {"layers": 2, "dim": 64, "heads": 4}
LN_EPS = 1e-5                     # PyTorch's LayerNorm default; Keras' is 1e-3 (set explicitly)


def build_spec(input_shape: tuple[int, ...], num_classes: int, layers: int = 2, dim: int = 64,
               heads: int = 4) -> ModelSpec:
    if len(input_shape) != 1:
        raise ValueError(f"gpt takes sequences of token ids (seq_len,), not samples of shape "
                         f"{tuple(input_shape)}")
    if dim % heads:
        raise ValueError(f"gpt_dim = {dim} does not divide into gpt_heads = {heads} heads")
    (seq_len,), vocab = input_shape, num_classes
    b = SpecBuilder("gpt", input_shape, num_classes)
    b._add("tok_emb.weight", (vocab, dim), EMBEDDING, "normal")
    b._add("pos_emb.weight", (seq_len, dim), EMBEDDING, "normal")

    def linear(name: str, fin: int, fout: int, bias: bool = True) -> None:
        b._add(f"{name}.weight", (fout, fin), DENSE, "normal")
        if bias:
            b._add(f"{name}.bias", (fout,), VECTOR, "zeros")
        b.spec.flops_per_sample += 2 * fin * fout * seq_len

    def norm(name: str) -> None:
        b._add(f"{name}.weight", (dim,), VECTOR, "ones")
        b._add(f"{name}.bias", (dim,), VECTOR, "zeros")

    for i in range(layers):
        p = f"blocks.{i}"
        norm(f"{p}.ln1")
        linear(f"{p}.attn.qkv", dim, 3 * dim)
        # q k^T and the weighted sum of v, counted over all seq_len x seq_len pairs (the
        # usual convention; a causal kernel may skip the masked half)
        b.spec.flops_per_sample += 2 * 2 * seq_len * seq_len * dim
        linear(f"{p}.attn.proj", dim, dim)
        norm(f"{p}.ln2")
        linear(f"{p}.mlp.fc", dim, 4 * dim)
        linear(f"{p}.mlp.proj", 4 * dim, dim)
    norm("ln_f")
    linear("head", dim, vocab, bias=False)
    b.spec.options = {"layers": layers, "dim": dim, "heads": heads}
    b.spec.tokens_per_sample = seq_len
    return b.spec
