"""The elastic graph's runtime nodes: where a width comes from and what consumes it.

A width is a value on the graph's edges (DESIGN.md, "Where a width lives"):

    flextron_width_i = self.flextron_width_i()          # WidthSource: set_widths' constant
    flextron_span_i  = self.flextron_span_i(width_i)    # attention: widest width of the batch
    w = self.flextron_slice_j(weight, span_i)          # WeightSlice: kept rows or columns
    n = self.flextron_size_k(span_i)                    # ShapeSize: a head count in a view
    y = self.flextron_mlp_i(x, width_i, *weights)       # ElasticRegion: elastic_mlp(x, width)

A width is an int (one width for the whole batch: static mode) or a [batch, seq] integer
tensor of candidate indices (one width per token: routed mode). Nothing is ever multiplied
by a mask: a static width slices weights (a `narrow` view where the kept rows or columns
are a prefix, a gather otherwise), and routed execution groups tokens by width and runs
each group on its own weight prefix.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import WidthError
from . import layout as L
from .widths import WidthRule


class WidthSource(nn.Module):
    """A block's width as a graph node; `set_widths` changes `value`, nothing re-traces.

    `value` is an int (a candidate width) or a [batch, seq] tensor of candidate indices.
    """

    def __init__(self, block: str, full: int, candidates: tuple[int, ...]):
        super().__init__()
        self.block, self.candidates = block, tuple(candidates)
        self.value: int | torch.Tensor = full

    def forward(self):
        return self.value

    def extra_repr(self) -> str:
        v = self.value
        shown = v if isinstance(v, int) else f"per-token {tuple(v.shape)}"
        return f"{self.block}, width={shown}"


class WidthSpan(nn.Module):
    """The widest width a batch needs: the width itself, or the largest candidate that any
    token uses. Attention computes queries, keys and values at this width."""

    def __init__(self, candidates: tuple[int, ...]):
        super().__init__()
        self.candidates = tuple(candidates)

    def forward(self, width):
        if isinstance(width, torch.Tensor):
            return self.candidates[int(width.max())]
        return width


class WeightSlice(nn.Module):
    """The part of a weight (or bias) kept at a width: forward(weight, width).

    Kept rows or columns that form a prefix are a `narrow` view (free, and a strided
    column prefix multiplies as fast as a copy); others (query heads kept inside each KV
    group, fused layouts) are gathered on every call, so a weight changed in place, even
    through `p.data`, is never read from a stale copy.
    """

    def __init__(self, block: str, rule: WidthRule, layout: tuple, axis: int,
                 groups: int | None, numel_per_index: int):
        super().__init__()
        self.block, self.rule, self.layout, self.axis, self.groups = \
            block, rule, layout, axis, groups
        self.numel_per_index = numel_per_index  # parameters per index of the sliced axis
        self._plans: dict[int, object] = {}

    def kept(self, width: int) -> int:
        """Length of the sliced axis at `width`."""
        return L.extent(self.layout, self.rule.classes(width))

    def plan(self, width: int):
        """None (everything kept), an int (a prefix length) or the kept indices."""
        if width not in self._plans:
            with torch.inference_mode(False):  # cached: usable with autograd later
                self._plans[width] = self._plan(width)
        return self._plans[width]

    def _plan(self, width: int):
        classes = self.rule.classes(width)
        if not classes.keys() & L.classes(self.layout):
            return None
        idx = L.index(self.layout, {c: torch.arange(k) for c, k in classes.items()},
                      self.groups)
        return len(idx) if torch.equal(idx, torch.arange(len(idx))) else idx

    def forward(self, w: torch.Tensor, width: int) -> torch.Tensor:
        plan = self.plan(width)
        if plan is None:
            return w
        if isinstance(plan, int):
            return w.narrow(self.axis, 0, plan)
        return w.index_select(self.axis, plan.to(w.device))


class ShapeSize(nn.Module):
    """An int shape argument (a head count in a view, a split size) at the given widths:
    the sum over `terms` of the product of their extents. One width input per block whose
    classes the terms use, in `rules` order."""

    def __init__(self, terms: list[tuple], rules: list[WidthRule]):
        super().__init__()
        self.terms, self.rules = terms, rules
        self._sizes: dict[tuple, int] = {}

    def forward(self, *widths: int) -> int:
        size = self._sizes.get(widths)
        if size is None:
            classes: dict[int, int] = {}
            for rule, w in zip(self.rules, widths):
                classes.update(rule.classes(w))
            size = self._sizes[widths] = sum(L.extent(t, classes) for t in self.terms)
        return size


class ElasticRegion(nn.Module):
    """A token-wise part of a block as one node: `region(x, width, *params)`.

    `ref` is the reference implementation, the block's own sliced subgraph (placeholders
    x, width, then the parameters). An MLP block is one region (`elastic_mlp`); attention
    has one around its output projection, the only place where tokens of different widths
    differ once queries, keys and values exist for the widest of them.

    Static width: `ref` runs once. Per-token widths (a [batch, seq] tensor of candidate
    indices): tokens are grouped by width, each group runs `ref` at its width, so on its
    own weight prefix, and the results are put back in token order. For attention, `x`
    holds the heads of the batch's widest width, and each group reads the columns of its
    own heads (a prefix in head mode "group").

    `pattern` describes an MLP for lowering passes: gated, activation, biases, and the
    parameter each projection role owns.
    """

    def __init__(self, kind: str, block: str, ref: fx.GraphModule, candidates: tuple[int, ...],
                 rule: WidthRule, *, in_layout: tuple | None = None,
                 groups: int | None = None, pattern: dict | None = None):
        super().__init__()
        self.kind, self.block, self.ref = kind, block, ref
        self.candidates, self.rule = tuple(candidates), rule
        self.in_layout, self.groups = in_layout, groups
        self.pattern = dict(pattern or {})
        self._columns: dict[tuple[int, int], object] = {}
        self._programs: dict[int, object] = {}  # width -> static program of `ref`
        self._programs_of = None  # the `ref` code they were built from

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.pattern.items() if k != "projections"}
        return f"{self.kind}, {self.block}, candidates={list(self.candidates)}, {shown}"

    def forward(self, x: torch.Tensor, width, *params):
        if isinstance(width, torch.Tensor):
            return self._routed(x, width, params)
        return self._static(width)(self.ref, x, width, *params)

    def _static(self, width: int):
        """`ref` with this width folded in (elastic/static.py), built once per width."""
        if self._programs_of is not self.ref.code:
            self._programs, self._programs_of = {}, self.ref.code
        program = self._programs.get(width)
        if program is None:
            from .static import specialise  # static.py builds on this module's node types
            program = self._programs[width] = specialise(self.ref, {"width": width})
        return program

    def __getstate__(self):  # generated code is rebuilt on demand, never copied or pickled
        return {**super().__getstate__(), "_programs": {}, "_programs_of": None}

    def _routed(self, x: torch.Tensor, index: torch.Tensor, params) -> torch.Tensor:
        check_routed(index, x, self.candidates, self.block)
        flat = x.reshape(-1, x.shape[-1])
        idx = index.reshape(-1)
        counts = torch.bincount(idx, minlength=len(self.candidates)).tolist()
        used = [i for i, n in enumerate(counts) if n]
        widest = self.candidates[used[-1]]
        if len(used) == 1:  # one width for every token (as in decoding one token)
            return self._static(widest)(self.ref, x, widest, *params)
        order = torch.argsort(idx, stable=True)
        groups = flat.index_select(0, order).split(counts)
        lead = (1,) * (x.dim() - 2)
        outs = []
        for c, (n, part) in enumerate(zip(counts, groups)):
            if not n:
                continue
            width = self.candidates[c]
            part = self._own_columns(part, width, widest)
            y = self._static(width)(self.ref, part.reshape(*lead, n, part.shape[-1]), width,
                                    *params)
            outs.append(y.reshape(n, -1))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        out = torch.cat(outs).index_select(0, inverse)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def uniform(self, x: torch.Tensor, k: int, widest: int, params) -> torch.Tensor:
        """The output with every token at candidate `k`, from `x` laid out for candidate
        `widest` (as routed mode holds it; `k <= widest` where the layout matters)."""
        width = self.candidates[k]
        part = self._own_columns(x.reshape(-1, x.shape[-1]), width, self.candidates[widest])
        return self._static(width)(self.ref, part.reshape(*x.shape[:-1], part.shape[-1]),
                                   width, *params)

    def _own_columns(self, part: torch.Tensor, width: int, widest: int) -> torch.Tensor:
        """The columns of `part` (laid out at `widest`) that width `width` reads."""
        if self.in_layout is None or width == widest:
            return part
        key = (width, widest)
        if key not in self._columns:
            with torch.inference_mode(False):  # cached: usable with autograd later
                self._columns[key] = self._kept_columns(width, widest)
        cols = self._columns[key]
        if isinstance(cols, int):
            return part.narrow(-1, 0, cols)
        return part.index_select(-1, cols.to(part.device))

    def _kept_columns(self, width: int, widest: int):
        def kept(w):
            sel = {c: torch.arange(k) for c, k in self.rule.classes(w).items()}
            return L.index(self.in_layout, sel, self.groups)
        big, small = kept(widest), kept(width)
        where = torch.full((int(big.max()) + 1,), -1, dtype=torch.long)
        where[big] = torch.arange(len(big))
        cols = where[small]
        return len(cols) if torch.equal(cols, torch.arange(len(cols))) else cols


def check_indices(index: torch.Tensor, candidates: tuple[int, ...], block: str) -> None:
    """Per-token widths are integer candidate indices in range (clear errors otherwise)."""
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise WidthError(f"per-token widths of {block} must be an integer tensor of candidate "
                         f"indices (0 .. {len(candidates) - 1}), got dtype {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(candidates)):
        raise WidthError(f"per-token widths of {block} must be candidate indices in "
                         f"[0, {len(candidates) - 1}] (candidates {list(candidates)}), got "
                         f"values in [{int(index.min())}, {int(index.max())}]")


def check_routed(index: torch.Tensor, x: torch.Tensor, candidates: tuple[int, ...],
                 block: str) -> None:
    """A per-token width tensor that fits the tokens of `x` (clear errors otherwise)."""
    check_indices(index, candidates, block)
    if index.device != x.device:
        raise WidthError(f"per-token widths of {block} are on {index.device} but the "
                         f"activations are on {x.device}; move them with .to({x.device})")
    tokens = x.numel() // x.shape[-1]
    if index.numel() != tokens:
        raise WidthError(f"per-token widths of {block} have shape {tuple(index.shape)} "
                         f"({index.numel()} tokens) but the input has {tokens} tokens; "
                         "pass one candidate index per token, shaped [batch, seq]")
