"""The lowered MLP as PyTorch custom ops, and the registry of kernels behind them.

    torch.ops.flextron.elastic_mlp(x, gate, up, down, b_gate, b_up, b_down, width, act, backend)
    torch.ops.flextron.routed_mlp(x, index, gate, up, down, b_gate, b_up, b_down, candidates,
                                  act, backend)

Both have fake implementations (output shape x.shape[:-1] + [down.shape[0]]), so a graph
holding them traces, exports and compiles; compiled code calls the op as an opaque kernel.
`backend` picks the implementation from `KERNELS` (`register` adds one; the dispatcher never
changes): "torch" (the references of mlp.py, every device), "inductor" (the MLP at that
width compiled by torch.compile, cached per width; per group when routed) and "triton"
(mlp_triton.py; GPU, or CPU under TRITON_INTERPRET=1).

Backward: backend "triton" runs `routed_mlp_backward_triton` (grouped Triton launches for
the recomputed pre-activations, dh and dx; one GEMM per candidate for the weight gradients;
a fixed width is one group); "torch" and "inductor" recompute the torch reference under
autograd. Either way gradients reach x and every weight and bias as the reference's do, and
the weight rows and columns past the widest width used get zeros.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from ..errors import CodegenError
from .mlp import elastic_mlp_ref, grouped, routed_mlp_ref

# (op, backend) -> implementation with the op's signature minus `backend`
KERNELS: dict[tuple[str, str], Callable] = {}
BACKENDS = ("torch", "inductor", "triton")


def register(op: str, backend: str):
    """Decorator: `fn` implements `op` ("elastic" or "routed") for `backend`."""
    def wrap(fn):
        KERNELS[(op, backend)] = fn
        return fn
    return wrap


def kernel(op: str, backend: str) -> Callable:
    fn = KERNELS.get((op, backend))
    if fn is None:
        raise CodegenError(f"no {op} MLP kernel for backend {backend!r}; backends: "
                           f"{sorted({b for o, b in KERNELS if o == op})}")
    return fn


register("elastic", "torch")(elastic_mlp_ref)
register("routed", "torch")(routed_mlp_ref)


@register("elastic", "triton")
def _elastic_triton(*args):
    from .mlp_triton import elastic_mlp_triton
    return elastic_mlp_triton(*args)


@register("routed", "triton")
def _routed_triton(*args):
    from .mlp_triton import routed_mlp_triton
    return routed_mlp_triton(*args)


_compiled: dict[tuple, Callable] = {}


def _inductor(width: int, act: str, gated: bool, routed: bool = False) -> Callable:
    """The MLP at `width` as one torch.compile'd function (width baked in as a constant).

    Each (width, activation) gets its own code object: dynamo caches compiled code per code
    object, and one shared function would run into its recompile limit across widths.
    Routed groups change size every call, so their functions compile with dynamic shapes.
    """
    key = (width, act, gated, routed)
    if key not in _compiled:
        def mlp(x, gate, up, down, b_gate, b_up, b_down):
            return elastic_mlp_ref(x, width, gate, up, down, b_gate, b_up, b_down, act)
        code = mlp.__code__.replace(co_name=f"flextron_mlp_{act}_{width}")
        fn = types.FunctionType(code, mlp.__globals__, code.co_name, None, mlp.__closure__)
        _compiled[key] = torch.compile(fn, backend="inductor", dynamic=True if routed else None)
    return _compiled[key]


@register("elastic", "inductor")
def _elastic_inductor(x, width, gate, up, down, b_gate, b_up, b_down, act):
    return _inductor(width, act, gate is not None)(x, gate, up, down, b_gate, b_up, b_down)


@register("routed", "inductor")
def _routed_inductor(x, index, candidates, gate, up, down, b_gate, b_up, b_down, act):
    return grouped(x, index, candidates, lambda w, part: _inductor(
        w, act, gate is not None, routed=True)(part, gate, up, down, b_gate, b_up, b_down))


def _out(x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], down.shape[0])


@torch.library.custom_op("flextron::elastic_mlp", mutates_args=())
def elastic_mlp(x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor,
                down: torch.Tensor, b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                b_down: torch.Tensor | None, width: int, act: str,
                backend: str) -> torch.Tensor:
    """The MLP at one width (mlp.py's elastic_mlp_ref) run by `backend`'s kernel."""
    return kernel("elastic", backend)(x, width, gate, up, down, b_gate, b_up, b_down, act)


@elastic_mlp.register_fake
def _(x, gate, up, down, b_gate, b_up, b_down, width, act, backend):
    return _out(x, down)


@torch.library.custom_op("flextron::routed_mlp", mutates_args=())
def routed_mlp(x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor | None,
               up: torch.Tensor, down: torch.Tensor, b_gate: torch.Tensor | None,
               b_up: torch.Tensor | None, b_down: torch.Tensor | None, candidates: list[int],
               act: str, backend: str) -> torch.Tensor:
    """The MLP with a width per token (mlp.py's routed_mlp_ref) run by `backend`'s kernel."""
    return kernel("routed", backend)(x, index, list(candidates), gate, up, down, b_gate, b_up,
                                     b_down, act)


@routed_mlp.register_fake
def _(x, index, gate, up, down, b_gate, b_up, b_down, candidates, act, backend):
    return _out(x, down)


_TENSORS = ("x", "gate", "up", "down", "b_gate", "b_up", "b_down")


def _setup(ctx, inputs, output):
    ctx.inputs = inputs


def _grads(reference: Callable, tensors: list, call: Callable, grad: torch.Tensor) -> list:
    """Gradients of `call(*detached tensors)` (a torch reference) w.r.t. the tensors."""
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
              for t in tensors]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if not wanted:
        return [None] * len(tensors)
    with torch.enable_grad():
        out = call(*leaves)
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


def _triton_grads(grad, x, index, candidates, operands, act) -> list:
    from .mlp_triton import routed_mlp_backward_triton
    return routed_mlp_backward_triton(grad, x, index, list(candidates), *operands, act)


def _elastic_backward(ctx, grad):
    x, gate, up, down, b_gate, b_up, b_down, width, act, backend = ctx.inputs
    operands = [gate, up, down, b_gate, b_up, b_down]
    if backend == "triton":  # one group: every token at `width`
        index = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        g = _triton_grads(grad, x, index, [width], operands, act)
    else:
        g = _grads(elastic_mlp_ref, [x, *operands],
                   lambda *t: elastic_mlp_ref(t[0], width, *t[1:], act), grad)
    return (*g, None, None, None)


def _routed_backward(ctx, grad):
    x, index, gate, up, down, b_gate, b_up, b_down, candidates, act, backend = ctx.inputs
    operands = [gate, up, down, b_gate, b_up, b_down]
    if backend == "triton" and list(candidates) == sorted(set(candidates)):
        g = _triton_grads(grad, x, index, candidates, operands, act)
    else:  # the reference, recomputed (its suffix trick needs ascending candidates)
        g = _grads(routed_mlp_ref, [x, *operands],
                   lambda *t: routed_mlp_ref(t[0], index, list(candidates), *t[1:], act), grad)
    return (g[0], None, *g[1:], None, None, None)


elastic_mlp.register_autograd(_elastic_backward, setup_context=_setup)
routed_mlp.register_autograd(_routed_backward, setup_context=_setup)


__all__ = ["BACKENDS", "KERNELS", "elastic_mlp", "kernel", "register", "routed_mlp"]
