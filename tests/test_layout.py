"""Index arithmetic on weight layouts (elastic/layout.py) and dimension atoms (analyze/dims.py),
checked against hand-computed answers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron_fx.analyze.dims import PROD, SUM, AtomTable, _Mismatch
from flextron_fx.elastic import layout as L

T = torch.tensor
# 2 KV groups (class 1) x 3 query heads per group (class 2) x head_dim 4 (class 3)
GQA = ("prod", (("atom", 1, 2), ("atom", 2, 3), ("atom", 3, 4)), 24)
# a fused projection: 2 + 3 rows of two classes, concatenated
CAT = ("sum", (("atom", 1, 2), ("atom", 2, 3)), 5)


def _list(t: torch.Tensor) -> list[int]:
    assert t.dtype == torch.long and t.dim() == 1
    return t.tolist()


def test_index_without_selection_is_identity():
    assert _list(L.index(GQA, {})) == list(range(24))
    assert _list(L.index(CAT, {})) == list(range(5))


def test_index_prefix_of_the_outer_class():
    assert _list(L.index(GQA, {1: T([0])})) == list(range(12))
    assert _list(L.index(GQA, {1: T([1])})) == list(range(12, 24))


def test_index_prefix_of_the_middle_class():
    # per group g keep heads 0, 1: rows g*12 + h*4 + d
    assert _list(L.index(GQA, {2: T([0, 1])})) == [*range(8), *range(12, 20)]


def test_index_reorders():
    assert _list(L.index(GQA, {3: T([3, 0])})) == [3, 0, 7, 4, 11, 8, 15, 12, 19, 16, 23, 20]


def test_index_per_group_order():
    # groups reversed; inside original group 1 heads [1, 0], inside group 0 heads [2, 0]
    sel = {1: T([1, 0]), 2: T([[2, 0], [1, 0]])}
    assert _list(L.index(GQA, sel, groups=1)) == [
        16, 17, 18, 19, 12, 13, 14, 15,  # group 1: head 1, head 0
        8, 9, 10, 11, 0, 1, 2, 3,  # group 0: head 2, head 0
    ]


def test_index_per_group_order_keeping_one_group():
    sel = {1: T([1]), 2: T([[2, 0], [0, 2]])}
    assert _list(L.index(GQA, sel, groups=1)) == [12, 13, 14, 15, 20, 21, 22, 23]


def test_per_group_selection_without_group_axis():
    lay = ("prod", (("atom", 2, 3), ("atom", 3, 4)), 12)
    assert _list(L.index(lay, {2: T([[2, 1]])}, groups=1)) == [8, 9, 10, 11, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="group axis is absent"):
        L.index(lay, {2: T([[2], [1]])}, groups=1)


def test_index_of_a_concatenation():
    assert _list(L.index(CAT, {1: T([1]), 2: T([2, 0])})) == [1, 4, 2]
    assert _list(L.index(CAT, {2: T([0])})) == [0, 1, 2]


def test_index_of_a_fused_qkv_layout():
    # [q: 2 heads x 3 | k: 2 heads x 3 | v: 2 heads x 3], heads are class 1 in all three
    part = ("prod", (("atom", 1, 2), ("atom", 3, 3)), 6)
    qkv = ("sum", (part, part, part), 18)
    assert _list(L.index(qkv, {1: T([1])})) == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert L.extent(qkv, {1: 1}) == 9
    assert L.classes(qkv) == {1, 3}


def test_coords_of_a_product():
    assert _list(L.coords(GQA, 1)) == [p // 12 for p in range(24)]
    assert _list(L.coords(GQA, 2)) == [(p // 4) % 3 for p in range(24)]
    assert _list(L.coords(GQA, 3)) == [p % 4 for p in range(24)]
    assert _list(L.coords(GQA, 9)) == [-1] * 24


def test_coords_of_a_concatenation():
    assert _list(L.coords(CAT, 1)) == [0, 1, -1, -1, -1]
    assert _list(L.coords(CAT, 2)) == [-1, -1, 0, 1, 2]


def test_extent():
    assert L.extent(GQA, {}) == 24
    assert L.extent(GQA, {2: 1}) == 8
    assert L.extent(GQA, {1: 1, 3: 2}) == 6
    assert L.extent(CAT, {2: 1}) == 3


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(2)), st.permutations(range(3)), st.integers(1, 2),
       st.integers(1, 3))
def test_index_agrees_with_coords(perm1, perm2, keep1, keep2):
    """Every position index() keeps carries the class coordinates the selection asked for."""
    sel = {1: T(perm1[:keep1]), 2: T(perm2[:keep2])}
    idx = L.index(GQA, sel)
    assert len(idx) == L.extent(GQA, {1: keep1, 2: keep2}) == keep1 * keep2 * 4
    assert len(set(idx.tolist())) == len(idx)
    c1, c2, c3 = (L.coords(GQA, c)[idx] for c in (1, 2, 3))
    want1 = T(perm1[:keep1]).repeat_interleave(keep2 * 4)
    want2 = T(perm2[:keep2]).repeat_interleave(4).repeat(keep1)
    assert torch.equal(c1, want1) and torch.equal(c2, want2)
    assert torch.equal(c3, torch.arange(4).repeat(keep1 * keep2))


# ---- AtomTable ---------------------------------------------------------------------------
def test_union_find_and_facts_follow_the_class():
    A = AtomTable()
    a, b, c = A.new(8, derived=True), A.new(8), A.new(8)
    A.pin(c, "norm over it")
    A.add_role(b, "head")
    assert not A.is_pinned(a) and not A.has_role(a, "head")
    A.union(a, b)
    A.union(b, c)
    assert A.find(a) == A.find(b) == A.find(c)
    assert A.is_derived(c) and A.is_pinned(a) and A.has_role(c, "head")
    assert A.pinned[A.find(a)] == "norm over it"
    with pytest.raises(_Mismatch, match="8 and 4"):
        A.union(a, A.new(4))


def test_unify_refines_a_product():
    A = AtomTable()
    hidden = A.new(12)
    heads, dim = A.new(3), A.new(4)
    A.unify([hidden], [heads, dim])
    kind, children = A.refine[A.find(hidden)]
    assert kind == PROD and [A.size[A.find(x)] for x in children] == [3, 4]
    assert A.find(children[0]) == A.find(heads) and A.find(children[1]) == A.find(dim)
    assert A.tree(hidden) == (PROD, [("atom", A.find(heads)), ("atom", A.find(dim))])
    assert A.leaves([hidden]) == [A.find(heads), A.find(dim)]
    assert A.extent(hidden, {A.find(heads): 2}) == 8
    assert A.tree_roots(hidden) == {A.find(heads), A.find(dim)}


def test_unify_aligns_two_products_and_skips_unit_axes():
    A = AtomTable()
    x = [A.new(2), A.new(1), A.new(6)]
    y = [A.new(2), A.new(3), A.new(2)]
    A.unify(x, y)
    assert A.find(x[0]) == A.find(y[0])
    kind, (c0, c1) = A.refine[A.find(x[2])]
    assert kind == PROD and A.find(c0) == A.find(y[1]) and A.find(c1) == A.find(y[2])
    with pytest.raises(_Mismatch):
        A.unify([A.new(6)], [A.new(4)])
    with pytest.raises(_Mismatch, match="different total size"):
        A.unify([A.new(2), A.new(3)], [A.new(2)])


def test_sum_range_refines_as_a_concatenation():
    A = AtomTable()
    qkv = A.new(12, derived=True)
    k = A.sum_range(qkv, 4, 8)
    assert len(k) == 1 and A.size[k[0]] == 4
    kind, parts = A.refine[A.find(qkv)]
    assert kind == SUM and [A.size[p] for p in parts] == [4, 4, 4]
    assert all(A.is_derived(p) for p in parts)  # children inherit "derived"
    assert A.sum_range(qkv, 0, 12) == [A.find(qkv)]
    assert [A.size[p] for p in A.sum_range(qkv, 2, 10)] == [2, 4, 2]
    assert A.extent(qkv, {A.find(k[0]): 1}) == 9


def test_union_of_concatenations_unions_their_parts():
    A = AtomTable()
    a, b = A.new(6), A.new(6)
    pa, pb = A.refine_as(a, SUM, [2, 4]), A.refine_as(b, SUM, [2, 4])
    A.union(a, b)
    assert A.find(pa[0]) == A.find(pb[0]) and A.find(pa[1]) == A.find(pb[1])
    c = A.new(6)
    A.refine_as(c, SUM, [3, 3])
    with pytest.raises(_Mismatch, match="different parts"):
        A.union(a, c)
