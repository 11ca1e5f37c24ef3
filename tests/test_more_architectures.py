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
