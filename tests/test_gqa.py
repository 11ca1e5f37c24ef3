"""Grouped-query attention (llama zoo model: 4 query heads over 2 KV heads, head_dim 16)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_close, output, token_ids

HEAD_DIM = 16
# HF repeat_kv: query head h reads KV head h // 2
KEPT_Q_HEADS = {"query": [0, 2], "group": [0, 1]}  # at width 2, with no calibration
KEPT_KV_HEADS = {"query": [0, 1], "group": [0]}


def _rows(heads: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


def _attention_ops(em):
    return [n for n, op in em.ops.items() if op.kind == "attention"]


def _weights(em, dense, op_name):
    return {p.role: dense.get_parameter(p.weight) for p in em.block(op_name).projections}


@pytest.mark.parametrize("mode", ["query", "group"])
def test_width_two_slices_the_right_weights(mode, zoo_converted):
    _, em = zoo_converted("llama", head_mode=mode)
    ops = _attention_ops(em)
    assert [em.ops[n].candidates for n in ops] == [(2, 4), (2, 4)]
    em.set_widths({n: 2 for n in ops})
    dense = em.materialize()
    ids = token_ids(3, 9)
    assert_close(output(em, ids), output(dense, ids))
    kv_rows = len(KEPT_KV_HEADS[mode]) * HEAD_DIM
    for n in ops:
        w = _weights(em, dense, n)
        assert w["q"].shape == (2 * HEAD_DIM, 64)
        assert w["o"].shape == (64, 2 * HEAD_DIM)
        # "query" keeps both KV heads (full size); "group" drops the second group
        assert w["k"].shape == w["v"].shape == (kv_rows, 64)


@pytest.mark.parametrize("mode", ["query", "group"])
def test_width_two_equals_a_smaller_llama(mode, zoo_converted):
    """Without calibration no head moves, so the kept heads are known: build the same
    network as a genuine 2-head llama from the original weights and compare."""
    model, em = zoo_converted("llama", calibrated=False, head_mode=mode)
    em.set_widths({n: 2 for n in _attention_ops(em)})
    q_rows, kv_rows = _rows(KEPT_Q_HEADS[mode]), _rows(KEPT_KV_HEADS[mode])

    cfg = model.config.to_dict()
    cfg.update(num_attention_heads=2, num_key_value_heads=len(KEPT_KV_HEADS[mode]),
               head_dim=HEAD_DIM)
    cfg.pop("model_type")
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    state = {}
    for key, w in model.state_dict().items():
        if key.endswith("q_proj.weight"):
            w = w[q_rows]
        elif key.endswith(("k_proj.weight", "v_proj.weight")):
            w = w[kv_rows]
        elif key.endswith("o_proj.weight"):
            w = w[:, q_rows]
        state[key] = w
    small.load_state_dict(state)

    ids = token_ids(2, 10)
    expected = output(small, ids)
    assert not torch.allclose(expected, output(model, ids), atol=1e-3)  # heads did matter
    assert_close(output(em, ids), expected)
    assert_close(output(em.materialize(), ids), expected)


@pytest.mark.parametrize("mode", ["query", "group"])
def test_calibrated_permutation_keeps_heads_in_their_kv_group(mode, zoo_converted):
    model, em = zoo_converted("llama", head_mode=mode)
    ids = token_ids(3, 11)
    assert_close(output(em, ids), output(model, ids))

    orig = dict(model.named_parameters())
    moved = False
    for n in _attention_ops(em):
        w = {p.role: (em.graph_module.get_parameter(p.weight),
                      orig[p.weight.removeprefix(em.param_prefix)])
             for p in em.block(n).projections}

        def source(role, pos, w=w):
            new, old = w[role]
            block = new[pos * HEAD_DIM:(pos + 1) * HEAD_DIM]
            hits = [h for h in range(old.shape[0] // HEAD_DIM)
                    if torch.equal(block, old[h * HEAD_DIM:(h + 1) * HEAD_DIM])]
            assert len(hits) == 1, (role, pos, hits)
            return hits[0]

        kv_src = [source("k", g) for g in range(2)]
        assert kv_src == [source("v", g) for g in range(2)]
        q_src = [source("q", h) for h in range(4)]
        assert sorted(q_src) == [0, 1, 2, 3]
        # query head at new position h reads new KV head h // 2: it must have come from
        # the group of the KV head that now sits there
        assert [s // 2 for s in q_src] == [kv_src[h // 2] for h in range(4)]
        moved |= q_src != [0, 1, 2, 3]
    assert moved, "calibration left every head in place; the test would prove nothing"
