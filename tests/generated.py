"""Random small transformers in plain PyTorch, and an independent sliced reference.

`architectures()` is a hypothesis strategy of `Arch` (hidden size, heads and KV groups,
head dim, MLP kind, biases, fused or separate projections, residual wiring, norm, tied
embeddings, rotary style); `Generated(arch)` builds the model. `reference(model, keep)`
computes the forward of the model restricted to kept MLP neurons and attention heads by
indexing the ORIGINAL weights directly (no flextron_fx code involved), and
`reference_params` counts that sub-network's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


@dataclass(frozen=True)
class Arch:
    d_model: int
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    mlp_hidden: int
    mlp: str  # swiglu / geglu / gelu / relu
    bias: bool
    fused_qkv: bool
    fused_gate_up: bool
    parallel: bool  # attention and MLP read the same input (GPT-J style)
    norm: str  # rms / layer
    tied: bool
    pre_norm: bool
    rotary: str  # none / half / interleaved
    layers: int
    vocab: int = 32

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")


@st.composite
def architectures(draw) -> Arch:
    mlp = draw(st.sampled_from(["swiglu", "geglu", "gelu", "relu"]))
    group = draw(st.integers(1, 3))
    return Arch(
        d_model=draw(st.sampled_from([8, 12, 16])),
        kv_heads=draw(st.integers(1, 3)),
        group=group,
        head_dim=draw(st.sampled_from([2, 4, 6])),
        mlp_hidden=draw(st.integers(3, 20)),
        mlp=mlp,
        bias=draw(st.booleans()),
        fused_qkv=draw(st.booleans()),
        fused_gate_up=mlp in ("swiglu", "geglu") and draw(st.booleans()),
        parallel=draw(st.booleans()),
        norm=draw(st.sampled_from(["rms", "layer"])),
        tied=draw(st.booleans()),
        pre_norm=draw(st.booleans()),
        rotary=draw(st.sampled_from(["none", "half", "interleaved"])),
        layers=draw(st.integers(1, 2)),
    )


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind in ("swiglu",):
        return F.silu(x)
    if kind in ("geglu", "gelu"):
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def _norm(arch: Arch) -> nn.Module:
    return nn.RMSNorm(arch.d_model, eps=1e-5) if arch.norm == "rms" \
        else nn.LayerNorm(arch.d_model, eps=1e-5)


def rotary(x: torch.Tensor, style: str) -> torch.Tensor:
    """Rotary position embedding on [batch, heads, seq, head_dim]."""
    if style == "none":
        return x
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]  # [seq, d/2]
    cos, sin = ang.cos(), ang.sin()
    if style == "half":
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        if a.fused_qkv:
            self.qkv = nn.Linear(a.d_model, q + 2 * kv, bias=a.bias)
        else:
            self.q = nn.Linear(a.d_model, q, bias=a.bias)
            self.k = nn.Linear(a.d_model, kv, bias=a.bias)
            self.v = nn.Linear(a.d_model, kv, bias=a.bias)
        self.o = nn.Linear(q, a.d_model, bias=a.bias)

    def forward(self, x):
        a = self.a
        b, t, _ = x.shape
        if a.fused_qkv:
            q, k, v = self.qkv(x).split([a.heads * a.head_dim] + [a.kv_heads * a.head_dim] * 2,
                                        dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, -1, a.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, a.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, a.head_dim).transpose(1, 2)
        q, k = rotary(q, a.rotary), rotary(k, a.rotary)
        rep = q.shape[1] // k.shape[1]  # also when it is 1 (an identity the analysis follows)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        if a.fused_gate_up:
            self.gate_up = nn.Linear(a.d_model, 2 * a.mlp_hidden, bias=a.bias)
        elif a.gated:
            self.gate = nn.Linear(a.d_model, a.mlp_hidden, bias=a.bias)
            self.up = nn.Linear(a.d_model, a.mlp_hidden, bias=a.bias)
        else:
            self.up = nn.Linear(a.d_model, a.mlp_hidden, bias=a.bias)
        self.down = nn.Linear(a.mlp_hidden, a.d_model, bias=a.bias)

    def forward(self, x):
        a = self.a
        if a.fused_gate_up:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(_act(a.mlp, gate) * up)
        if a.gated:
            return self.down(_act(a.mlp, self.gate(x)) * self.up(x))
        return self.down(_act(a.mlp, self.up(x)))


class Layer(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.attn, self.mlp = Attention(a), MLP(a)
        self.norm1, self.norm2 = _norm(a), _norm(a)

    def forward(self, x):
        a = self.a
        if a.parallel:
            if a.pre_norm:
                return x + self.attn(self.norm1(x)) + self.mlp(self.norm2(x))
            return self.norm1(x + self.attn(x) + self.mlp(x))
        if a.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class Generated(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.embed = nn.Embedding(a.vocab, a.d_model)
        self.layers = nn.ModuleList(Layer(a) for _ in range(a.layers))
        self.final = _norm(a)
        self.head = nn.Linear(a.d_model, a.vocab, bias=False)
        if a.tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final(x))


def build(a: Arch, seed: int = 0) -> Generated:
    torch.manual_seed(seed)
    model = Generated(a).eval()
    with torch.no_grad():  # no weight at exactly 0 or 1 (norms, biases): permutations show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ---- the independent reference ------------------------------------------------------------

@dataclass
class Keep:
    """Original indices kept in one layer: MLP neurons, KV heads, and per kept KV head
    (same order) its kept query heads as indices within the group."""

    neurons: list[int]
    kv: list[int]
    per_group: list[list[int]]


def _lin(x, w, b):
    return x @ w.t() + (b if b is not None else 0)


def _rows(t: torch.Tensor | None, idx: list[int]):
    return None if t is None else t[torch.tensor(idx, dtype=torch.long)]


def _head_rows(kept_heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in kept_heads for j in range(head_dim)]


def _ref_attention(m: Attention, x: torch.Tensor, keep: Keep) -> torch.Tensor:
    a = m.a
    qh = [g * a.group + j for g, js in zip(keep.kv, keep.per_group) for j in js]
    q_rows, kv_rows = _head_rows(qh, a.head_dim), _head_rows(keep.kv, a.head_dim)
    if a.fused_qkv:
        w, b = m.qkv.weight, m.qkv.bias
        nq, nkv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        parts = [(0, q_rows), (nq, kv_rows), (nq + nkv, kv_rows)]
        ws = [_rows(w, [off + r for r in rows]) for off, rows in parts]
        bs = [_rows(b, [off + r for r in rows]) for off, rows in parts]
    else:
        ws = [_rows(m.q.weight, q_rows), _rows(m.k.weight, kv_rows), _rows(m.v.weight, kv_rows)]
        bs = [_rows(m.q.bias, q_rows), _rows(m.k.bias, kv_rows), _rows(m.v.bias, kv_rows)]
    bsz, t, _ = x.shape
    q, k, v = (_lin(x, w_, b_).view(bsz, t, -1, a.head_dim).transpose(1, 2)
               for w_, b_ in zip(ws, bs))
    q, k = rotary(q, a.rotary), rotary(k, a.rotary)
    rep = len(keep.per_group[0]) if keep.per_group else 1
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(a.head_dim)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    y = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
    wo = m.o.weight[:, torch.tensor(q_rows, dtype=torch.long)]
    return _lin(y.transpose(1, 2).reshape(bsz, t, -1), wo, m.o.bias)


def _ref_mlp(m: MLP, x: torch.Tensor, keep: Keep) -> torch.Tensor:
    a, n = m.a, keep.neurons
    if a.fused_gate_up:
        w, b, h = m.gate_up.weight, m.gate_up.bias, a.mlp_hidden
        gate = _lin(x, _rows(w, n), _rows(b, n))
        up = _lin(x, _rows(w, [h + i for i in n]), _rows(b, [h + i for i in n]))
        hid = _act(a.mlp, gate) * up
    elif a.gated:
        hid = _act(a.mlp, _lin(x, _rows(m.gate.weight, n), _rows(m.gate.bias, n))) * \
            _lin(x, _rows(m.up.weight, n), _rows(m.up.bias, n))
    else:
        hid = _act(a.mlp, _lin(x, _rows(m.up.weight, n), _rows(m.up.bias, n)))
    return _lin(hid, m.down.weight[:, torch.tensor(n, dtype=torch.long)], m.down.bias)


@torch.no_grad()
def reference(model: Generated, ids: torch.Tensor, keep: list[Keep]) -> torch.Tensor:
    """The model's forward with each layer restricted to `keep[layer]`."""
    a = model.a
    x = model.embed(ids)
    for layer, k in zip(model.layers, keep):
        attn = lambda h, lay=layer, k=k: _ref_attention(lay.attn, h, k)
        mlp = lambda h, lay=layer, k=k: _ref_mlp(lay.mlp, h, k)
        n1, n2 = layer.norm1, layer.norm2
        if a.parallel:
            x = x + attn(n1(x)) + mlp(n2(x)) if a.pre_norm else n1(x + attn(x) + mlp(x))
        elif a.pre_norm:
            x = x + attn(n1(x))
            x = x + mlp(n2(x))
        else:
            x = n2((y := n1(x + attn(x))) + mlp(y))
    return model.head(model.final(x))


def reference_params(model: Generated, keep: list[Keep]) -> int:
    """Parameters of the sub-network `keep` selects (a tied head counted once; a parallel
    post-norm layer never reads its norm2, so that norm is no part of the network)."""
    a = model.a
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if a.parallel and not a.pre_norm:
        total -= sum(p.numel() for lay in model.layers for p in lay.norm2.parameters())
    for k in keep:
        heads_gone = a.heads - sum(len(js) for js in k.per_group)
        kv_gone = a.kv_heads - len(k.kv)
        neurons_gone = a.mlp_hidden - len(k.neurons)
        per_q, per_kv = a.head_dim * (a.d_model + a.bias), a.head_dim * (a.d_model + a.bias)
        per_o = a.head_dim * a.d_model  # o's columns; its bias is not sliced
        total -= heads_gone * (per_q + per_o) + 2 * kv_gone * per_kv
        ins = 2 if a.gated else 1
        total -= neurons_gone * (ins * (a.d_model + a.bias) + a.d_model)
    return total
