"""Widths as graph values, and per-token (routed) execution against per-token references."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, calibration, output
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import WidthError
from flextron_fx.elastic.ops import ElasticRegion, ShapeSize, WeightSlice, WidthSource, WidthSpan

# SwiGLU + GQA, GeGLU + one KV head, GELU + fused qkv + biases (addmm), ReLU + biases,
# fused qkv and fused gate_up
ARCHS = ["llama", "gemma", "gpt2", "opt", "phi3"]
CASES = [(a, m) for a in ARCHS for m in ("group", "query")]
BATCH, SEQ = 3, 6


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


class Dense:
    """Materialized copies of an elastic model, one per width setting (built once)."""

    def __init__(self, em):
        self.em, self.cache = em, {}

    def __call__(self, widths: dict, ids: torch.Tensor) -> torch.Tensor:
        key = tuple(sorted(widths.items()))
        if key not in self.cache:
            self.cache[key] = self.em.materialize(widths)
        return output(self.cache[key], ids)


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_width_comes_from_a_graph_node(zoo_converted, arch):
    _, em = zoo_converted(arch)
    gm = em.graph_module
    nodes = em.width_nodes()
    assert set(nodes) == set(em.ops)
    consumers = 0
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, (WeightSlice, ShapeSize, ElasticRegion, WidthSpan)):
            widths = node.args[1:2] if isinstance(mod, (WeightSlice, ElasticRegion)) \
                else node.args
            for w in widths:  # a width node, or the span node that reads one
                src = w.args[0] if isinstance(_module(gm, w), WidthSpan) else w
                assert isinstance(_module(gm, src), WidthSource), node.format_node()
            consumers += 1
    assert consumers > 4 * len(em.ops) // 2
    # every MLP is one node, and every block can take a width per token
    mlps = [n for n in gm.graph.nodes if isinstance(_module(gm, n), ElasticRegion)
            and _module(gm, n).kind == "mlp"]
    assert len(mlps) == sum(op.kind == "mlp" for op in em.ops.values())
    assert all(em.routable(n) for n in em.ops)
    pattern = _module(gm, mlps[0]).pattern
    assert pattern["activation"] in ("silu", "gelu", "gelu_tanh", "composite")
    assert set(pattern["projections"]) >= {"down"}


def test_replacing_the_width_node_changes_the_width():
    em = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                 progress=False)
    ids = _ids()
    name = next(n for n, op in em.ops.items() if op.kind == "mlp")
    small = em.ops[name].candidates[0]
    expected = output(em.materialize({name: small}), ids)
    full = output(em, ids)
    gm = em.graph_module
    old = em.width_nodes()[name]
    gm.add_submodule("replacement", WidthSource(name + "(other)", small, (small,)))
    with gm.graph.inserting_after(old):
        new = gm.graph.call_module("replacement", ())
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    gm.recompile()
    assert_close(output(em, ids), expected)
    assert not torch.allclose(output(em, ids), full)
    # the model keeps no other copy of the widths: this op's width is now unknown to it
    with pytest.raises(WidthError, match="no longer comes from a width node"):
        em.widths  # noqa: B018


@pytest.mark.parametrize(("arch", "mode"), CASES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_routed_per_sequence_equals_each_sequence_materialized(zoo_converted, arch, mode, seed):
    """Every op routed; each sequence has its own widths (tokens of a sequence share them),
    so each sequence must equal the dense model at its widths, in every layer."""
    _, em = zoo_converted(arch, head_mode=mode)
    g = torch.Generator().manual_seed(seed)
    per_seq = {n: torch.randint(len(op.candidates), (BATCH,), generator=g)
               for n, op in em.ops.items()}
    routed = {n: v[:, None].expand(BATCH, SEQ).contiguous() for n, v in per_seq.items()}
    ids = _ids(seed)
    with em.at(routed):
        out = output(em, ids)
    dense = Dense(em)
    for b in range(BATCH):
        widths = {n: em.ops[n].candidates[int(v[b])] for n, v in per_seq.items()}
        assert_close(out[b:b + 1], dense(widths, ids[b:b + 1]))


@pytest.mark.parametrize(("arch", "mode"), CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), which=st.sampled_from(["mlp", "attention"]))
def test_routed_per_token_equals_per_token_reference(zoo_converted, arch, mode, seed, which):
    """One op of the last layer takes a width per token: each token's output must equal
    the dense model at that token's width (keys and values of every token exist for the
    heads any token needs; a head a token drops adds nothing to its output)."""
    _, em = zoo_converted(arch, head_mode=mode)
    name = [n for n, op in em.ops.items() if op.kind == which][-1]
    cands = em.ops[name].candidates
    index = torch.randint(len(cands), (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    ids = _ids(seed)
    with em.at({name: index}):
        out = output(em, ids)
    dense = Dense(em)
    refs = torch.stack([dense({name: c}, ids) for c in cands])
    ref = refs[index, torch.arange(BATCH)[:, None], torch.arange(SEQ)[None]]
    assert_close(out, ref)


@pytest.mark.parametrize(("arch", "mode"), [("llama", "group"), ("gpt2", "query"),
                                            ("phi3", "query")])
def test_routed_gradients_equal_the_reference(zoo_converted, arch, mode):
    _, em = zoo_converted(arch, head_mode=mode)
    params = [p for p in em.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        ids = _ids(7)
        g = torch.Generator().manual_seed(3)
        weights = torch.randn(BATCH, SEQ, 128, generator=g)
        # every op routed per sequence, never at its widest candidate in this batch
        per_seq = {n: torch.randint(len(op.candidates) - 1, (BATCH,), generator=g)
                   for n, op in em.ops.items()}
        routed = {n: v[:, None].expand(BATCH, SEQ).contiguous() for n, v in per_seq.items()}
        em.zero_grad()
        with em.at(routed):
            (em(ids) * weights).sum().backward()
        got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        em.zero_grad()
        for b in range(BATCH):
            widths = {n: em.ops[n].candidates[int(v[b])] for n, v in per_seq.items()}
            with em.at(widths):
                (em(ids[b:b + 1]) * weights[b:b + 1]).sum().backward()
        want = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for a, b in zip(got, want):  # to 1e-4 of the gradient's scale (the compensation
            scale = max(1.0, float(b.abs().max()))  # factors' reach the hundreds)
            torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-4)
        # only the slices some token used get a gradient
        widest = {n: em.ops[n].candidates[int(v.max())] for n, v in per_seq.items()}
        gm = em.graph_module
        for path, slicer in em.weight_slices().items():
            p = gm.get_parameter(path)
            grad = got[next(i for i, q in enumerate(params) if q is p)]
            plan = slicer.plan(widest[slicer.block])
            if plan is None:
                continue
            keep = torch.zeros(p.shape[slicer.axis], dtype=torch.bool)
            keep[plan if isinstance(plan, torch.Tensor) else slice(0, plan)] = True
            dropped = grad.index_select(slicer.axis, (~keep).nonzero().flatten())
            assert dropped.numel() and torch.count_nonzero(dropped) == 0, path
    finally:
        em.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)


@pytest.mark.parametrize(("arch", "mode"), CASES)
def test_uniform_per_token_widths_equal_static_widths_exactly(zoo_converted, arch, mode):
    _, em = zoo_converted(arch, head_mode=mode)
    ids = _ids(1)
    for k in range(len(next(iter(em.ops.values())).candidates)):
        static = {n: op.candidates[min(k, len(op.candidates) - 1)] for n, op in em.ops.items()}
        routed = {n: torch.full((BATCH, SEQ), op.candidates.index(static[n]))
                  for n, op in em.ops.items()}
        with em.at(static):
            a = output(em, ids)
        with em.at(routed):
            b = output(em, ids)
        assert torch.equal(a, b)


def test_bad_per_token_widths_get_clear_errors(zoo_converted):
    _, em = zoo_converted("llama")
    name = next(iter(em.ops))
    K = len(em.ops[name].candidates)
    ids = _ids()
    with pytest.raises(WidthError, match="integer tensor"):
        em.set_widths({name: torch.zeros(BATCH, SEQ)})
    with pytest.raises(WidthError, match=r"\[batch, seq\]"):
        em.set_widths({name: torch.zeros(BATCH * SEQ, dtype=torch.long)})
    with pytest.raises(WidthError, match="candidate indices in"):
        em.set_widths({name: torch.full((BATCH, SEQ), K)})
    with pytest.raises(WidthError, match="candidate indices in"):
        em.set_widths({name: torch.full((BATCH, SEQ), -1)})
    with pytest.raises(WidthError, match="move them"):
        em.set_widths({name: torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta")})
    wrong_shape = torch.zeros(BATCH, SEQ + 1, dtype=torch.long)
    with em.at({name: wrong_shape}), pytest.raises(WidthError, match="index per token"):
        em(ids)
    routed = torch.zeros(BATCH, SEQ, dtype=torch.long)
    with em.at({name: routed}), pytest.raises(WidthError, match="one width per op"):
        em.materialize()
    assert em.widths == em.full_widths()


def test_at_restores_widths_also_on_error(zoo_converted):
    _, em = zoo_converted("llama")
    em.set_widths(0.5, kind="mlp")
    before = em.widths
    with pytest.raises(RuntimeError, match="boom"), em.at(0.25):
        assert em.widths != before
        raise RuntimeError("boom")
    assert em.widths == before
    with pytest.raises(WidthError), em.at({"nope": 1}):
        pass
    assert em.widths == before
    em.set_full()


def test_a_weight_changed_through_data_is_not_read_stale(zoo_converted):
    """Query mode gathers the kept query rows of each KV group; changing the weight through
    `p.data` (which does not bump its version) must show in the next forward."""
    _, em = zoo_converted("llama", head_mode="query")
    name = next(n for n, op in em.ops.items() if op.kind == "attention")
    width = em.ops[name].candidates[1]
    ids = _ids()
    with em.at({name: width}):
        em(ids)  # a forward that would have filled a cache
        q = next(p for path, p in em.graph_module.named_parameters() if "q_proj" in path)
        old = q.data.clone()
        try:
            q.data.mul_(1.5)
            assert_close(output(em, ids), output(em.materialize(), ids))
        finally:
            q.data.copy_(old)


def test_widths_first_seen_under_inference_mode_still_train():
    """Slice indices are cached per width; ones first built under `torch.inference_mode`
    (an evaluation before training) must still be usable by autograd afterwards."""
    em = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                 config=flextron_fx.FlextronConfig(head_mode="query"),
                                 progress=False)
    for p in em.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    widths = [{n: op.candidates[min(k, len(op.candidates) - 1)] for n, op in em.ops.items()}
              for k in range(3)]
    widths.append({n: torch.randint(0, len(op.candidates), (BATCH, SEQ), generator=gen)
                   for n, op in em.ops.items()})
    ids = _ids()
    gathers = 0
    for w in widths:
        with em.at(w):
            with torch.inference_mode():
                em(ids)
            em.zero_grad()
            em(ids).pow(2).mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in em.parameters())
        gathers += sum(isinstance(s._plans.get(v), torch.Tensor)
                       for s in em.modules() if isinstance(s, WeightSlice)
                       for v in list(s._plans))
    assert gathers > 0  # some width kept query heads inside groups: a cached index tensor
