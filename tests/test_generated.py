"""Property tests over generated architectures (issue 16, item 9).

Each drawn model is flextronized with a small random calibration set (no compensation:
the reference is plain slicing); then full width
must equal the original, every candidate width must equal `generated.reference` (the
original weights indexed with `em.orders`, no flextron_fx slicing involved), `num_params`
must equal the reference's count, the orders must be permutations, and every linear layer
must be in an elastic block or in `em.skipped`.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_close
from generated import Keep, architectures, build, reference, reference_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flextron_fx
from flextron_fx import FlextronConfig


def _layer_ops(em) -> dict[tuple[int, str], str]:
    out = {}
    for name, op in em.ops.items():
        m = re.search(r"layers\.(\d+)\.(attn|mlp)", op.module)
        assert m, f"op {name} at {op.module!r} is not a generated layer's attn or mlp"
        key = (int(m[1]), "attention" if m[2] == "attn" else "mlp")
        assert key not in out and op.kind == key[1], (name, op, out)
        out[key] = name
    return out


def _keep(model, em, ops, widths: dict[str, int], head_mode: str) -> list[Keep]:
    a = model.a
    keep = []
    for i in range(a.layers):
        n_name, h_name = ops.get((i, "mlp")), ops.get((i, "attention"))
        if n_name is None:
            neurons = list(range(a.mlp_hidden))
        else:
            order = em.orders[n_name].get("neurons", list(range(a.mlp_hidden)))
            neurons = order[: widths[n_name]]
        if h_name is None:
            kv, per = list(range(a.kv_heads)), [list(range(a.group))] * a.kv_heads
        else:
            classes = em.block(h_name).classes
            o = em.orders[h_name]
            groups = o.get("groups", list(range(a.kv_heads)))
            rows = o.get("per_group", [list(range(a.group))] * a.kv_heads)
            w = widths[h_name]
            has_g = "groups" in classes and a.kv_heads > 1
            has_r = "per_group" in classes and a.group > 1
            vary_groups = has_g and (head_mode == "group" or not has_r)
            if vary_groups:
                assert w % a.group == 0
                kv = groups[: w // a.group]
                per = [list(rows[g]) for g in kv]
            else:
                assert w % a.kv_heads == 0
                kv = list(groups)
                per = [list(rows[g])[: w // a.kv_heads] for g in kv]
        keep.append(Keep(neurons=neurons, kv=kv, per_group=per))
    return keep


def _check_orders(model, em, ops) -> None:
    a = model.a
    for (_, kind), name in ops.items():
        o = em.orders[name]
        assert o, f"{name}: calibrated, yet no stored order"
        if kind == "mlp":
            assert sorted(o["neurons"]) == list(range(a.mlp_hidden))
            continue
        if "groups" in o:
            assert sorted(o["groups"]) == list(range(a.kv_heads))
        if "per_group" in o:
            assert len(o["per_group"]) == a.kv_heads
            for row in o["per_group"]:
                assert sorted(row) == list(range(a.group))


def _check_coverage(model, em) -> None:
    """Every nn.Linear but the output head is a projection of some block or skipped; with a
    single KV head, K and V stay whole as a named fixed part of the attention."""
    projected = {p.weight.removeprefix(em.param_prefix) for name in em.ops
                 for p in em.block(name).projections}
    skipped = [s.module_path for s in em.skipped if s.module_path]
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod_name == "head":
            continue
        if model.a.kv_heads == 1 and re.fullmatch(r"layers\.\d+\.attn\.[kv]", mod_name):
            continue
        inside = f"{mod_name}.weight" in projected or \
            any(mod_name == s or mod_name.startswith(s + ".") for s in skipped)
        assert inside, f"{mod_name} is neither in an elastic block nor in em.skipped"


def check_architecture(arch, head_mode: str, mix_seed: int) -> None:
    model = build(arch)
    g = torch.Generator().manual_seed(mix_seed)
    calib = torch.randint(0, arch.vocab, (8, 6), generator=g)
    em = flextron_fx.flextronize(model, (torch.randint(0, arch.vocab, (2, 6), generator=g),),
                                 calib, config=FlextronConfig(head_mode=head_mode,
                                                              mlp_multiple=1,
                                                              compensate="none"),
                                 progress=False)
    ids = torch.randint(0, arch.vocab, (3, 5), generator=g)
    ops = _layer_ops(em)
    # a single-head attention has no head to remove: it is skipped, with the reason
    assert len(ops) == (2 if arch.heads > 1 else 1) * arch.layers, \
        f"{arch}: elastic ops {list(em.ops)}, skipped {em.skipped}"
    assert all(s.module_path for s in em.skipped), f"a skipped entry of no module: {em.skipped}"
    if arch.heads == 1:
        assert {s.module_path for s in em.skipped} == \
            {f"layers.{i}.attn" for i in range(arch.layers)}, em.skipped
    else:
        assert not em.skipped, em.skipped
    _check_orders(model, em, ops)
    _check_coverage(model, em)
    with torch.no_grad():
        assert_close(em(ids), model(ids))
    settings_ = []
    k = max(len(op.candidates) for op in em.ops.values())
    for i in range(k):  # every candidate, all ops at their i-th
        settings_.append({n: op.candidates[min(i, len(op.candidates) - 1)]
                          for n, op in em.ops.items()})
    settings_.append({n: op.candidates[int(torch.randint(len(op.candidates), (1,),
                                                         generator=g))]
                      for n, op in em.ops.items()})  # a random mix
    for widths in settings_:
        em.set_widths(widths)
        keep = _keep(model, em, ops, widths, head_mode)
        with torch.no_grad():
            assert_close(em(ids), reference(model, ids, keep))
        assert em.num_params() == reference_params(model, keep), widths
    em.set_full()


# 15 drawn models in `make test` (about 1-2 s each), 500 under `make test-slow`
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), head_mode=st.sampled_from(["group", "query"]),
       mix_seed=st.integers(0, 2**16))
def test_generated_architectures(arch, head_mode, mix_seed):
    check_architecture(arch, head_mode, mix_seed)


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), head_mode=st.sampled_from(["group", "query"]),
       mix_seed=st.integers(0, 2**16))
def test_generated_architectures_many(arch, head_mode, mix_seed):
    check_architecture(arch, head_mode, mix_seed)
