"""The gated cross-attention block a decoder layer gets: shared frozen projections plus trainable deltas.

Before decoder layer ``i`` the block adds

    h ← h + tanh(α_i) · o(softmax(q(n(h)) k(n(m_i))ᵀ / √d) v(n(m_i)))          (Flamingo gate, α_i = 0)

where ``m_i`` is the memory. Because memory and query live in the same residual stream, the block starts
from the layer's own attention projections (shared, frozen) plus trainable low-rank deltas, and from
copies of its RMSNorm; at step 0 it computes what the layer's self-attention would compute over the fact
tokens (without positions), gated off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rag_persona.errors import RagPersonaError
from rag_persona.xattn.config import XattnConfig


class RMSNorm(nn.Module):
    """A trainable fp32 copy of the layer's RMSNorm (same formula as Llama/Qwen2)."""

    def __init__(self, weight, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x32.to(dtype)


class LowRank(nn.Module):
    """A LoRA-style delta B·A·x·(alpha/rank), B initialised to zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype)) * self.scale


class GatedCrossAttention(nn.Module):
    """Cross-attention from a decoder layer's input into memory, gated by tanh(gate), gate = 0 at start."""

    def __init__(self, layer, config: XattnConfig, mem_dim: int):
        super().__init__()
        attn = layer.self_attn
        self._attn = (attn,)  # the frozen projections are shared, not registered (never saved or trained)
        self.head_dim = int(
            getattr(attn, "head_dim", attn.q_proj.out_features // attn.config.num_attention_heads)
        )
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        hidden = attn.q_proj.in_features
        norm = layer.input_layernorm
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.q_norm = RMSNorm(norm.weight, eps)
        self.shared_kv = config.memory == "hidden"
        rank, alpha = config.rank, config.alpha
        kv_out = self.n_kv * self.head_dim
        self.q_delta = LowRank(hidden, self.n_heads * self.head_dim, rank, alpha) if rank else None
        self.o_delta = (
            LowRank(self.n_heads * self.head_dim, attn.o_proj.out_features, rank, alpha) if rank else None
        )
        if self.shared_kv:
            self.m_norm = RMSNorm(norm.weight, eps)
            self.k_delta = LowRank(mem_dim, kv_out, rank, alpha) if rank else None
            self.v_delta = LowRank(mem_dim, kv_out, rank, alpha) if rank else None
        else:
            # A foreign encoder's space: fresh full key/value maps (small std so the start is tame).
            self.m_norm = nn.LayerNorm(mem_dim)
            self.k_proj = nn.Linear(mem_dim, kv_out)
            self.v_proj = nn.Linear(mem_dim, kv_out)
            for lin in (self.k_proj, self.v_proj):
                nn.init.normal_(lin.weight, std=mem_dim**-0.5)
                nn.init.zeros_(lin.bias)
        self.gate = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _add(base_out, delta, x):
        return base_out if delta is None else base_out + delta(x)

    def memory_kv(self, memory, mask):
        """(B, M, D) memory + (B, M) mask → keys and values (B, kv_heads, M, head_dim), ready to attend."""
        attn = self._attn[0]
        b, m, _ = memory.shape
        if self.shared_kv:
            dtype = attn.k_proj.weight.dtype
            x = self.m_norm(memory.to(dtype))
            k = self._add(attn.k_proj(x), self.k_delta, x)
            v = self._add(attn.v_proj(x), self.v_delta, x)
        else:
            dtype = attn.q_proj.weight.dtype
            x = self.m_norm(memory.float())
            k, v = self.k_proj(x).to(dtype), self.v_proj(x).to(dtype)
        k = k.view(b, m, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, m, self.n_kv, self.head_dim).transpose(1, 2)
        return k, v, mask

    def forward(self, hidden, kv, query_mask=None):
        k, v, mask = kv
        attn = self._attn[0]
        b, t, _ = hidden.shape
        if k.shape[0] != b:
            if k.shape[0] != 1:
                raise RagPersonaError(f"xattn: memory batch {k.shape[0]} does not match input batch {b}")
            k, v, mask = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), mask.expand(b, -1)
        x = self.q_norm(hidden)
        q = self._add(attn.q_proj(x), self.q_delta, x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        has = mask.any(dim=-1)
        safe = mask | ~has[:, None]  # an item without memory attends to its padding, then is zeroed
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=safe[:, None, None, :], scale=self.scaling
        )
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        out = self._add(attn.o_proj(out), self.o_delta, out)
        if not bool(has.all()):
            out = out * has[:, None, None].to(out.dtype)
        if query_mask is not None:
            out = out * query_mask[..., None].to(out.dtype)
        return hidden + torch.tanh(self.gate).to(hidden.dtype) * out
