"""Families beyond the issue's list: elastic where slicing is provably safe, dense otherwise.

Each entry of zoo.MORE says which ops must come out elastic and, for a block that must stay
dense, what its reason names. Whatever the verdict, the converted model must compute the
original at full width and equal its materialized copy at half width.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, calibration, output, token_ids
from zoo import MORE

import flextron_fx


@pytest.mark.parametrize("name", sorted(MORE))
def test_verdict_and_exactness(name):
    factory, kinds, dense_reason = MORE[name]
    model = factory()
    em = flextron_fx.flextronize(model, (token_ids(2, 8),), calibration(), progress=False)
    assert [op.kind for op in em.ops.values()] == kinds
    if dense_reason is None:
        assert em.skipped == []
    else:
        assert len(em.skipped) == 2  # one block per layer, each with its reason
        assert all(dense_reason in s.reason for s in em.skipped), em.skipped
    ids = token_ids(3, 11)
    with torch.no_grad():
        assert_close(em(ids), output(model, ids))
        em.set_widths(0.5)
        assert_close(em(ids), em.materialize()(ids))


class InterleavedQKV(torch.nn.Module):
    """Attention whose fused projection holds query, key and value interleaved per head
    ([heads, 3, head_dim], as Falcon's and BLOOM's), split by `unbind` over the axis of
    three (transformers 5.25's Falcon), then an MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, vocab: int = 128):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.o = torch.nn.Linear(dim, dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, self.heads, 3, -1).unbind(3)
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return self.head(x + self.down(torch.relu(self.up(x))))


def test_query_key_value_unbound_from_one_axis_stay_elastic_and_exact():
    """`unbind` picks every index of the axis of three: that axis stays whole and the heads
    around it stay elastic (it used to pin the heads and leave the attention dense)."""
    torch.manual_seed(0)
    model = InterleavedQKV().eval()
    em = flextron_fx.flextronize(model, (token_ids(2, 8),), calibration(), progress=False)
    assert [op.kind for op in em.ops.values()] == ["attention", "mlp"]
    assert em.skipped == []
    ids = token_ids(3, 11)
    with torch.no_grad():
        assert_close(em(ids), output(model, ids))
        for width in (0.25, 0.5):
            em.set_widths(width)
            assert_close(em(ids), em.materialize()(ids))
