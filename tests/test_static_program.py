"""Static programs: the elastic graph with constant widths folded in (elastic/static.py)."""

from __future__ import annotations

import copy
import linecache
import pickle

import pytest
import torch
from conftest import calibration, output
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import InputShapeError
from flextron_fx.elastic.ops import ElasticRegion, WeightSlice
from flextron_fx.elastic.static import causal_or_none, compact_locals

BATCH, SEQ = 2, 5


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _convert(arch: str, head_mode: str = "group"):
    config = flextron_fx.FlextronConfig(head_mode=head_mode)
    return flextron_fx.flextronize(ZOO[arch](), sample_inputs(arch), calibration(),
                                   config=config, progress=False)


def _source(program) -> str:
    return "".join(linecache.getlines(program.__code__.co_filename))


@pytest.mark.parametrize("arch,head_mode", [("llama", "group"), ("llama", "query"),
                                            ("gpt2", "group"), ("phi3", "query")])
def test_program_equals_the_elastic_graph_bit_for_bit(arch, head_mode):
    em = _convert(arch, head_mode)
    ids = _ids()
    for widths in (1.0, 0.5, 0.25):
        em.set_widths(widths)
        graph = em.graph_module(ids)  # the elastic graph itself, module by module
        first, second = output(em, ids), output(em, ids)  # built on the second call
        assert em._programs, "no static program was built at repeated widths"
        torch.testing.assert_close(first, graph, rtol=0, atol=0)
        torch.testing.assert_close(second, graph, rtol=0, atol=0)
        torch.testing.assert_close(second, output(em.materialize(), ids))


def test_the_program_folds_widths_and_keeps_regions_as_calls():
    em = _convert("llama")
    ids = _ids()
    em.set_widths(0.5, kind="mlp")
    em(ids)
    assert not em._programs  # one call at new widths builds nothing (training's case)
    em(ids)
    (key, program), = em._programs.items()
    assert key == tuple(em.widths.values())
    src = _source(program)
    assert "flextron_width_" not in src and "flextron_size_" not in src  # folded to ints
    assert "flextron_slice_" not in src  # full-width attention: no slice at all
    regions = [n for n, m in em.graph_module.named_children() if isinstance(m, ElasticRegion)]
    assert all(f"self.{r}(" in src for r in regions)
    mlp = next(m for m in em.graph_module.children()
               if isinstance(m, ElasticRegion) and m.kind == "mlp")
    half = next(iter(mlp._programs))
    assert half < max(mlp.candidates)
    assert "torch.narrow" in _source(mlp._programs[half])  # a prefix view, never a copy


def test_routed_widths_run_the_graph_and_build_no_program():
    em = _convert("llama")
    ids = _ids()
    name = next(n for n, op in em.ops.items() if op.kind == "mlp")
    index = torch.randint(0, len(em.ops[name].candidates), (BATCH, SEQ))
    em.set_widths({name: index})
    em(ids)
    em(ids)
    assert not em._programs


def test_weights_changed_after_the_program_was_built_are_read():
    em = _convert("llama")
    ids = _ids()
    em.set_widths(0.5)
    em(ids)
    before = output(em, ids)
    assert em._programs
    path, _ = next(iter(em.weight_slices().items()))
    param = em.graph_module.get_parameter(path)
    with torch.no_grad():
        param.mul_(0.0)  # in place
    zeroed = output(em, ids)
    assert not torch.equal(zeroed, before)
    torch.testing.assert_close(zeroed, output(em.graph_module, ids), rtol=0, atol=0)
    param.data = torch.randn_like(param)  # new storage behind the same parameter
    torch.testing.assert_close(output(em, ids), output(em.graph_module, ids), rtol=0, atol=0)


def test_gradients_through_the_program_equal_the_graphs():
    em = _convert("gpt2")
    ids = _ids()
    em.set_widths(0.5)
    grads = []
    for run in (em.graph_module, em, em):  # the graph, then the first and second em call
        em.zero_grad()
        out = run(ids)
        (out if isinstance(out, torch.Tensor) else out.logits).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in em.named_parameters()
                      if p.grad is not None})
    assert em._programs
    assert grads[0].keys() == grads[2].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[2][name], grads[0][name])


def test_the_traced_input_checks_still_run():
    em = _convert("llama")
    em(_ids())
    em(_ids())
    assert em._programs
    too_long = torch.zeros((BATCH, 10_000), dtype=torch.long)
    with pytest.raises(InputShapeError, match="dim 1"):
        em(too_long)
    assert "forward" not in vars(em.graph_module)  # the call left nothing behind


def test_a_recompiled_graph_drops_old_programs():
    em = _convert("llama")
    ids = _ids()
    em(ids)
    em(ids)
    old = dict(em._programs)
    gm = em.graph_module
    # swap the first MLP's down slice for its output times two: a new graph, new code
    node = next(n for n in gm.graph.nodes if n.op == "call_module"
                and n.target.startswith("flextron_mlp_"))
    with gm.graph.inserting_after(node):
        doubled = gm.graph.call_function(torch.mul, (node, 2.0))
    node.replace_all_uses_with(doubled, delete_user_cb=lambda u: u is not doubled)
    gm.recompile()
    changed = output(em.graph_module, ids)
    em(ids)
    torch.testing.assert_close(output(em, ids), changed, rtol=0, atol=0)
    assert all(p not in old.values() for p in em._programs.values())


def test_copies_and_pickles_leave_programs_behind():
    em = _convert("llama")
    ids = _ids()
    em.set_widths(0.5)
    em(ids)
    em(ids)
    assert any(m._programs for m in em.modules() if isinstance(m, ElasticRegion))
    clone = copy.deepcopy(em.graph_module)  # what materialize copies
    assert all(not m._programs for m in clone.modules() if isinstance(m, ElasticRegion))
    torch.testing.assert_close(output(clone, ids), output(em, ids), rtol=0, atol=0)
    assert not em.__getstate__()["_programs"] and em._programs
    state = pickle.loads(pickle.dumps(em.graph_module.flextron_mlp_1))
    assert isinstance(state, ElasticRegion) and not state._programs
    assert any(isinstance(m, WeightSlice) for m in state.modules())


def test_programs_run_attention_as_the_eager_model_does():
    em = _convert("llama")  # 4 query heads over 2 KV groups
    ids = _ids()
    em(ids)
    em(ids)
    (program,) = em._programs.values()
    src = _source(program)
    assert "_assert_tensor_metadata" not in src  # export's dtype checks are gone
    calls = [line for line in src.splitlines() if "static__attention(" in line]
    assert len(calls) == 2 and all("enable_gqa=True" in c.replace(" ", "") for c in calls)  # not repeated
    assert "scaled_dot_product_attention" not in src and src.count("causal_or_none(") == 1
    graph = em.graph_module.code
    assert "_assert_tensor_metadata" in graph and "enable_gqa" not in graph  # graph unchanged


@pytest.mark.parametrize("padded", [False, True])
def test_a_padded_attention_mask_is_kept_and_a_causal_one_becomes_is_causal(padded):
    model = ZOO["llama"]()
    ids = _ids()
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    em = flextron_fx.flextronize(model, (ids, mask), None, progress=False)
    if padded:
        mask[1, :2] = 0  # left padding on the second row
    em.set_widths(0.5)
    with torch.no_grad():
        graph = em.graph_module(ids, mask)
        em(ids, mask)
        em(ids, mask)  # builds the program
        program = em._programs[tuple(em.widths.values())]
        scope = program.__globals__
        name, check = next((k, f) for k, f in scope.items() if f is causal_or_none)
        seen = []
        scope[name] = lambda m: seen.append(check(m) is None) or check(m)
        try:
            out = em(ids, mask)
        finally:
            scope[name] = check
    assert seen == [not padded]
    torch.testing.assert_close(out, graph, rtol=0, atol=0)


def test_only_a_lower_triangle_counts_as_causal():
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    assert causal_or_none(tril[None, None].expand(3, 1, 6, 6)) is None
    for mask in (tril[:, :5], tril.T, torch.ones(6, 6, dtype=torch.bool), tril[:1, :1]):
        assert causal_or_none(mask) is mask
    padded = tril[None, None].repeat(2, 1, 1, 1)
    padded[1, 0, :, 0] = False
    assert causal_or_none(padded) is padded


def test_programs_keep_only_live_values_as_locals():
    # One local per graph node made a whole model's frame ~15 KB, so op calls from it
    # crossed CPython's 16 KB frame-stack chunks at some call depths (page faults per call).
    em = _convert("llama")
    ids = _ids()
    em(ids)
    em(ids)
    (program,) = em._programs.values()
    nodes = len(em.graph_module.graph.nodes)
    assert nodes > 150 and program.__code__.co_nlocals < 40


def test_compact_locals_reuses_only_dead_names():
    src = ("def forward(self, x):\n"
           "    a = x + 1\n    b = a * 2;  a = None\n    c = b - x;  b = None\n"
           "    d = c * c;  c = None\n    e = d + x\n    return (d, e)\n")
    new = compact_locals(src)
    run = {}
    exec(compile(src, "<old>", "exec"), run)  # noqa: S102
    old_fn = run["forward"]
    exec(compile(new, "<new>", "exec"), run)  # noqa: S102
    assert run["forward"](None, 3) == old_fn(None, 3) == (25, 28)
    assert run["forward"].__code__.co_nlocals < old_fn.__code__.co_nlocals
    looped = "def forward(self, x):\n    for i in x:\n        y = i\n    return y\n"
    assert compact_locals(looped) == looped  # control flow: left as it is


def test_train_and_eval_set_the_flag_and_the_traced_graph_keeps_no_dropout():
    """GPT-2 with its default dropout 0.1: nn.Module.train() on the elastic model used to
    raise NotImplementedError from the exported graph. Now both modes run the graph as
    traced (eval mode): train() warns once, outputs stay deterministic, gradients flow.
    (A conversion of its own: the shared ones may have been frozen by other tests.)"""
    em = _convert("gpt2")
    ids = _ids()
    expected = output(em, ids)
    with pytest.warns(UserWarning, match="dropout .* stays off"):
        assert em.train() is em
    assert all(m.training for m in em.modules())
    torch.testing.assert_close(output(em, ids), expected, rtol=0, atol=0)
    out = em(ids)
    getattr(out, "logits", out).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in em.parameters())
    em.zero_grad(set_to_none=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        em.train()  # once is enough
        assert em.eval() is em
    assert not any(m.training for m in em.modules())
    with pytest.raises(TypeError, match="True or False"):
        em.train("yes")


def test_the_least_recently_used_program_is_dropped_first(zoo_converted):
    """With room for two programs, running A, B, A, then C drops B: the full model that a
    profile check runs between every other network stays built."""
    _, em = zoo_converted("llama")
    ids = _ids()
    em._programs.clear()
    kept = em.programs_kept
    em.programs_kept = 2
    try:
        keys = {}
        for name, widths in (("A", 1.0), ("B", 0.5), ("A", 1.0), ("C", 0.25)):
            em.set_widths(widths)
            em(ids)
            em(ids)
            keys[name] = tuple(em.widths[op] for op in em.width_nodes())  # graph order
        assert list(em._programs) == [keys["A"], keys["C"]]
    finally:
        em.programs_kept = kept
        em.set_full()
