"""Index arithmetic on weight layouts.

A layout is the tree of atoms along one weight axis (analyze/dims.py): ("atom", cls, size)
leaves, ("prod", children, size) for row-major products, ("sum", children, size) for
concatenations. A *selection* maps an axis class to the indices kept, in order; the
per-group query-head class may map to a [groups, kept] matrix (a separate order in each
KV group, indexed by the group's original position). The same function serves the
permutation pass (full-length selections that reorder) and the elastic forward (prefix
selections that shrink).
"""

from __future__ import annotations

import torch

from ..analyze.dims import AtomTable


def sized(atoms: AtomTable, tree) -> tuple:
    """Attach original sizes to an AtomTable.tree() description."""
    if tree[0] == "atom":
        return ("atom", tree[1], atoms.size[tree[1]])
    children = tuple(sized(atoms, c) for c in tree[1])
    total = 1
    if tree[0] == "sum":
        total = sum(c[2] for c in children)
    else:
        for c in children:
            total *= c[2]
    return (tree[0], children, total)


def extent(layout, widths: dict[int, int]) -> int:
    """Length of a layout axis when classes have the given kept widths."""
    kind = layout[0]
    if kind == "atom":
        return widths.get(layout[1], layout[2])
    parts = [extent(c, widths) for c in layout[1]]
    if kind == "sum":
        return sum(parts)
    out = 1
    for p in parts:
        out *= p
    return out


def classes(layout) -> set[int]:
    if layout[0] == "atom":
        return {layout[1]}
    return set().union(*(classes(c) for c in layout[1]))


def index(layout, sel: dict[int, torch.Tensor], groups: int | None = None) -> torch.Tensor:
    """Positions along the original axis kept by `sel`, in their new order (1-D, int64).

    `groups` is the class of KV groups; a 2-D selection of another class is read per
    group (row = original group index) when that class follows `groups` in a product.
    """
    kind = layout[0]
    if kind == "atom":
        s = sel.get(layout[1])
        if s is None:
            return torch.arange(layout[2])
        return s if s.dim() == 1 else _single_row(s)
    if kind == "sum":
        out, off = [], 0
        for c in layout[1]:
            out.append(index(c, sel, groups) + off)
            off += c[2]
        return torch.cat(out)
    grid = torch.zeros((), dtype=torch.long)
    g_axis, g_idx = None, None
    for c in layout[1]:
        s = sel.get(c[1]) if c[0] == "atom" else None
        if s is not None and s.dim() == 2 and g_axis is not None:
            sub = s[g_idx]  # [kept groups, kept per group]
            shape = [1] * grid.dim() + [sub.shape[1]]
            shape[g_axis] = sub.shape[0]
            grid = grid.unsqueeze(-1) * c[2] + sub.reshape(shape)
            continue
        sub = index(c, sel, groups)
        if c[0] == "atom" and c[1] == groups:
            g_axis, g_idx = grid.dim(), sub
        grid = grid.unsqueeze(-1) * c[2] + sub
    return grid.reshape(-1)


def _single_row(s: torch.Tensor) -> torch.Tensor:
    if s.shape[0] != 1:
        raise ValueError("a per-group selection used where the group axis is absent")
    return s[0]


def coords(layout, cls: int) -> torch.Tensor:
    """For each position along the axis, the index of class `cls` there (-1 if absent)."""
    kind = layout[0]
    if kind == "atom":
        if layout[1] == cls:
            return torch.arange(layout[2])
        return torch.full((layout[2],), -1, dtype=torch.long)
    if kind == "sum":
        return torch.cat([coords(c, cls) for c in layout[1]])
    grid = torch.full((), -1, dtype=torch.long)
    for c in layout[1]:
        sub = coords(c, cls)
        new = grid.unsqueeze(-1).expand(*grid.shape, c[2])
        hit = (sub >= 0).expand_as(new)
        grid = torch.where(hit, sub.expand_as(new), new)
    return grid.reshape(-1)
