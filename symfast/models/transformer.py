"""A decoder-only byte transformer, the language model of ``symfast train --task lm``.

Attention is written with plain ``nn.Linear`` projections (not ``nn.MultiheadAttention``, whose
packed ``in_proj_weight`` is not a module :func:`symfast.convert` can swap), and each MLP is an
``nn.Sequential(Linear, GELU, Linear)`` so that :func:`symfast.export` can physically remove the
hidden units that group sparsity kills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ByteTransformer"]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    r"""Decoder-only transformer over bytes: logits ``(B, T, 256)`` for the next byte.

    Pre-LayerNorm blocks (causal self-attention, GELU MLP), learned positions, untied output head.
    """

    def __init__(self, *, width: int = 128, depth: int = 2, heads: int = 4, context: int = 64,
                 mlp_ratio: int = 4, vocab: int = 256) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ByteTransformer: width ({width}) must be divisible by heads ({heads})")
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"ByteTransformer: sequence length {t} exceeds the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))
