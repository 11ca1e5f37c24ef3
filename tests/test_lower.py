"""lower(em, backend, widths): lowered MLPs give the elastic model's outputs, at static
budgets and with per-token widths, and the lowered graph still compiles and exports."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, output, token_ids
from triton_interp import interpreter, load

from flextron_fx.elastic.ops import ElasticRegion
from flextron_fx.errors import CodegenError, WidthError
from flextron_fx.passes.lower import LoweredMLP, lower

BUDGETS = (1.0, 0.5, 0.3)  # tiny llama: MLP widths 96, 48, 32


def _lowered(em) -> list[LoweredMLP]:
    return [m for m in em.graph_module.modules() if isinstance(m, LoweredMLP)]


def _per_token(em, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, len(op.candidates), (2, 8), generator=g)
            for n, op in em.ops.items() if op.kind == "mlp"}


def _routed_grads(em, lo, widths: dict, ids) -> dict:
    """Gradients of one loss through `em` and its lowering `lo` at per-token `widths`:
    asserted equal (the lowered op's backward is the torch reference); returns em's."""
    grads = []
    for model in (em, lo):
        model.set_widths(widths)
        model.zero_grad()
        model(ids).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    em.zero_grad()
    em.set_full()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)
    return grads[0]


@pytest.mark.parametrize("compensate", ["none", "all"])
@pytest.mark.parametrize("backend", ["torch", "inductor"])
def test_lowered_equals_elastic_at_budgets_and_per_token(zoo_converted, backend, compensate):
    """With compensation (the default) each width's down weight carries its low-rank
    correction: lowered, every MLP runs its kernel on that width's corrected weight."""
    _, em = zoo_converted("llama", compensate=compensate)
    lo = lower(em, backend)
    mlps = [n for n, op in em.ops.items() if op.kind == "mlp"]
    assert len(_lowered(lo)) == len(mlps)
    assert all((m.spec.delta is not None) == (compensate == "all") for m in _lowered(lo))
    assert not any(isinstance(m, LoweredMLP) for m in em.graph_module.modules())
    ids = token_ids(2, 8)
    for budget in BUDGETS:
        em.set_widths(budget)
        lo.set_widths(budget)
        assert_close(output(lo, ids), output(em, ids))
    # the budgets really differ (else the loop above proves little)
    with em.at(0.3):
        small = output(em, ids)
    em.set_full()
    assert (small - output(em, ids)).abs().max() > 1e-2
    widths = _per_token(em)
    lo.set_full()
    em.set_widths(widths)
    lo.set_widths(widths)
    assert_close(output(lo, ids), output(em, ids))
    em.set_full()
    assert all(isinstance(w, int) for w in em.widths.values())  # lo's widths are its own


def test_baked_widths_and_routed_gradients(zoo_converted):
    _, em = zoo_converted("llama", compensate="none")
    ids = token_ids(2, 8)
    lo = lower(em, "torch", widths=0.5)
    assert {m.baked for m in _lowered(lo)} == {48}
    with em.at(0.5):
        assert_close(output(lo, ids), output(em, ids))
    with pytest.raises(WidthError, match="lowered for width 48"), lo.at(1.0, kind="mlp"):
        lo(ids)
    # gradients through the routed op (backward: the torch reference) equal the elastic ones
    grads = _routed_grads(em, lower(em, "torch"), _per_token(em, seed=1), ids)
    assert len([n for n in grads if "mlp" in n]) >= 6


def test_inductor_with_baked_widths_compiles_the_whole_subnetwork(zoo_converted):
    _, em = zoo_converted("llama", compensate="none")
    ids = token_ids(2, 8)
    lo = lower(em, "inductor", widths=0.5)
    net = lo.__dict__["_subnetwork"]
    assert net is not None and not any(p is q for p in net.parameters()
                                       for q in em.parameters())
    with em.at(0.5):
        expected = output(em, ids)
    calls = []
    net.register_forward_pre_hook(lambda *a: calls.append(1))
    assert_close(output(lo, ids), expected)
    assert calls  # the compiled sub-network ran
    # other attention widths: the lowered graph runs (MLPs still at their baked width)
    with em.at(0.5), em.at(1.0, kind="attention"), lo.at(1.0, kind="attention"):
        assert_close(output(lo, ids), output(em, ids))
    assert len(calls) == 1


def test_a_compensated_model_lowers_with_its_corrected_weights_and_trains(zoo_converted):
    """The default conversion corrects each down projection per width (U_k V_k^T): lowered
    MLPs give the elastic outputs at baked widths, and per-token gradients reach the
    factors as the elastic model's do."""
    _, em = zoo_converted("llama")
    _, plain = zoo_converted("llama", compensate="none")  # same sort, no compensation
    ids = token_ids(2, 8)
    lo = lower(em, "torch", widths=0.5)
    assert len(_lowered(lo)) == 2 and all(m.spec.factors for m in _lowered(lo))
    with em.at(0.5):
        expected = output(em, ids)
    with plain.at(0.5):
        assert (expected - output(plain, ids)).abs().max() > 1e-3  # the correction counts
    assert_close(output(lo, ids), expected)
    lo = lower(em, "inductor", widths=0.5)
    assert lo.__dict__["_subnetwork"] is not None
    assert_close(output(lo, ids), expected)
    grads = _routed_grads(em, lower(em, "torch"), _per_token(em, seed=3), ids)
    assert len([n for n in grads if n.split(".")[-2] in ("u", "v")]) >= 4  # the factors


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_other_patterns_lower_or_keep_their_reference(zoo_converted, arch):
    """GPT-2: Conv1D weights, biases and the written-out tanh GELU are lowered; Phi-3's fused
    gate_up weight slices by a gather (not a prefix), so it keeps its reference."""
    _, em = zoo_converted(arch, compensate="none")
    lo = lower(em, "torch")
    assert len(_lowered(lo)) == (2 if arch == "gpt2" else 0)
    if arch == "gpt2":
        assert {(m.spec.act, m.spec.b_up is not None) for m in _lowered(lo)} == \
            {("gelu_tanh", True)}
    ids = token_ids(2, 8)
    for budget in (1.0, 0.5):
        em.set_widths(budget)
        lo.set_widths(budget)
        assert_close(output(lo, ids), output(em, ids))
    em.set_full()


def test_lowered_graph_compiles_and_exports(zoo_converted):
    _, em = zoo_converted("llama", compensate="none")
    ids = token_ids(2, 8)
    lo = lower(em, "torch", widths=0.5)
    with em.at(0.5):
        expected = output(em, ids)
    # one lowered MLP compiles as one graph (the op is opaque to dynamo: its fake impl runs)
    gm = lo.graph_module
    node = next(n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), LoweredMLP))
    region = gm.get_submodule(node.target)
    params = [gm.get_parameter(a.target) for a in node.args[2:]]
    x = torch.randn(2, 8, params[0].shape[1])
    compiled = torch.compile(lambda x: region(x, 48, *params), backend="aot_eager",
                             fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), region._static(48)(region.ref, x, 48, *params))
    exported = torch.export.export(lo.graph_module, (ids,), strict=False)
    calls = [n for n in exported.graph.nodes if n.target is torch.ops.flextron.elastic_mlp.default]
    assert len(calls) == 2 and {n.args[7] for n in calls} == {48}
    assert_close(exported.module()(ids), expected)
    # materialize still works on a lowered model (through each region's reference)
    assert_close(output(lo.materialize(), ids), expected)


@pytest.mark.parametrize("compensate", ["none", "all"])
def test_triton_backend_in_the_interpreter(zoo_converted, compensate):
    load()
    _, em = zoo_converted("llama", compensate=compensate)
    ids = token_ids(1, 5)
    lo = lower(em, "triton")
    assert len(_lowered(lo)) == 2
    g = torch.Generator().manual_seed(2)
    widths = {n: torch.randint(0, len(op.candidates), (1, 5), generator=g)
              for n, op in em.ops.items() if op.kind == "mlp"}
    with interpreter():
        for w in (0.5, widths):
            em.set_widths(w)
            lo.set_widths(w)
            assert_close(output(lo, ids), output(em, ids))
    em.set_full()


def test_lower_refuses_unknown_backends(zoo_converted):
    _, em = zoo_converted("llama", compensate="none")
    with pytest.raises(CodegenError, match="backend must be one of"):
        lower(em, "cuda")
    with pytest.raises(WidthError):
        lower(em, "torch", widths=0.0)
    assert all(type(m) is ElasticRegion for m in em.graph_module.modules()
               if isinstance(m, ElasticRegion))


@pytest.mark.slow
def test_smollm2_lowered_equals_elastic():
    """The real SmolLM2 (calibrated with the default compensation, so neurons are sorted
    and every width below the full one corrects its down projection): torch and inductor
    lowerings give the elastic model's logits at three budgets and with per-token widths."""
    import flextron_fx
    from flextron_fx import models
    from flextron_fx.data import calibration_and_heldout

    model, tok = models.load("smollm2-135m")
    calib, held, _ = calibration_and_heldout(tok, seq_len=64, n_calib=8, n_heldout_tokens=128)
    em = flextron_fx.flextronize(model, (calib[:2, :16],), calib, progress=False)
    ids = held.reshape(-1)[:128].reshape(2, 64)
    g = torch.Generator().manual_seed(0)
    widths = {n: torch.randint(0, len(op.candidates), (2, 64), generator=g)
              for n, op in em.ops.items() if op.kind == "mlp"}
    for backend in ("torch", "inductor"):
        lo = lower(em, backend)
        assert len(_lowered(lo)) == sum(op.kind == "mlp" for op in em.ops.values())
        for w in (1.0, 0.75, 0.5, widths):
            em.set_full()
            lo.set_full()
            em.set_widths(w)
            lo.set_widths(w)
            expected = output(em, ids)
            err = float((output(lo, ids) - expected).abs().max())
            assert err <= 1e-5 * float(expected.abs().max()), (backend, w, err)
    em.set_full()


def test_the_original_keeps_its_graph_and_can_still_be_rewritten(zoo_converted):
    from flextron_fx.passes.inject_routers import inject_routers, remove_routers

    _, em = zoo_converted("llama", compensate="none")
    ids = token_ids(2, 6)
    before = output(em, ids)
    lowered = lower(em, "torch")
    assert em.graph_module.graph.owning_module is em.graph_module
    inject_routers(em, "static")  # adds submodules and nodes to em's graph, then lints it
    remove_routers(em)
    em.set_full()
    assert_close(output(em, ids), before)
    assert_close(output(lowered, ids), before)
