"""Analysis bugs the generated-architecture test found (issue 16, item 9), each pinned by
one drawn architecture that failed before the fix.

* `repeat_interleave` on the KV-head axis (GQA written without HF's repeat_kv) was an op
  the analysis did not know: with separate q/k/v the query heads were read as 9 independent
  groups over 3 KV heads (permuting them broke full width), with a single KV head the
  repeat count was never resized (a crash at a smaller width);
* a fused qkv projection with grouped-query heads came out as `heads` groups;
* a parallel residual reported the output head as a "skipped" MLP;
* a single-head attention was sliced as an MLP over its value features;
* K/V heads that leave through an op with no rule and come back with another head count
  must pin the attention dense, not be matched to query heads by position.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close, calibration
from generated import Arch, build
from test_generated import check_architecture
from torch import nn

import flextron_fx
from flextron_fx import FlextronConfig

BASE = Arch(d_model=8, kv_heads=3, group=3, head_dim=2, mlp_hidden=5, mlp="gelu", bias=False,
            fused_qkv=False, fused_gate_up=False, parallel=False, norm="rms", tied=False,
            pre_norm=True, rotary="none", layers=1)


def _arch(**kw) -> Arch:
    return dataclasses.replace(BASE, **kw)


def _convert(arch: Arch, head_mode: str = "query"):
    model = build(arch)
    em = flextron_fx.flextronize(model, (torch.randint(0, arch.vocab, (2, 6)),),
                                 calibration(n=8, seq=6) % arch.vocab,
                                 config=FlextronConfig(head_mode=head_mode, mlp_multiple=1,
                                                       compensate="none"),  # vs plain slices
                                 progress=False)
    return model, em


def _attention(em):
    (name,) = [n for n, op in em.ops.items() if op.kind == "attention"]
    return em.block(name), em.orders[name]


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_gqa_by_repeat_interleave_is_groups_by_queries(fused_qkv):
    arch = _arch(fused_qkv=fused_qkv)
    _, em = _convert(arch)
    block, order = _attention(em)
    assert set(block.classes) == {"groups", "per_group"}
    assert block.sizes["kv_heads"] == 3 and block.sizes["heads"] == 9
    assert sorted(order["groups"]) == [0, 1, 2]
    check_architecture(arch, "query", 0)
    check_architecture(arch, "group", 0)


@pytest.mark.parametrize("arch", [
    _arch(group=1),  # repeat_interleave(1): an identity
    _arch(kv_heads=1, group=2, head_dim=6, rotary="interleaved", pre_norm=False),  # crashed
    _arch(kv_heads=2, group=2, rotary="half", fused_gate_up=True, mlp="geglu"),
], ids=["repeats-1", "one-kv-head-interleaved", "two-groups-rotary"])
def test_repeat_interleave_attention_is_elastic_and_exact(arch):
    _, em = _convert(arch)
    _attention(em)
    assert not em.skipped, em.skipped
    for mode, seed in (("query", 479), ("group", 1)):
        check_architecture(arch, mode, seed)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_parallel_residual_reports_no_skipped_block(pre_norm):
    arch = _arch(parallel=True, pre_norm=pre_norm)
    _, em = _convert(arch)
    assert not em.skipped, em.skipped
    check_architecture(arch, "query", 2)


def test_single_head_attention_is_skipped_not_an_mlp():
    arch = _arch(kv_heads=1, group=1, head_dim=6, rotary="interleaved", layers=2,
                 pre_norm=False)
    _, em = _convert(arch)
    assert [op.kind for op in em.ops.values()] == ["mlp", "mlp"]
    assert [(s.module_path, "single head" in s.reason) for s in em.skipped] == \
        [("layers.0.attn", True), ("layers.1.attn", True)]
    check_architecture(arch, "query", 7)


class _TiledKV(nn.Module):
    """Query head h reads K/V head h % kv (torch `repeat`, which the analysis has no rule
    for): matching query heads to K/V heads by position would be wrong."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 12)
        self.q, self.k, self.v = nn.Linear(12, 12), nn.Linear(12, 4), nn.Linear(12, 4)
        self.o, self.head = nn.Linear(12, 12), nn.Linear(12, 32)
        self.mlp = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12))

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 6, 2).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 2).transpose(1, 2).repeat(1, 3, 1, 1)
        v = self.v(x).view(b, t, 2, 2).transpose(1, 2).repeat(1, 3, 1, 1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, 12))
        return self.head(x + self.mlp(x))


def test_heads_through_an_unknown_op_pin_the_attention():
    torch.manual_seed(0)
    model = _TiledKV().eval()
    ids = torch.randint(0, 32, (3, 5))
    em = flextron_fx.flextronize(model, (torch.randint(0, 32, (2, 6)),),
                                 calibration(n=8, seq=6) % 32, progress=False)
    assert [op.kind for op in em.ops.values()] == ["mlp"]
    assert [s.module_path for s in em.skipped] == [""]  # the attention, at the model's root
    assert "cannot follow" in em.skipped[0].reason, em.skipped
    with torch.no_grad():
        assert_close(em(ids), model(ids))
