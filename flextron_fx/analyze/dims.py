"""Dimension atoms: a union-find over the axes of a graph's tensors.

Every projection output axis starts as one atom. Shape ops refine atoms: a view that
splits an axis into [heads, head_dim] refines it as a product; a split, chunk or slice
along it refines it as a sum (concatenation). Element-wise ops and attention cores unify
atoms that must have the same extent. After propagation, each class of atoms is one
logical axis of the model (MLP neurons, KV groups, query heads per group, head dim...),
and every weight axis and every shape constant can be written in terms of these classes.
A class is *pinned* when some op needs its full extent (a norm over it, a mix with an
unlabelled tensor of the same size, an op the analysis does not understand); pinned
classes are never sliced, and the pin records why.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

PROD, SUM = "prod", "sum"


@dataclass
class AtomTable:
    size: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    refine: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    pinned: dict[int, str] = field(default_factory=dict)
    roles: dict[int, set[str]] = field(default_factory=dict)
    derived: set[int] = field(default_factory=set)

    def new(self, size: int, *, derived: bool = False) -> int:
        a = len(self.size)
        self.size.append(int(size))
        self.parent.append(a)
        if derived:
            self.derived.add(a)
        return a

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    # ---- class facts -------------------------------------------------------------------
    def pin(self, a: int, reason: str) -> None:
        self.pinned.setdefault(self.find(a), reason)

    def is_pinned(self, a: int) -> bool:
        return self.find(a) in self.pinned

    def close_pins(self) -> None:
        """Pin the parts of pinned axes: an axis needed whole is needed in every part."""
        changed = True
        while changed:
            changed = False
            for root, reason in list(self.pinned.items()):
                for c in self.refine.get(self.find(root), (None, ()))[1]:
                    if self.find(c) not in self.pinned:
                        self.pin(c, reason)
                        changed = True

    def add_role(self, a: int, role: str) -> None:
        self.roles.setdefault(self.find(a), set()).add(role)

    def has_role(self, a: int, role: str) -> bool:
        return role in self.roles.get(self.find(a), ())

    def is_derived(self, a: int) -> bool:
        return self.find(a) in self.derived

    # ---- refinement ---------------------------------------------------------------------
    def refine_as(self, a: int, kind: str, sizes: list[int]) -> tuple[int, ...]:
        r = self.find(a)
        assert r not in self.refine, "refine an unrefined atom only"
        der = r in self.derived
        children = tuple(self.new(s, derived=der) for s in sizes)
        self.refine[r] = (kind, children)
        return children

    def leaves(self, atoms) -> list[int]:
        """Flatten product refinements; sum-refined and plain atoms are leaves."""
        out: list[int] = []
        for a in atoms:
            r = self.find(a)
            ref = self.refine.get(r)
            if ref is not None and ref[0] == PROD:
                out.extend(self.leaves(ref[1]))
            else:
                out.append(r)
        return out

    def sum_range(self, a: int, start: int, end: int) -> list[int]:
        """Atoms that exactly cover [start, end) of atom `a`, refining it as a sum."""
        r = self.find(a)
        if start == 0 and end == self.size[r]:
            return [r]
        ref = self.refine.get(r)
        if ref is None:
            cuts = sorted({0, start, end, self.size[r]})
            self.refine_as(r, SUM, [b - a_ for a_, b in itertools.pairwise(cuts)])
            ref = self.refine[r]
        if ref[0] != SUM:
            raise _Mismatch(f"a slice cuts across a product axis of size {self.size[r]}")
        out, off = [], 0
        for c in ref[1]:
            cs = self.size[self.find(c)]
            lo, hi = max(start, off), min(end, off + cs)
            if lo < hi:
                out.extend(self.sum_range(c, lo - off, hi - off))
            off += cs
        return out

    # ---- unification --------------------------------------------------------------------
    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise _Mismatch(f"axes of size {self.size[ra]} and {self.size[rb]} must be equal")
        fa, fb = self.refine.get(ra), self.refine.get(rb)
        if fa is not None and fb is not None:
            if fa[0] == SUM or fb[0] == SUM:
                sa = [self.size[self.find(c)] for c in fa[1]]
                sb = [self.size[self.find(c)] for c in fb[1]]
                if fa[0] != fb[0] or sa != sb:
                    raise _Mismatch("two concatenated axes with different parts")
                for ca, cb in zip(fa[1], fb[1]):
                    self.union(ca, cb)
            else:
                self.unify(list(fa[1]), list(fb[1]))
            ra, rb = self.find(ra), self.find(rb)
            if ra == rb:
                return
        # rb joins ra; ra keeps a refinement if only rb had one
        if fa is None and fb is not None:
            self.refine[ra] = fb
        self.refine.pop(rb, None)
        self.parent[rb] = ra
        if rb in self.pinned:
            self.pinned.setdefault(ra, self.pinned.pop(rb))
        if rb in self.roles:
            self.roles.setdefault(ra, set()).update(self.roles.pop(rb))
        if rb in self.derived:
            self.derived.add(ra)

    def unify(self, xs: list[int], ys: list[int]) -> None:
        """Make two row-major products of atoms the same axis, refining where needed."""
        xs, ys = self.leaves(xs), self.leaves(ys)
        while xs and ys:
            a, b = xs[0], ys[0]
            sa, sb = self.size[a], self.size[b]
            if sa == 1:
                xs.pop(0)
                continue
            if sb == 1:
                ys.pop(0)
                continue
            if sa == sb:
                self.union(a, b)
                xs.pop(0)
                ys.pop(0)
            elif sa > sb and sa % sb == 0 and a not in self.refine:
                xs[0:1] = self.refine_as(a, PROD, [sb, sa // sb])
            elif sb > sa and sb % sa == 0 and b not in self.refine:
                ys[0:1] = self.refine_as(b, PROD, [sa, sb // sa])
            else:
                raise _Mismatch(f"axes of sizes {sa} and {sb} cannot be aligned")
        rest = [a for a in xs + ys if self.size[a] != 1]
        if rest:
            raise _Mismatch("products of different total size")

    # ---- evaluation ---------------------------------------------------------------------
    def extent(self, a: int, widths: dict[int, int]) -> int:
        """Current extent of atom `a` when elastic classes have the given widths."""
        r = self.find(a)
        if r in widths:
            return widths[r]
        ref = self.refine.get(r)
        if ref is None:
            return self.size[r]
        parts = [self.extent(c, widths) for c in ref[1]]
        return sum(parts) if ref[0] == SUM else math.prod(parts)

    def tree(self, a: int):
        """Nested ('atom', root) / (kind, [children]) description of an atom's layout."""
        r = self.find(a)
        ref = self.refine.get(r)
        if ref is None:
            return ("atom", r)
        return (ref[0], [self.tree(c) for c in ref[1]])

    def tree_roots(self, a: int) -> set[int]:
        node = self.tree(a)
        out: set[int] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n[0] == "atom":
                out.add(n[1])
            else:
                stack.extend(n[1])
        return out


class _Mismatch(Exception):
    """Two axes that an op says are the same cannot be aligned."""
