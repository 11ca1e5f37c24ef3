"""Issue 16, items 1, 2 and 4: no silently wrong answers from the analysis.

* a per-head tensor entering the attention core through its mask (ALiBi slopes in a
  buffer) is not permuted with the heads: the block must stay dense, and say why;
* one parameter applied in several places (ALBERT-style sharing) cannot hold one order
  per use: such blocks stay dense, and `num_params` counts what `materialize` holds;
* every linear layer the analysis sees ends up in a block, in `skipped`, or among the
  named fixed parts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, calibration, param_count, token_ids
from torch import nn
from zoo import MORE, ZOO, _hf_extra, sample_inputs

import flextron_fx
from flextron_fx.analyze import FIXED_PARTS, analyze
from flextron_fx.analyze.propagate import _projection
from flextron_fx.trace import trace

VOCAB, DIM, HEADS = 128, 32, 4


# ---- item 1: a per-head attention bias --------------------------------------------------
class AlibiAttention(nn.Module):
    """Attention with one ALiBi slope per head, kept in a registered buffer."""

    def __init__(self, core: str):
        super().__init__()
        self.core = core
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.register_buffer("slopes", torch.tensor([2.0 ** (-8 * (h + 1) / HEADS)
                                                     for h in range(HEADS)]))

    def forward(self, x):
        B, T, C = x.shape

        def heads(t):
            return t.view(B, T, HEADS, C // HEADS).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        pos = torch.arange(T, device=x.device)
        dist = (pos[None, :] - pos[:, None]).float()
        bias = self.slopes.view(1, HEADS, 1, 1) * dist.view(1, 1, T, T)  # [1, heads, T, T]
        if self.core == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(C // HEADS) + bias
            y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class AlibiLM(nn.Module):
    def __init__(self, core: str = "sdpa"):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.attn = AlibiAttention(core)
        self.fc1, self.fc2 = nn.Linear(DIM, 64), nn.Linear(64, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.attn(x)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


@pytest.mark.parametrize("core", ["sdpa", "matmul"])
def test_per_head_attention_bias_keeps_the_block_dense_and_exact(core):
    model = AlibiLM(core).eval()
    em = flextron_fx.flextronize(model, (token_ids(2, 8),), calibration(), progress=False)
    ids = token_ids(3, 11)
    with torch.no_grad():
        assert_close(em(ids), model(ids))  # the old analysis permuted heads: ~1e-2 off
    assert [op.kind for op in em.ops.values()] == ["mlp"]
    [skip] = em.skipped
    assert skip.module_path == "attn"
    assert "attention left dense" in skip.reason
    if core == "sdpa":
        assert "per-head attention mask" in skip.reason
    em.set_widths(0.5)  # the rest of the model still shrinks, and runs
    with torch.no_grad():
        assert_close(em(ids), em.materialize()(ids))
    assert em.num_params() == param_count(em.materialize())


def test_mask_without_a_head_axis_does_not_pin_the_heads():
    """A [T, T] causal mask passed as attn_mask is the same for every head: still elastic."""

    class Causal(AlibiAttention):
        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2)
                       for t in (self.q(x), self.k(x), self.v(x)))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o(y.transpose(1, 2).reshape(B, T, C))

    model = AlibiLM()
    model.attn = Causal("sdpa")
    model.eval()
    em = flextron_fx.flextronize(model, (token_ids(2, 8),), calibration(), progress=False)
    assert [op.kind for op in em.ops.values()] == ["attention", "mlp"]
    assert em.skipped == []
    ids = token_ids(3, 11)
    with torch.no_grad():
        assert_close(em(ids), model(ids))
        em.set_widths(0.5)
        assert_close(em(ids), em.materialize()(ids))


# ---- item 2: weights shared by several blocks -------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(8, hidden), nn.Linear(hidden, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class SharedLinear(nn.Module):
    """One MLP layer applied twice (ALBERT-style), and a separate, unshared MLP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared, self.other = MLP(32), MLP(24)

    def forward(self, x):
        for _ in range(2):
            x = x + self.shared(x)
        return x + self.other(x)


class HalfShared(nn.Module):
    """Two MLPs that share only their down projection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.down = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = x + self.down(torch.relu(self.a(x)))
        return x + self.down(torch.tanh(self.b(x)))


@pytest.mark.parametrize("make, elastic", [(SharedLinear, ["other"]), (HalfShared, [])])
def test_shared_weights_stay_dense_and_counts_are_exact(make, elastic):
    model = make().eval()
    sample = (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)),)
    calib = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))
    if not elastic:
        with pytest.raises(flextron_fx.UnsupportedModelError, match="also read by"):
            flextron_fx.flextronize(model, sample, calib, progress=False)
        return
    em = flextron_fx.flextronize(model, sample, calib, progress=False)
    assert [op.module for op in em.ops.values()] == elastic
    assert len(em.skipped) == 2 and all("also read by" in s.reason for s in em.skipped)
    with torch.no_grad():
        assert_close(em(x), model(x))
    for op in em.ops.values():
        for w in op.candidates:
            em.set_widths({op.name: w})
            dense = em.materialize()
            assert em.num_params() == param_count(dense)
            with torch.no_grad():
                assert_close(em(x), dense(x))


def test_albert_shares_its_layer_and_stays_exact():
    """ALBERT applies one layer's weights at every depth: nothing may be sliced twice."""
    model = _hf_extra("AlbertModel", "AlbertConfig", vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      embedding_size=32)()
    with pytest.raises(flextron_fx.UnsupportedModelError, match="also read by"):
        flextron_fx.flextronize(model, (token_ids(2, 8),), calibration(), progress=False)


# ---- item 4: every linear layer accounted for --------------------------------------------
def _unaccounted(name: str, model):
    traced = trace(model, sample_inputs(name))
    gm = traced.graph_module
    a = analyze(gm, traced.sample_inputs)
    seen = [n for n in gm.graph.nodes if n.op == "call_function" and _projection(gm, n)]
    where: dict[str, str] = {}
    for b in a.blocks:
        for p in b.projections:
            where[p.node.name] = f"block {b.name}"
    for s in a.skipped:
        assert s.reason
        for n in s.nodes:
            where.setdefault(n, "skipped")
    for f in a.fixed:
        assert f.part in FIXED_PARTS
        where.setdefault(f.node, f.part)
    return a, {n.name: where.get(n.name) for n in seen}


FAMILIES = sorted(ZOO) + sorted(MORE)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_linear_layer_is_in_a_block_skipped_or_fixed(name):
    model = ZOO[name]() if name in ZOO else MORE[name][0]()
    a, where = _unaccounted(name, model)
    assert where and None not in where.values(), where
    fixed = {f.part for f in a.fixed}
    if name not in ("bert", "t5_encoder"):  # encoders return hidden states, LMs logits
        assert "output head" in fixed
    if name == "bert":  # BertModel's pooler is not on the traced output
        assert "unused" in fixed
    if name == "gemma":  # one KV head: k and v stay whole, as part of the attention
        assert sum(f.part == "unsliced part of a block" for f in a.fixed) == 4


def test_mixture_of_experts_router_is_reported_not_silently_dense():
    """Mixtral: the experts are no linear layer the analysis slices, and its router is no
    block; the router used to vanish from every list without a word."""
    model = _hf_extra("MixtralForCausalLM", "MixtralConfig", vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_local_experts=2)()
    a, where = _unaccounted("mixtral", model)
    assert None not in where.values(), where
    routers = [s for s in a.skipped if s.module_path.endswith("mlp.gate")]
    assert len(routers) == 2 and all("mixture-of-experts" in s.reason for s in routers)
