"""Language-model networks of the benchmark workloads: "Transformer Shallow" (LM1B) and an LSTM (Penn Treebank).

Both map token ids ``(B, T)`` to next-token logits ``(B, T, vocab_size)``; train them with
:class:`lightning_sgd.recipes.LanguageModelModule`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        hs = d // self.num_heads
        q, k, v = (z.view(b, t, self.num_heads, hs).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Post-norm decoder block of Vaswani et al. (2017): x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d_model, num_heads, dropout)
        self.ln1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x)))
        return self.ln2(x + self.drop(self.ff(x)))


class TransformerLM(nn.Module):
    """Decoder-only Transformer language model; the defaults are "Transformer Shallow" (Shallue et al. 2018): the
    "base" dimensions of Vaswani et al. (d_model 512, 8 heads, d_ff 2048, dropout 0.1) with 2 layers instead of 6.
    Sinusoidal positions, embeddings scaled by √d_model and tied to the output layer.
    """

    def __init__(self, vocab_size: int = 32768, d_model: int = 512, num_heads: int = 8, d_ff: int = 2048,
                 num_layers: int = 2, dropout: float = 0.1, max_len: int = 1024) -> None:
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        position = torch.arange(max_len)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("positions", pe, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, num_heads, d_ff, dropout) for _ in range(num_layers))

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, V)
        t = tokens.shape[-1]
        if t > self.positions.shape[0]:
            raise ValueError(f"sequence length {t} exceeds max_len={self.positions.shape[0]}.")
        x = self.drop(self.embed(tokens) * math.sqrt(self.d_model) + self.positions[:t])  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return x @ self.embed.weight.T  # tied output layer


class LSTMLM(nn.Module):
    """Embedding → multi-layer LSTM → linear softmax layer. Defaults: the "small" model of Zaremba et al. (2014)
    on Penn Treebank (2 layers of 200 units, no dropout, 10k words)."""

    def __init__(self, vocab_size: int = 10000, hidden: int = 200, num_layers: int = 2, dropout: float = 0.0,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)
        for p in self.parameters():  # uniform(−0.1, 0.1) as Zaremba et al.
            nn.init.uniform_(p, -init_scale, init_scale)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, V)
        h, _ = self.lstm(self.drop(self.embed(tokens)))
        return self.out(self.drop(h))
