"""Runtime pieces inserted into the graph by the elasticize pass.

`WeightSlice` sits between a weight's get_attr node and its matmul and returns the
kept rows or columns: a view (`narrow`) when they are a prefix, a gathered copy
otherwise (query heads kept inside each KV group). Under inference, strided views and
gathers are copied once per width setting and reused. `ShapeSize` replaces a shape
constant (a head count in a view, a split size) with the value for the current widths.
Both read one shared `WidthState`; nothing is ever multiplied by a mask.
"""

from __future__ import annotations

import torch
from torch import nn

from . import layout as L


class WidthState:
    """Current kept width of every elastic class, and the selections derived from it."""

    def __init__(self, full: dict[int, int]):
        self.full = dict(full)
        self.widths: dict[int, int] = {}
        self.version = 0

    @property
    def is_full(self) -> bool:
        return not self.widths

    def set(self, widths: dict[int, int]) -> None:
        self.widths = {c: w for c, w in widths.items() if w != self.full[c]}
        self.version += 1

    def selection(self) -> dict[int, torch.Tensor]:
        return {c: torch.arange(w) for c, w in self.widths.items()}


class WeightSlice(nn.Module):
    """Returns the part of a weight (or bias) kept at the current widths."""

    def __init__(self, state: WidthState, layout: tuple, axis: int, groups: int | None):
        super().__init__()
        self.state, self.layout, self.axis, self.groups = state, layout, axis, groups
        self.numel_per_index = 1  # parameters per index of the sliced axis (set by the pass)
        self.classes = L.classes(layout)
        self._key = None
        self._plan = None  # None: full; int: prefix length; tensor: gather indices
        self._cache = None

    def plan(self):
        st = self.state
        if self._key != st.version:
            self._key, self._cache = st.version, None
            if not (self.classes & st.widths.keys()):
                self._plan = None
            else:
                idx = L.index(self.layout, st.selection(), self.groups)
                if torch.equal(idx, torch.arange(len(idx))):
                    self._plan = len(idx)
                else:
                    self._plan = idx
        return self._plan

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.state.is_full:
            self._cache = None
            return w
        plan = self.plan()
        if plan is None:
            return w
        training = torch.is_grad_enabled() and w.requires_grad
        if isinstance(plan, int):
            view = w.narrow(self.axis, 0, plan)
            if training or view.is_contiguous():
                return view
            make = view.contiguous  # a column prefix is strided: matmuls run faster on a copy
        elif training:
            return w.index_select(self.axis, plan.to(w.device))
        else:
            make = lambda: w.index_select(self.axis, plan.to(w.device))
        # inference: keep the sliced copy until the widths or the weight change
        key = (w.data_ptr(), w._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, make())
        return self._cache[1]


class ShapeSize(nn.Module):
    """An int shape argument: the sum over `terms` of the product of their extents."""

    def __init__(self, state: WidthState, terms: list[tuple]):
        super().__init__()
        self.state, self.terms = state, terms

    def forward(self) -> int:
        widths = self.state.widths
        return sum(L.extent(t, widths) for t in self.terms)
