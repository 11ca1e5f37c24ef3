"""Triton kernels for the elastic MLP: one width for all tokens, and per-token routed widths.

References: `mlp.py` (same stem), `elastic_mlp_ref` and `routed_mlp_ref`.

Fixed width (`elastic_mlp_triton`), two launches:
  1. `_mlp_up_kernel`: a [BM, BN] tile of h = act(x @ gate[:w].T + b) * (x @ up[:w].T + b);
     both GEMMs share the loaded x tile, the activation and the gate multiply happen in
     registers, only h is written. WIDTH is a constexpr, so each width is its own compiled
     kernel (Triton caches one binary per constexpr value): the tile loop bounds and masks
     are constants and nothing past the prefix is read.
  2. `_mlp_down_kernel`: y = h @ down[:, :w].T + b_down, its K loop running to WIDTH.

Routed (`routed_mlp_triton`): tokens are sorted by candidate index (stable), a tile table
lists, for every BM rows of every group, the rows and the group's width; one launch of
`_routed_up_kernel` covers all groups (x rows are gathered through the sort order inside
the kernel, tiles past a group's width exit at once), one launch of `_routed_down_kernel`
runs each tile's K loop to its group's width and stores rows back at their original
positions (the scatter is the store). The widths are runtime values there (one binary for
all groups); tile sizes are constexprs.

Backward (`routed_mlp_backward_triton`, also the fixed width's: one group): the same two
kernels with an identity activation recompute the pre-activations and give dh = dy @ down
and dx = dg @ gate + du @ up, each one grouped launch reading only the prefixes; the
activation's derivative is torch pointwise code; the weight and bias gradients use that
tokens sorted by width make "every token at least this wide" a suffix of the sorted rows:
the rows of neurons cand[c-1]..cand[c] get du[suffix].T @ x[suffix], one dense GEMM per
candidate (cuBLAS on a GPU), exactly zero past the widest width used.

Import this module with TRITON_INTERPRET=1 in the environment to run it on CPU tensors
(Triton's interpreter, about 1000x slower than torch: tests only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import CodegenError
from .mlp import ACTIVATIONS

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_ACT = {name: i for i, name in enumerate(ACTIVATIONS)}
_IDENTITY = len(ACTIVATIONS)


@triton.jit
def _sigmoid(z):
    # written out, not tl.sigmoid (nor tl.zeros): triton.language's @jit helpers are bound
    # when triton is first imported (torch.compile imports it), so under the interpreter they
    # can be compiled-mode functions; kernels here call builtins and their own helpers only
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # silu
        out = z * _sigmoid(z)
    elif ACT == 1:  # gelu (erf)
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (2.0 * _sigmoid(2.0 * u))
    elif ACT == 3:  # relu
        out = tl.maximum(z, 0.0)
    else:  # identity: pre-activations and plain GEMMs (the backward pass)
        out = z
    return out


@triton.jit
def _gate_up_tile(x_ptr, rows, row_ok, g_ptr, u_ptr, bg_ptr, bu_ptr, cols, col_ok, D,
                  sxm, sxd, sgf, sgd, suf, sud,
                  GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
                  ACT: tl.constexpr, PRECISION: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """act(gate) * up (or act(up)) for rows x cols, in fp32."""
    rk = tl.arange(0, BK)
    acc_u = tl.full((BM, BN), 0.0, tl.float32)
    acc_g = tl.full((BM, BN), 0.0, tl.float32)
    for k in range(0, D, BK):
        kk = k + rk
        k_ok = kk < D
        xt = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxd,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        ut = tl.load(u_ptr + cols[None, :] * suf + kk[:, None] * sud,
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc_u = tl.dot(xt, ut, acc_u, input_precision=PRECISION)
        if GATED:
            gt = tl.load(g_ptr + cols[None, :] * sgf + kk[:, None] * sgd,
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc_g = tl.dot(xt, gt, acc_g, input_precision=PRECISION)
    if HAS_BU:
        acc_u += tl.load(bu_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g, ACT) * acc_u
    else:
        h = _act(acc_u, ACT)
    return h


@triton.jit
def _mlp_up_kernel(x_ptr, g_ptr, u_ptr, bg_ptr, bu_ptr, h_ptr, M, D,
                   sxm, sxd, sgf, sgd, suf, sud, shm,
                   WIDTH: tl.constexpr, GATED: tl.constexpr, HAS_BG: tl.constexpr,
                   HAS_BU: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < WIDTH
    h = _gate_up_tile(x_ptr, rows, row_ok, g_ptr, u_ptr, bg_ptr, bu_ptr, cols, col_ok, D,
                      sxm, sxd, sgf, sgd, suf, sud, GATED, HAS_BG, HAS_BU, ACT, PRECISION,
                      BM, BN, BK)
    tl.store(h_ptr + rows[:, None] * shm + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_tile(h_ptr, hrows, row_ok, d_ptr, cols, col_ok, width, shm, sdd, sdf,
               PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rk = tl.arange(0, BK)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k in range(0, width, BK):
        kk = k + rk
        k_ok = kk < width
        ht = tl.load(h_ptr + hrows[:, None] * shm + kk[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dt = tl.load(d_ptr + cols[None, :] * sdd + kk[:, None] * sdf,
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(ht, dt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _mlp_down_kernel(h_ptr, d_ptr, bd_ptr, y_ptr, M, D, shm, sdd, sdf, sym,
                     WIDTH: tl.constexpr, HAS_BD: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < D
    acc = _down_tile(h_ptr, rows, row_ok, d_ptr, cols, col_ok, WIDTH, shm, sdd, sdf,
                     PRECISION, BM, BN, BK)
    if HAS_BD:
        acc += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * sym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _routed_up_kernel(x_ptr, order_ptr, t_start_ptr, t_end_ptr, t_width_ptr,
                      g_ptr, u_ptr, bg_ptr, bu_ptr, h_ptr, D,
                      sxm, sxd, sgf, sgd, suf, sud, shm,
                      GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
                      ACT: tl.constexpr, PRECISION: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    tile = tl.program_id(0)
    width = tl.load(t_width_ptr + tile)
    if tl.program_id(1) * BN < width:  # columns past this group's prefix: nothing to do
        start, end = tl.load(t_start_ptr + tile), tl.load(t_end_ptr + tile)
        srows = start + tl.arange(0, BM)  # rows in sorted order (h's rows)
        row_ok = srows < end
        rows = tl.load(order_ptr + srows, mask=row_ok, other=0)  # original token rows
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        col_ok = cols < width
        h = _gate_up_tile(x_ptr, rows, row_ok, g_ptr, u_ptr, bg_ptr, bu_ptr, cols, col_ok,
                          D, sxm, sxd, sgf, sgd, suf, sud, GATED, HAS_BG, HAS_BU, ACT,
                          PRECISION, BM, BN, BK)
        tl.store(h_ptr + srows[:, None] * shm + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _routed_down_kernel(h_ptr, order_ptr, t_start_ptr, t_end_ptr, t_width_ptr,
                        d_ptr, bd_ptr, y_ptr, D, shm, sdd, sdf, sym,
                        HAS_BD: tl.constexpr, PRECISION: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    tile = tl.program_id(0)
    width = tl.load(t_width_ptr + tile)
    start, end = tl.load(t_start_ptr + tile), tl.load(t_end_ptr + tile)
    srows = start + tl.arange(0, BM)
    row_ok = srows < end
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < D
    acc = _down_tile(h_ptr, srows, row_ok, d_ptr, cols, col_ok, width, shm, sdd, sdf,
                     PRECISION, BM, BN, BK)
    if HAS_BD:
        acc += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows = tl.load(order_ptr + srows, mask=row_ok, other=0)  # scatter back to token order
    tl.store(y_ptr + rows[:, None] * sym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---- launchers ---------------------------------------------------------------------------

def _check(x: torch.Tensor, tensors: list, act: str) -> None:
    if act not in _ACT:
        raise CodegenError(f"activation {act!r} has no Triton kernel; supported: "
                           f"{list(ACTIVATIONS)}")
    if x.device.type == "cpu" and not INTERPRETED:
        raise CodegenError("the Triton MLP kernels got CPU tensors; they run on a GPU, or on "
                           "the CPU only in Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "flextron_fx.codegen.mlp_triton is first imported (tests only: "
                           "it is ~1000x slower than torch), or lower with backend 'torch' or "
                           "'inductor'")
    for t in tensors:
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise CodegenError(f"the Triton MLP kernels need every operand on {x.device} in "
                               f"{x.dtype}; got one on {t.device} in {t.dtype} (cast the "
                               "model or the input)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CodegenError(f"the Triton MLP kernels run fp32, fp16 or bf16, got {x.dtype}")


def _tiles(x: torch.Tensor, tokens: int) -> tuple[dict, dict]:
    """Launch settings of the (gate/up, down) kernels: tile sizes, warps, pipeline stages.

    tl.dot wants every side >= 16; few tokens (decode) get a short BM. On a GPU, large token
    counts get 128-row tiles; the gate/up kernel holds two fp32 accumulators, so its BN is
    half the down kernel's. Starting points, not tuned on a GPU yet (codegen_gpu.py).
    """
    bm = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
    if x.device.type == "cpu" or tokens <= 64:  # the interpreter, or decode-sized batches
        small = {"BM": bm, "BN": 64, "BK": 32, "num_warps": 4, "num_stages": 2}
        return small, small
    stages = 2 if x.dtype == torch.float32 else 3
    bm = 64 if tokens <= 256 else 128
    up = {"BM": bm, "BN": 64, "BK": 64, "num_warps": 8 if bm == 128 else 4, "num_stages": stages}
    down = {"BM": bm, "BN": 128, "BK": 64, "num_warps": 8 if bm == 128 else 4,
            "num_stages": stages}
    return up, down


def _precision(x: torch.Tensor) -> str:
    # fp32 inputs: exact fp32 products like torch's default matmul (no tf32 rounding)
    return "ieee" if x.dtype == torch.float32 else "tf32"


def elastic_mlp_triton(x: torch.Tensor, width: int, gate: torch.Tensor | None, up: torch.Tensor,
                       down: torch.Tensor, b_gate: torch.Tensor | None,
                       b_up: torch.Tensor | None, b_down: torch.Tensor | None,
                       act: str) -> torch.Tensor:
    """`elastic_mlp_ref` as two Triton launches specialised for `width` (see the module doc)."""
    _check(x, [gate, up, down, b_gate, b_up, b_down], act)
    flat = x.reshape(-1, x.shape[-1])
    m, d = flat.shape
    d_out = down.shape[0]
    h = torch.empty(m, width, device=x.device, dtype=x.dtype)
    y = torch.empty(m, d_out, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], d_out)
    tu, td = _tiles(x, m)
    g = gate if gate is not None else up
    _mlp_up_kernel[(triton.cdiv(m, tu["BM"]), triton.cdiv(width, tu["BN"]))](
        flat, g, up, b_gate if b_gate is not None else up, b_up if b_up is not None else up, h,
        m, d, flat.stride(0), flat.stride(1), g.stride(0), g.stride(1), up.stride(0),
        up.stride(1), h.stride(0), WIDTH=width, GATED=gate is not None,
        HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ACT=_ACT[act],
        PRECISION=_precision(x), **tu)
    _mlp_down_kernel[(triton.cdiv(m, td["BM"]), triton.cdiv(d_out, td["BN"]))](
        h, down, b_down if b_down is not None else down, y, m, d_out, h.stride(0),
        down.stride(0), down.stride(1), y.stride(0), WIDTH=width, HAS_BD=b_down is not None,
        PRECISION=_precision(x), **td)
    return y.reshape(*x.shape[:-1], d_out)


def tile_table(index: torch.Tensor, candidates: list[int], bm: int):
    """(order, tile starts, tile ends, tile widths): tokens sorted by candidate, and one
    tile per `bm` rows of each group (rows in sorted order)."""
    idx = index.reshape(-1)
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=len(candidates)).tolist()
    starts, ends, widths, offset = [], [], [], 0
    for c, n in enumerate(counts):
        for s in range(offset, offset + n, bm):
            starts.append(s)
            ends.append(min(s + bm, offset + n))
            widths.append(candidates[c])
        offset += n
    make = lambda v: torch.tensor(v, dtype=torch.int32, device=index.device)
    return order.to(torch.int32), make(starts), make(ends), make(widths)


def routed_mlp_triton(x: torch.Tensor, index: torch.Tensor, candidates: list[int],
                      gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
                      b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                      b_down: torch.Tensor | None, act: str) -> torch.Tensor:
    """`routed_mlp_ref` as one grouped launch per GEMM over all width groups."""
    _check(x, [gate, up, down, b_gate, b_up, b_down], act)
    flat = x.reshape(-1, x.shape[-1])
    m, d = flat.shape
    d_out = down.shape[0]
    y = torch.empty(m, d_out, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], d_out)
    tu, td = _tiles(x, m)  # both kernels walk the same tile table: one BM
    order, starts, ends, widths = tile_table(index, candidates, tu["BM"])
    widest = max(candidates[i] for i in set(index.reshape(-1).tolist()))
    h = torch.empty(m, widest, device=x.device, dtype=x.dtype)
    g = gate if gate is not None else up
    tiles = len(starts)
    _routed_up_kernel[(tiles, triton.cdiv(widest, tu["BN"]))](
        flat, order, starts, ends, widths, g, up, b_gate if b_gate is not None else up,
        b_up if b_up is not None else up, h, d, flat.stride(0), flat.stride(1), g.stride(0),
        g.stride(1), up.stride(0), up.stride(1), h.stride(0), GATED=gate is not None,
        HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ACT=_ACT[act],
        PRECISION=_precision(x), **tu)
    _routed_down_kernel[(tiles, triton.cdiv(d_out, td["BN"]))](
        h, order, starts, ends, widths, down, b_down if b_down is not None else down, y, d_out,
        h.stride(0), down.stride(0), down.stride(1), y.stride(0), HAS_BD=b_down is not None,
        PRECISION=_precision(x), **td)
    return y.reshape(*x.shape[:-1], d_out)


def _grouped_up(a, table, tu, w, b, widest, act, precision):
    """Sorted [n, widest] = act(a[order] @ w[:width].T + b) per tile (one launch)."""
    order, starts, ends, widths = table
    out = torch.empty(a.shape[0], widest, device=a.device, dtype=a.dtype)
    _routed_up_kernel[(len(starts), triton.cdiv(widest, tu["BN"]))](
        a, order, starts, ends, widths, w, w, w, b if b is not None else w, out, a.shape[1],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(0), w.stride(1),
        out.stride(0), GATED=False, HAS_BG=False, HAS_BU=b is not None, ACT=act,
        PRECISION=precision, **tu)
    return out


def _grouped_down(h, table, td, w, out, precision):
    """out[order] = h @ w[:, :width].T per tile (one launch), rows back in token order."""
    order, starts, ends, widths = table
    _routed_down_kernel[(len(starts), triton.cdiv(w.shape[0], td["BN"]))](
        h, order, starts, ends, widths, w, w, out, w.shape[0], h.stride(0), w.stride(0),
        w.stride(1), out.stride(0), HAS_BD=False, PRECISION=precision, **td)
    return out


def routed_mlp_backward_triton(grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                               candidates: list[int], gate, up, down, b_gate, b_up, b_down,
                               act: str) -> list:
    """Gradients of `routed_mlp_ref` w.r.t. (x, gate, up, down, b_gate, b_up, b_down);
    None for absent operands. See the module doc."""
    from .mlp import activation

    _check(x, [gate, up, down, b_gate, b_up, b_down], act)
    flat, dy = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]).to(x.dtype)
    m = flat.shape[0]
    zeros = lambda t: None if t is None else torch.zeros_like(t)
    if m == 0:
        return [torch.zeros_like(x), *(zeros(t) for t in (gate, up, down, b_gate, b_up, b_down))]
    tu, td = _tiles(x, m)
    table = tile_table(index, candidates, tu["BM"])
    idx = index.reshape(-1)
    counts = torch.bincount(idx, minlength=len(candidates)).tolist()
    widest = candidates[max(i for i, n in enumerate(counts) if n)]
    prec = _precision(x)
    a_u = _grouped_up(flat, table, tu, up, b_up, widest, _IDENTITY, prec)
    a_g = None if gate is None else _grouped_up(flat, table, tu, gate, b_gate, widest,
                                                _IDENTITY, prec)
    dh = _grouped_up(dy, table, tu, down.t(), None, widest, _IDENTITY, prec)
    with torch.enable_grad():  # the activation's derivative, pointwise
        z = (a_g if gate is not None else a_u).float().requires_grad_()
        s = activation(act, z)
        if gate is not None:
            dz, = torch.autograd.grad(s, z, dh.float() * a_u.float())
            du, dg, h = (dh.float() * s.detach()).to(x.dtype), dz.to(x.dtype), \
                (s.detach() * a_u.float()).to(x.dtype)
        else:
            dz, = torch.autograd.grad(s, z, dh.float())
            du, dg, h = dz.to(x.dtype), None, s.detach().to(x.dtype)
    dx = torch.zeros_like(flat)
    if gate is not None:
        dx += _grouped_down(dg, table, td, gate.t(), torch.empty_like(flat), prec)
    dx += _grouped_down(du, table, td, up.t(), torch.empty_like(flat), prec)
    order = table[0].long()
    xs, dys = flat.index_select(0, order), dy.index_select(0, order)
    g_gate, g_up, g_down = zeros(gate), torch.zeros_like(up), torch.zeros_like(down)
    g_bg, g_bu = zeros(b_gate), zeros(b_up)
    lo, off = 0, 0
    for c, width in enumerate(candidates):  # neurons lo..width: tokens of groups c.. (a suffix)
        if off < m and width > lo:
            rows = slice(off, m)
            g_up[lo:width] = du[rows, lo:width].t() @ xs[rows]
            g_down[:, lo:width] = dys[rows].t() @ h[rows, lo:width]
            if g_bu is not None:
                g_bu[lo:width] = du[rows, lo:width].sum(0)
            if gate is not None:
                g_gate[lo:width] = dg[rows, lo:width].t() @ xs[rows]
                if g_bg is not None:
                    g_bg[lo:width] = dg[rows, lo:width].sum(0)
        lo, off = max(lo, width), off + counts[c]
        if width >= widest:
            break
    g_bd = None if b_down is None else dy.sum(0).to(b_down.dtype)
    return [dx.reshape(x.shape), g_gate, g_up, g_down, g_bg, g_bu, g_bd]


__all__ = ["INTERPRETED", "elastic_mlp_triton", "routed_mlp_backward_triton",
           "routed_mlp_triton", "tile_table"]
