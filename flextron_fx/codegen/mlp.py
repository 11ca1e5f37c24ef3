"""Elastic MLP: the plain PyTorch references every MLP kernel is checked against.

An MLP at width `w` (`w` of the `F` hidden neurons, stored by decreasing importance, so a
width is a prefix):

    h = act(x @ gate[:w].T + b_gate[:w]) * (x @ up[:w].T + b_up[:w])     gated (SwiGLU, GeGLU)
    h = act(x @ up[:w].T + b_up[:w])                                      plain (GELU, ReLU)
    y = h @ down[:, :w].T + b_down

Canonical operands: `gate`, `up` are [F, D] (any strides: a transposed view of a Conv1D
weight is fine), `down` is [D, F]; biases are [F], [F], [D] or None; every tensor is the
full shared buffer and `w` says how much of it is read. Routed: `index` holds one
candidate index per token; tokens are grouped by width and each group reads its own prefix.

This file imports no Triton: the `torch` lowering backend runs these references, and the
Triton kernels (`mlp_triton.py`, same stem) are tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CodegenError

# Activations a kernel fuses, by the names the analysis gives (ElasticRegion.pattern).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu(z)
    raise CodegenError(f"activation {name!r} has no fused kernel; supported: {list(ACTIVATIONS)}")


def _narrow(t: torch.Tensor | None, axis: int, width: int) -> torch.Tensor | None:
    return None if t is None else t.narrow(axis, 0, width)


def elastic_mlp_ref(x: torch.Tensor, width: int, gate: torch.Tensor | None, up: torch.Tensor,
                    down: torch.Tensor, b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                    b_down: torch.Tensor | None, act: str) -> torch.Tensor:
    """The MLP at one width for every token (weights narrowed to their prefix, never masked).

    Example:
        >>> x, up, down = torch.randn(3, 4), torch.randn(6, 4), torch.randn(4, 6)
        >>> elastic_mlp_ref(x, 2, None, up, down, None, None, None, "relu").shape
        torch.Size([3, 4])
    """
    a = F.linear(x, up.narrow(0, 0, width), _narrow(b_up, 0, width))
    if gate is not None:
        h = activation(act, F.linear(x, gate.narrow(0, 0, width), _narrow(b_gate, 0, width))) * a
    else:
        h = activation(act, a)
    return F.linear(h, down.narrow(1, 0, width), b_down)


def grouped(x: torch.Tensor, index: torch.Tensor, candidates, run) -> torch.Tensor:
    """`run(width, rows)` on each width's tokens, the results back in token order.

    Tokens (the rows of x flattened to [tokens, D]) are sorted by `index` (stable), each
    non-empty group `c` goes to `run(candidates[c], rows)` -> [rows, out], and the outputs
    are scattered back: [..., out] shaped like x. Each group is its own call, so `run` may
    use weights of its own per width (a low-rank corrected down projection).
    """
    flat = x.reshape(-1, x.shape[-1])
    idx = index.reshape(-1)
    counts = torch.bincount(idx, minlength=len(candidates)).tolist()
    order = torch.argsort(idx, stable=True)
    parts = flat.index_select(0, order).split(counts)
    outs = [run(candidates[c], p) for c, p in enumerate(parts) if p.shape[0]]
    out = torch.cat(outs) if outs else run(candidates[0], parts[0])  # no tokens: empty
    result = torch.empty_like(out)
    result[order] = out
    return result.reshape(*x.shape[:-1], out.shape[-1])


def routed_mlp_ref(x: torch.Tensor, index: torch.Tensor, candidates: list[int],
                   gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
                   b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                   b_down: torch.Tensor | None, act: str) -> torch.Tensor:
    """Per-token widths: token t runs at `candidates[index[t]]` (index shaped like x[..., 0]).

    Tokens are sorted by width (stable), each group runs `elastic_mlp_ref` on its prefix and
    the results go back in token order.
    """
    return grouped(x, index, candidates, lambda w, part: elastic_mlp_ref(
        part, w, gate, up, down, b_gate, b_up, b_down, act))


__all__ = ["ACTIVATIONS", "activation", "elastic_mlp_ref", "grouped", "routed_mlp_ref"]
