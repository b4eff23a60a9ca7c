"""``memopt-func lm``'s model: a small pre-norm GPT over bytes (causal attention, GELU MLP,
learned positions, the output layer tied to the byte embedding)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .lm import LMConfig

VOCAB = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A byte-level decoder; the output layer is the byte embedding, transposed."""

    def __init__(self, context: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's initialisation: residual projections shrink with depth, so the residual
                # stream's scale does not grow with it; logits start near 0 (loss ln 256).
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        return lm_loss(self, idx, targets)


def lm_loss(net: nn.Module, idx: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-byte cross-entropy of ``net`` (a GPT, or a wrapper whose forward is the GPT's):
    the mean over all tokens, or per token ``[batch, context]`` with ``reduction="none"``."""
    loss = F.cross_entropy(net(idx).reshape(-1, VOCAB), targets.reshape(-1), reduction=reduction)
    return loss if reduction == "mean" else loss.view(targets.shape)


def make_model(cfg: LMConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg.context, cfg.d_model, cfg.layers, cfg.heads)
