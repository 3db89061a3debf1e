"""GPT in PyTorch; parameter names match models.gpt.spec. Takes (batch, seq_len) token ids.

Attention is PyTorch's own ``scaled_dot_product_attention`` with ``is_causal=True``; layer
norm is ``nn.LayerNorm`` (eps 1e-5) and GELU the exact (erf) one, ``F.gelu``'s default.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelSpec
from models.gpt.spec import LN_EPS


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (b, t, 3, heads, d/heads) -> three (b, heads, t, d/heads)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        (seq_len,), vocab = spec.input_shape, spec.num_classes
        dim, heads = spec.options["dim"], spec.options["heads"]
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(spec.options["layers"]))
        self.ln_f = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb.weight[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(spec: ModelSpec) -> nn.Module:
    return GPT(spec)
