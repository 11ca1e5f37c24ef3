"""A block whose hidden axis goes through an op the analysis does not understand stays dense,
is reported, and does not stop the rest of the model from shrinking."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, param_count
from torch import nn

import flextron_fx

ODD_OPS = {
    "cumsum": lambda h: torch.cumsum(h, -1),
    "sort": lambda h: torch.sort(h, -1).values,
    "softmax": lambda h: torch.softmax(h, -1),  # understood, but needs the full axis
}
SAMPLE = (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)),)
CALIB = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(1))
X = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))


class OddThenNormal(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        torch.manual_seed(0)
        self.op = ODD_OPS[op]
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)  # odd block
        self.c, self.d = nn.Linear(8, 64), nn.Linear(64, 8)  # normal block

    def forward(self, x):
        x = x + self.b(torch.relu(self.op(self.a(x))))
        return x + self.d(torch.relu(self.c(x)))


def _slice_normal_block(model: OddThenNormal, keep: int) -> OddThenNormal:
    """The model with only the first `keep` neurons of the normal block (no permutation)."""
    small = copy.deepcopy(model)
    c, d = nn.Linear(8, keep), nn.Linear(keep, 8)
    with torch.no_grad():
        c.weight.copy_(model.c.weight[:keep])
        c.bias.copy_(model.c.bias[:keep])
        d.weight.copy_(model.d.weight[:, :keep])
        d.bias.copy_(model.d.bias)
    small.c, small.d = c, d
    return small


@pytest.fixture(scope="module")
def converted():
    cache = {}

    def get(op: str, calibrated: bool):
        if (op, calibrated) not in cache:
            model = OddThenNormal(op)
            em = flextron_fx.flextronize(model, SAMPLE, CALIB if calibrated else None,
                                         progress=False)
            cache[op, calibrated] = model, em
        model, em = cache[op, calibrated]
        em.set_full()
        return model, em

    return get


@pytest.mark.parametrize("op", ODD_OPS)
def test_only_the_normal_block_is_elastic(op, converted):
    _, em = converted(op, True)
    assert len(em.ops) == 1
    (name,) = em.ops
    assert {p.role: p.weight for p in em.block(name).projections} == \
        {"up": "c.weight", "down": "d.weight"}
    assert em.ops[name].full == 64


@pytest.mark.parametrize("op", ODD_OPS)
def test_outputs_exact_at_full_and_half_width(op, converted):
    model, em = converted(op, True)
    with torch.no_grad():
        assert_close(em(X), model(X))

    model, em = converted(op, False)
    em.set_widths(0.5)
    (name,) = em.ops
    assert em.widths == {name: 32}
    with torch.no_grad():
        expected = _slice_normal_block(model, 32)(X)
        assert not torch.allclose(expected, model(X), atol=1e-3)
        assert_close(em(X), expected)
    dense = em.materialize()
    assert param_count(dense) == param_count(model) - 32 * 8 - 32 - 8 * 32
    with torch.no_grad():
        assert_close(dense(X), expected)


@pytest.mark.parametrize("op", ["cumsum", "sort", "softmax"])
def test_odd_block_is_reported_with_the_op(op, converted):
    _, em = converted(op, True)
    assert any(op in s.reason for s in em.skipped), em.skipped


@pytest.mark.parametrize("op", ODD_OPS)
def test_elastic_block_is_not_reported_as_dense(op, converted):
    _, em = converted(op, True)
    (name,) = em.ops
    elastic_nodes = {p.node.name for p in em.block(name).projections}
    reported = {s.node.split(" ")[0].lstrip("%") for s in em.skipped}
    assert not reported & elastic_nodes, em.skipped
    assert len(em.skipped) == 1
