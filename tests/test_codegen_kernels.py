"""Triton MLP kernels (fixed width, routed) against their torch references, in the interpreter.

Shapes, widths, activations, biases and per-token assignments are drawn by hypothesis, odd
and tiny sizes included; fp32 and fp16. The references themselves are checked against an
independent computation (each token alone at its own width, on sliced weight copies).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_interp import interpreter, load

from flextron_fx.codegen import ops
from flextron_fx.codegen.mlp import ACTIVATIONS, elastic_mlp_ref, routed_mlp_ref
from flextron_fx.errors import CodegenError

K = load()


@pytest.fixture(autouse=True)
def _interpreted():
    with interpreter():
        yield


# max |kernel - reference| / max(1, max |reference|), one entry per dtype
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual.float() - expected.float()).abs().max()) if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale, (err, scale)


@st.composite
def mlps(draw):
    d = draw(st.integers(1, 40))
    f = draw(st.integers(1, 48))
    cands = sorted(set(draw(st.lists(st.integers(1, f), max_size=3))) | {f})
    gated = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    params = {
        "gate": rnd(f, d, scale=d ** -0.5) if gated else None,
        "up": rnd(f, d, scale=d ** -0.5),
        "down": rnd(d, f, scale=f ** -0.5),
        "b_gate": rnd(f) if gated and draw(st.booleans()) else None,
        "b_up": rnd(f) if draw(st.booleans()) else None,
        "b_down": rnd(d) if draw(st.booleans()) else None,
    }
    if draw(st.booleans()):  # a transposed view, like a Conv1D weight read as [F, D]
        params["up"] = params["up"].t().contiguous().t()
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(0, 9))
    x = rnd(batch, seq, d)
    index = torch.tensor(draw(st.lists(st.integers(0, len(cands) - 1), min_size=batch * seq,
                                       max_size=batch * seq)), dtype=torch.long)
    return {"x": x, "index": index.reshape(batch, seq), "cands": cands,
            "width": draw(st.sampled_from(cands)), "act": draw(st.sampled_from(ACTIVATIONS)),
            "dtype": draw(st.sampled_from([torch.float32, torch.float16])), **params}


def _operands(case, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    return [None if case[k] is None else cast(case[k])
            for k in ("gate", "up", "down", "b_gate", "b_up", "b_down")]


def _quiet():  # numpy overflow in the interpreter's exp of very negative inputs: harmless
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)
    return ctx


@settings(max_examples=30, deadline=None)
@given(mlps())
def test_fixed_width_kernel_matches_reference(case):
    dt, x = case["dtype"], case["x"]
    ctx = _quiet()
    try:
        got = K.elastic_mlp_triton(x.to(dt), case["width"], *_operands(case, dt), case["act"])
    finally:
        ctx.__exit__(None, None, None)
    # reference in fp32 on the same (rounded) inputs
    expected = elastic_mlp_ref(x.to(dt).float(), case["width"],
                               *[None if t is None else t.float() for t in _operands(case, dt)],
                               case["act"])
    _close(got, expected, dt)


@settings(max_examples=30, deadline=None)
@given(mlps())
def test_routed_kernel_matches_reference(case):
    dt, x = case["dtype"], case["x"]
    ctx = _quiet()
    try:
        got = K.routed_mlp_triton(x.to(dt), case["index"], case["cands"], *_operands(case, dt),
                                  case["act"])
    finally:
        ctx.__exit__(None, None, None)
    expected = routed_mlp_ref(x.to(dt).float(), case["index"], case["cands"],
                              *[None if t is None else t.float() for t in _operands(case, dt)],
                              case["act"])
    _close(got, expected, dt)


def _token_by_token(case):
    """Each token alone at its width, on sliced copies of the weights (no shared code path)."""
    gate, up, down, b_gate, b_up, b_down = _operands(case)
    rows = []
    for t, i in zip(case["x"].reshape(-1, case["x"].shape[-1]), case["index"].reshape(-1)):
        w = case["cands"][int(i)]
        sl = lambda b, w=w: None if b is None else b[:w].clone()
        g = None if gate is None else gate[:w].clone()
        rows.append(elastic_mlp_ref(t[None], w, g, up[:w].clone(), down[:, :w].clone(),
                                    sl(b_gate), sl(b_up), b_down, case["act"])[0])
    d = case["down"].shape[0]
    return torch.stack(rows).reshape(*case["x"].shape[:-1], d) if rows else \
        case["x"].new_empty(*case["x"].shape[:-1], d)


@settings(max_examples=20, deadline=None)
@given(mlps())
def test_routed_reference_is_each_token_at_its_width(case):
    got = routed_mlp_ref(case["x"], case["index"], case["cands"], *_operands(case), case["act"])
    _close(got, _token_by_token(case), torch.float32)


@settings(max_examples=16, deadline=None)
@given(mlps(), st.sampled_from(["triton", "torch"]), st.sampled_from(["routed", "elastic"]))
def test_op_gradients_match_reference(case, backend, op):
    """Gradients through the custom ops (backend "triton": the Triton backward; "torch": the
    recomputed reference) equal those of the token-by-token computation; rows and columns
    of the weights past the widest width used get exactly zero."""
    if case["x"].numel() == 0:
        return
    if op == "elastic":  # one width for every token
        case = dict(case, index=torch.full_like(case["index"], case["cands"].index(case["width"])))
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in [case["x"], *_operands(case)]]
    ctx = _quiet()
    try:
        if op == "routed":
            out = ops.routed_mlp(leaves[0], case["index"], *leaves[1:], case["cands"],
                                 case["act"], backend)
        else:
            out = ops.elastic_mlp(*leaves, case["width"], case["act"], backend)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad((out * probe).sum(), [t for t in leaves if t is not None])
    finally:
        ctx.__exit__(None, None, None)

    ref_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    ref_case = dict(case, x=ref_leaves[0], **dict(zip(
        ("gate", "up", "down", "b_gate", "b_up", "b_down"), ref_leaves[1:])))
    expected = torch.autograd.grad((_token_by_token(ref_case) * probe).sum(),
                                   [t for t in ref_leaves if t is not None], allow_unused=True)
    for g, e in zip(got, expected):
        _close(g, torch.zeros_like(g) if e is None else e, torch.float32)
    widest = max(case["cands"][int(i)] for i in case["index"].reshape(-1))
    up_grad = got[2 if case["gate"] is not None else 1]
    assert not up_grad[widest:].any()


def test_triton_backward_in_fp16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 24, generator=g).half()
    gate, up = (torch.randn(40, 24, generator=g) * 0.2).half(), \
        (torch.randn(40, 24, generator=g) * 0.2).half()
    down = (torch.randn(24, 40, generator=g) * 0.15).half()
    index = torch.randint(0, 3, (2, 7), generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, gate, up, down)]
    ctx = _quiet()
    try:
        out = ops.routed_mlp(leaves[0], index, *leaves[1:], None, None, None, [8, 20, 40],
                             "silu", "triton")
        got = torch.autograd.grad(out.float().sum(), leaves)
    finally:
        ctx.__exit__(None, None, None)
    ref = [t.float().requires_grad_() for t in (x, gate, up, down)]
    expected = torch.autograd.grad(
        routed_mlp_ref(ref[0], index, [8, 20, 40], *ref[1:], None, None, None, "silu").sum(),
        ref)
    for a, e in zip(got, expected):
        _close(a, e, torch.float16)


def test_kernels_refuse_bad_inputs_with_clear_errors():
    x, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(CodegenError, match="activation 'tanh'"):
        K.elastic_mlp_triton(x, 2, None, w, w.t(), None, None, None, "tanh")
    with pytest.raises(CodegenError, match="float16"):
        K.elastic_mlp_triton(x, 2, None, w.half(), w.t(), None, None, None, "relu")
    with pytest.raises(CodegenError, match="backend 'cuda'"):
        ops.kernel("elastic", "cuda")
