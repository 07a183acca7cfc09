"""Small models whose Hessian and Fisher can be computed exactly, and the exact Hessian."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)


class MLP(nn.Module):
    """10 -> 24 -> 24 -> 4 tanh network: 1,000 parameters, smooth (no ReLU kinks)."""

    def __init__(self, inputs: int = 10, hidden: int = 24, classes: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))


class TinyTransformer(nn.Module):
    """One pre-norm block: nn.MultiheadAttention (fused SDPA on CPU) and an MLP."""

    def __init__(self, vocab: int = 7, width: int = 8, heads: int = 2, length: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(length, width))
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True, dropout=0.1)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        a = self.norm(h)
        h = h + self.attention(a, a, a, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        h = h + self.mlp(h)
        return self.out(h)


class SdpaBlock(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention directly."""

    def __init__(self, vocab: int = 7, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return self.out(h)


def call(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs)


def exact_hessian(objective, parameters) -> torch.Tensor:
    """Dense Hessian of the objective on the flattened parameters (math attention kernel,
    which has double backward), symmetrised."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(flat: torch.Tensor) -> torch.Tensor:
        views = parameters.unflatten(flat)
        return objective(dict(zip(parameters.names, views, strict=True)))

    flat = parameters.flatten(parameters.params)
    with sdpa_kernel(SDPBackend.MATH):
        h = torch.autograd.functional.hessian(f, flat, vectorize=True).double()
    return (h + h.T) / 2
