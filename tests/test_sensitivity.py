"""token_excess: the first-order loss change of routing one token of one op to a smaller
candidate, checked against the routed model itself (fp64, central differences; Hugging
Face's RMSNorm computes in fp32 inside, so the step is 1e-3, not smaller)."""

import pytest
import torch
import torch.nn.functional as F
from zoo import ZOO, sample_inputs

from flextron_fx import flextronize
from flextron_fx.elastic.compensation import Compensation
from flextron_fx.elastic.ops import ElasticRegion
from flextron_fx.errors import WidthError
from flextron_fx.passes.inject_routers import inject_routers
from flextron_fx.route.sensitivity import token_excess


def _loss(logits, ids):  # in fp64 (the library's default casts logits to fp32)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def _output_module(em, op):
    """The module whose output is the op's output: its compensation, else its region."""
    mods = [m for m in em.graph_module.modules()
            if isinstance(m, (Compensation, ElasticRegion)) and m.block == op]
    return next((m for m in mods if isinstance(m, Compensation)), mods[0])


def _logits(em, widths, hook=None, module=None):
    handle = module.register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad(), em.at(widths):
            out = em(em.sample_ids)
    finally:
        if handle:
            handle.remove()
    return getattr(out, "logits", out)


def _slope_toward(em, op, index, step):
    """d loss / d alpha at 0, the op's output moved by alpha times (its output at the
    routed widths `index` minus its full-width output), by central differences."""
    module, got = _output_module(em, op), {}
    _logits(em, {op: index}, lambda m, a, o: got.setdefault("routed", o.clone()), module)
    _logits(em, 1.0, lambda m, a, o: got.setdefault("full", o.clone()), module)
    delta = got["routed"] - got["full"]

    def loss_at(alpha):
        return _loss(_logits(em, 1.0, lambda m, a, o: o + alpha * delta, module),
                     em.sample_ids).item()

    return (loss_at(step) - loss_at(-step)) / (2 * step)


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def elastic(request):
    torch.manual_seed(0)
    model = ZOO[request.param]().double()
    ids = sample_inputs(request.param)[0]
    em = flextronize(model, (ids,), torch.randint(0, 128, (8, 16)), progress=False)
    em.sample_ids = ids
    return em


def test_token_excess_is_the_loss_slope_toward_routing_one_token_narrower(elastic):
    em, ids = elastic, elastic.sample_ids
    before = em.widths
    est = token_excess(em, ids, _loss)
    assert em.widths == before
    assert set(est) == set(em.ops)
    # calibrated: each op's output is its compensation's, which the estimate must include
    assert all(isinstance(_output_module(em, op), Compensation) for op in em.ops)
    b, t = 1, 3
    for op, e in est.items():
        k_count = len(em.ops[op].candidates)
        assert e.shape == (*ids.shape, k_count)
        assert torch.equal(e[..., -1], torch.zeros_like(e[..., -1]))
        for k in range(k_count - 1):
            # the op's output when token (b, t) alone runs candidate k, from routed mode
            index = torch.full(ids.shape, k_count - 1)
            index[b, t] = k
            slope = _slope_toward(em, op, index, 1e-3)
            assert abs(slope) > 1e-4  # a real change, not a vacuous match
            assert e[b, t, k].item() == pytest.approx(slope, rel=2e-3, abs=5e-5), (op, k)


def test_token_excess_refuses_a_model_with_routers():
    torch.manual_seed(0)
    ids = sample_inputs("llama")[0]
    em = flextronize(ZOO["llama"](), (ids,), progress=False)
    inject_routers(em, "static", seed=1)
    with pytest.raises(WidthError, match="remove_routers"):
        token_excess(em, ids)
