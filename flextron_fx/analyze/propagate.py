"""Propagate dimension atoms through an aten graph (see dims.py for what an atom is).

One pass over the nodes in order. Each tensor gets, per dimension, either None (an axis
no projection output flows into) or a list of atoms (a row-major product). The rules
below cover the ops transformer blocks are made of; any other op that touches a
labelled axis pins it, with the node in the reason, so nothing is ever sliced on guess.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .dims import AtomTable, _Mismatch

aten = torch.ops.aten
Dims = list  # list[None | list[int]], one entry per tensor dimension

_IDENTITY = {
    "to", "_to_copy", "contiguous", "clone", "alias", "detach", "lift_fresh_copy",
    "dropout", "feature_dropout", "alpha_dropout", "type_as", "_assert_tensor_metadata",
}
_VIEWS = {"view", "reshape", "_unsafe_view"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


@dataclass
class Projection:
    """A matmul of an activation with a weight parameter (linear, addmm, mm, matmul)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_axis: int  # weight axis of the output features (0 for linear, 1 for addmm/mm)
    out_atom: int  # the atom of the output feature axis
    contraction: list[int] | None = None  # leaves of the input feature axis, if labelled


@dataclass
class ShapeArg:
    """A shape constant that depends on elastic widths: node.args[path] == sum of products."""

    node: fx.Node
    path: tuple
    terms: list[list[int]]


@dataclass
class Propagation:
    atoms: AtomTable
    labels: dict = field(default_factory=dict)
    projections: list[Projection] = field(default_factory=list)
    shape_args: list[ShapeArg] = field(default_factory=list)
    # tensors downstream of an op with no rule that dropped their labels (up to the next
    # projection): an unlabelled axis of one of them may still be a head axis
    lost: set = field(default_factory=set)


def _name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def _param(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) and obj.dim() == 2 else None


def propagate(gm: fx.GraphModule) -> Propagation:
    """Label every tensor axis of `gm` with atoms. Requires `tensor_meta` (ShapeProp)."""
    st = Propagation(atoms=AtomTable())
    for node in gm.graph.nodes:
        n_proj = len(st.projections)
        try:
            _visit(gm, st, node)
        except _Mismatch as exc:
            _pin_inputs(st, node, f"{exc} at {node.format_node()}")
            _keep_same_shape(st, node)
        except Exception as exc:  # noqa: BLE001 - an unexpected overload: stay dense, say so
            _pin_inputs(st, node, f"no rule for this form of the op ({type(exc).__name__}: "
                                  f"{exc}): {node.format_node()}")
            _keep_same_shape(st, node)
        if node.op == "call_function" and len(st.projections) == n_proj and \
                any(a in st.lost for a in _tensor_args(node)):
            st.lost.add(node)
    return st


# ---------------------------------------------------------------------------------------
def _lab(st: Propagation, x) -> Dims | None:
    if not isinstance(x, fx.Node):
        return None
    lab = st.labels.get(x)
    return lab if isinstance(lab, list) else None


def _labelled(dims: Dims | None) -> bool:
    return dims is not None and any(d is not None for d in dims)


def _tensor_args(node: fx.Node):
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return out


def _pin_inputs(st: Propagation, node: fx.Node, reason: str) -> None:
    for a in _tensor_args(node):
        lab = st.labels.get(a)
        for dims in (lab if isinstance(lab, tuple) else (lab,)):
            for d in dims or ():
                for atom in d or ():
                    for leaf in st.atoms.leaves([atom]):
                        st.atoms.pin(leaf, reason)


def _dim(st, label, size) -> list[int]:
    """Atoms of a dimension, making a fresh atom for an unlabelled one."""
    return list(label) if label is not None else [st.atoms.new(size)]


def _visit(gm: fx.GraphModule, st: Propagation, node: fx.Node) -> None:
    if node.op in ("placeholder", "get_attr"):
        st.labels[node] = None
        return
    if node.op == "output":
        if any(_labelled(_lab(st, a)) for a in _tensor_args(node)):
            _pin_inputs(st, node, "reaches the graph output")
        return
    if node.op != "call_function":
        if any(_labelled(_lab(st, a)) for a in _tensor_args(node)):
            _pin_inputs(st, node, f"opaque {node.op} {node.format_node()}")
        st.labels[node] = None
        return

    target, name = node.target, _name(node.target)
    if target is operator.getitem:
        src = st.labels.get(node.args[0])
        st.labels[node] = src[node.args[1]] if isinstance(src, tuple) else None
        return

    proj = _projection(gm, node)
    if proj is not None:
        x_node, w_node, b_node, out_axis = proj
        shape = _shape(node)
        xl = _lab(st, x_node)
        out_atom = st.atoms.new(shape[-1], derived=True)
        p = Projection(node, x_node, w_node, b_node, out_axis, out_atom)
        if xl is not None and xl[-1] is not None:
            p.contraction = st.atoms.leaves(xl[-1])
        st.projections.append(p)
        lead = list(xl[:-1]) if xl is not None else [None] * (len(shape) - 1)
        st.labels[node] = lead + [[out_atom]]
        return

    inputs = [a for a in _tensor_args(node)]
    if not any(_labelled(_lab(st, a)) or isinstance(st.labels.get(a), tuple) for a in inputs) \
            and not (name == "repeat_interleave" and inputs):  # may repeat one K/V head
        st.labels[node] = None
        return

    rule = _RULES.get(name)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        if name in _IDENTITY:
            rule = _identity
        elif torch.Tag.pointwise in target.tags or name in ("masked_fill", "where"):
            rule = _broadcast
    if rule is None:
        _pin_inputs(st, node, f"op not understood on a sliced axis: {node.format_node()}")
        _keep_same_shape(st, node)
        return
    st.labels[node] = rule(st, node)


def _keep_same_shape(st: Propagation, node: fx.Node) -> None:
    """After pinning: a same-shape op (cumsum, sort, roll...) keeps its input's labels.

    The labels are pinned by now, so the block the op sits in is still found and is
    reported as left dense, with the op in the reason, instead of silently vanishing.
    Any other op's output is marked lost (see Propagation.lost).
    """
    st.lost.add(node)
    first = node.args[0] if node.args else None
    src = _shape(first) if isinstance(first, fx.Node) else None
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
        st.labels[node] = tuple(
            _lab(st, first) if src is not None and tuple(getattr(m, "shape", ())) == src
            else None for m in meta)
    else:
        st.labels[node] = _lab(st, first) if src is not None and src == _shape(node) else None


def _projection(gm, node):
    """(input, weight, bias, weight axis of the outputs) of a matmul with a weight parameter.

    A bias must be a parameter too (it is sliced with the weight); anything else makes
    the op an ordinary one.
    """
    t = node.target
    if t == aten.linear.default and _param(gm, node.args[1]) is not None:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and getattr(bias, "op", None) != "get_attr":
            return None
        return node.args[0], node.args[1], bias, 0
    if t == aten.addmm.default and _param(gm, node.args[2]) is not None:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        if getattr(node.args[0], "op", None) != "get_attr":
            return None
        return node.args[1], node.args[2], node.args[0], 1
    if t in (aten.mm.default, aten.matmul.default):
        w = node.args[1]
        if _param(gm, w) is not None:
            return node.args[0], w, None, 1
        if _is_transpose(w) and _param(gm, w.args[0]) is not None:  # x @ W.T
            return node.args[0], w.args[0], None, 0
    return None


def _is_transpose(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    if t in (aten.t.default, aten.numpy_T.default):
        return True
    if t == aten.transpose.int:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    return t == aten.permute.default and list(node.args[1]) in ([1, 0], [-1, -2])


# ---- rules -------------------------------------------------------------------------------
def _identity(st, node):
    return _lab(st, node.args[0])


def _broadcast(st, node):
    out_shape = _shape(node)
    if out_shape is None:
        return None
    n = len(out_shape)
    out: Dims = [None] * n
    operands = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
    for i in range(n):
        labelled, plain = [], False
        for a in operands:
            shp, lab = _shape(a), _lab(st, a)
            j = i - (n - len(shp))
            if j < 0 or shp[j] != out_shape[i] or out_shape[i] == 1:
                continue
            d = lab[j] if lab is not None else None
            if d is None:
                plain = True
            else:
                labelled.append(d)
        if not labelled:
            continue
        for other in labelled[1:]:
            st.atoms.unify(labelled[0], other)
        if plain:
            for atom in st.atoms.leaves(labelled[0]):
                st.atoms.pin(atom, f"mixed with an unsliced tensor of the same size in "
                                   f"{node.format_node()}")
        out[i] = labelled[0]
    return out


def _view(st, node):
    out = _regroup(st, node)
    _record_shape_list(st, node, 1, out)
    return out


def _flatten(st, node):
    return _regroup(st, node)


def _unflatten(st, node):
    out = _regroup(st, node)
    dim = node.args[1] % len(_shape(node.args[0]))
    sizes = node.args[2]
    for k in range(len(sizes)):
        d = out[dim + k]
        if d is not None and not (isinstance(sizes[k], int) and sizes[k] == -1):
            st.shape_args.append(ShapeArg(node, (2, k), [list(d)]))
    return out


def _regroup(st, node):
    """Labels of a reshape's output: dims grouped by equal products, atoms split to fit."""
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    in_lab = _lab(st, node.args[0]) or [None] * len(in_shape)
    out: Dims = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        # group dims with equal products (the standard reshape grouping)
        gi, gj = [i] if i < len(in_shape) else [], [j] if j < len(out_shape) else []
        pi = in_shape[i] if gi else 1
        pj = out_shape[j] if gj else 1
        i, j = i + len(gi), j + len(gj)
        while pi != pj:
            if pi < pj and i < len(in_shape):
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif j < len(out_shape):
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                raise _Mismatch("reshape groups do not match")
        if all(in_lab[k] is None for k in gi):
            continue
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = in_lab[gi[0]]
            continue
        units = []
        for k in gi:
            units.extend(st.atoms.leaves(_dim(st, in_lab[k], in_shape[k])))
        units = [u for u in units if st.atoms.size[u] != 1]
        for k in gj:
            want, got = out_shape[k], []
            prod = 1
            while prod < want:
                u = units.pop(0)
                s = st.atoms.size[u]
                if prod * s > want:
                    need = want // prod
                    if want % prod or s % need or u in st.atoms.refine:
                        raise _Mismatch(f"reshape splits an axis of size {s} unevenly")
                    first, rest = st.atoms.refine_as(u, "prod", [need, s // need])
                    units.insert(0, rest)
                    u, s = first, need
                got.append(u)
                prod *= s
            if got:
                out[k] = got
    return out


def _record_shape_list(st, node, argpos, out):
    sizes = node.args[argpos]
    for k, d in enumerate(out):
        if d is not None and not (isinstance(sizes[k], int) and sizes[k] == -1):
            st.shape_args.append(ShapeArg(node, (argpos, k), [list(d)]))


def _expand(st, node):
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    in_lab = _lab(st, node.args[0]) or [None] * len(in_shape)
    off = len(out_shape) - len(in_shape)
    out: Dims = [None] * len(out_shape)
    for k in range(len(out_shape)):
        j = k - off
        if j >= 0 and in_shape[j] == out_shape[k]:
            out[k] = in_lab[j]
        elif j >= 0 and in_shape[j] == 1:
            out[k] = [st.atoms.new(out_shape[k])]  # a broadcast axis, e.g. repeat_kv's groups
            st.atoms.add_role(out[k][0], "broadcast")
    _record_shape_list(st, node, 1, out)
    return out


def _repeat_interleave(st, node):
    """x.repeat_interleave(r, dim): element i becomes r copies at i*r .. i*r+r-1, so the
    output axis is the product [input axis, r] with r a broadcast axis (a K/V head read by
    r query heads, as in repeat_kv); r == 1 is the identity."""
    shp = _shape(node.args[0])
    lab = _lab(st, node.args[0]) or [None] * len(shp)
    reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(reps, int) or dim is None:
        if not _labelled(lab):
            return None
        raise _Mismatch("repeat_interleave with tensor or symbolic repeats, or over a "
                        "flattened tensor")
    dim %= len(shp)
    out = list(lab)
    if reps == 1 or (lab[dim] is None and shp[dim] != 1):
        return out if _labelled(out) else None
    rep = st.atoms.new(reps)
    st.atoms.add_role(rep, "broadcast")
    out[dim] = (list(lab[dim]) if lab[dim] is not None else []) + [rep]  # one K/V head: [r]
    st.shape_args.append(ShapeArg(node, (1,), [[rep]]))
    return out


def _permute(st, node, order):
    lab = _lab(st, node.args[0])
    return [lab[o] for o in order]


def _transpose(st, node):
    n = len(_shape(node.args[0]))
    a, b = (d % n for d in node.args[1:3])
    order = list(range(n))
    order[a], order[b] = order[b], order[a]
    return _permute(st, node, order)


def _permute_rule(st, node):
    n = len(_shape(node.args[0]))
    return _permute(st, node, [d % n for d in node.args[1]])


def _t(st, node):
    lab = _lab(st, node.args[0])
    return list(reversed(lab))


def _unsqueeze(st, node):
    lab = list(_lab(st, node.args[0]))
    d = node.args[1] % (len(lab) + 1)
    return lab[:d] + [None] + lab[d:]


def _squeeze(st, node):
    lab, shp = _lab(st, node.args[0]), _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else list(range(len(shp)))
    dims = {d % len(shp) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    return [d for k, d in enumerate(lab) if not (k in dims and shp[k] == 1)]


def _select(st, node):
    lab = _lab(st, node.args[0])
    d = node.args[1] % len(lab)
    return _selected(st, node, lab, d)


def _selected(st, node, lab: Dims, d: int) -> Dims:
    """Labels after indexing axis `d` (select, or each output of unbind): the picked axis
    stays whole, the others live on."""
    for a in st.atoms.leaves(lab[d] or []):
        st.atoms.pin(a, f"one index of it is selected: {node.format_node()}")
    return lab[:d] + lab[d + 1:]


def _single_atom(st, d):
    leaves = [a for a in st.atoms.leaves(d) if st.atoms.size[a] != 1]
    if len(leaves) != 1:
        raise _Mismatch("a split or slice along an axis that is a product of several axes")
    return leaves[0]


def _slice(st, node):
    lab, shp = list(_lab(st, node.args[0])), _shape(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shp)
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if lab[dim] is None:
        return lab
    if not all(isinstance(v, (int, type(None))) for v in (start, end)) or step != 1:
        # e.g. GPT-J's rotate_every_two on the head dim: that axis stays whole, others live
        for a in st.atoms.leaves(lab[dim]):
            st.atoms.pin(a, f"a strided or symbolic slice of it: {node.format_node()}")
        lab[dim] = None
        return lab
    size = shp[dim]
    lo, hi, _ = slice(start, end).indices(size)
    if (lo, hi) == (0, size):
        return lab
    if hi <= lo:  # an empty slice (e.g. the pass-through part of a full rotary embedding)
        lab[dim] = None
        return lab
    atom = _single_atom(st, lab[dim])
    parts = st.atoms.sum_range(atom, lo, hi)
    before = st.atoms.sum_range(atom, 0, lo) if lo else []
    if len(parts) == 1:
        lab[dim] = [parts[0]]
    else:
        lab[dim] = [_concat_atom(st, parts)]
    if lo:
        st.shape_args.append(ShapeArg(node, (2,), [[a] for a in before]))
    if hi < size:
        st.shape_args.append(ShapeArg(node, (3,), [[a] for a in before + parts]))
    return lab


def _concat_atom(st, parts):
    total = sum(st.atoms.size[st.atoms.find(p)] for p in parts)
    atom = st.atoms.new(total)
    st.atoms.refine[atom] = ("sum", tuple(parts))
    return atom


def _split(st, node):
    lab, shp = _lab(st, node.args[0]), _shape(node.args[0])
    name = _name(node.target)
    if name == "unbind":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    else:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim %= len(shp)
    size = shp[dim]
    if name == "unbind":  # a select of every index
        out = _selected(st, node, lab, dim)
        return tuple(list(out) for _ in range(size))
    if name == "chunk":
        n = node.args[1]
        step = -(-size // n)
        sizes = [min(step, size - k) for k in range(0, size, step)]
    elif name == "split_with_sizes":
        sizes = list(node.args[1])
    else:
        step = node.args[1]
        sizes = [min(step, size - k) for k in range(0, size, step)]
    if lab[dim] is None:
        outs = []
        for _ in sizes:
            outs.append(list(lab))
        return tuple(outs)
    atom = _single_atom(st, lab[dim])
    outs, off, terms = [], 0, []
    for s in sizes:
        parts = st.atoms.sum_range(atom, off, off + s)
        piece = parts[0] if len(parts) == 1 else _concat_atom(st, parts)
        o = list(lab)
        o[dim] = [piece]
        outs.append(o)
        terms.append([[piece]])
        off += s
    if name == "split":
        if len({st.atoms.size[st.atoms.find(t[0][0])] for t in terms[:-1]}) > 1:
            raise _Mismatch("uneven split")
        st.shape_args.append(ShapeArg(node, (1,), terms[0]))
    elif name == "split_with_sizes":
        for k, t in enumerate(terms):
            st.shape_args.append(ShapeArg(node, (1, k), t))
    return tuple(outs)


def _cat(st, node):
    shp = _shape(node)
    dim0 = (node.args[1] if len(node.args) > 1 else 0) % len(shp)
    tensors = [t for t in node.args[0] if _shape(t)[dim0] != 0]  # torch.cat drops empties
    if len(tensors) == 1:
        return _lab(st, tensors[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shp)
    labs = [_lab(st, t) or [None] * len(shp) for t in tensors]
    out: Dims = [None] * len(shp)
    for k in range(len(shp)):
        if k == dim:
            if all(lab[k] is None for lab in labs):
                continue
            parts = []
            for t, lab in zip(tensors, labs):
                piece = st.atoms.new(_shape(t)[k])
                st.atoms.unify([piece], _dim(st, lab[k], _shape(t)[k]))
                parts.append(piece)
            out[k] = [_concat_atom(st, parts)]
        else:
            ds = [lab[k] for lab in labs if lab[k] is not None]
            for d in ds[1:]:
                st.atoms.unify(ds[0], d)
            out[k] = ds[0] if ds else None
    return out


def _stack(st, node):
    shp = _shape(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shp)
    labs = [_lab(st, t) or [None] * (len(shp) - 1) for t in node.args[0]]
    out: Dims = []
    for k in range(len(shp) - 1):
        ds = [lab[k] for lab in labs if lab[k] is not None]
        for d in ds[1:]:
            st.atoms.unify(ds[0], d)
        if ds and len(ds) < len(labs):
            for a in st.atoms.leaves(ds[0]):
                st.atoms.pin(a, f"stacked with an unsliced tensor in {node.format_node()}")
        out.append(ds[0] if ds else None)
    return out[:dim] + [None] + out[dim:]


def _keep_dims_pin(st, node, dims, reason):
    lab = _lab(st, node.args[0])
    for d in dims:
        for a in st.atoms.leaves(lab[d] or []):
            st.atoms.pin(a, f"{reason}: {node.format_node()}")


def _softmax(st, node):
    lab = _lab(st, node.args[0])
    _keep_dims_pin(st, node, [node.args[1] % len(lab)], "softmax over a sliced axis")
    return lab


def _norm(st, node):
    lab = _lab(st, node.args[0])
    k = len(node.args[1])
    _keep_dims_pin(st, node, range(len(lab) - k, len(lab)), "normalisation over a sliced axis")
    return lab


def _reduce(st, node):
    lab, shp = _lab(st, node.args[0]), _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        dims = list(range(len(shp)))
    dims = [d % len(shp) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    keep = (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    _keep_dims_pin(st, node, dims, "reduction over a sliced axis")
    if keep:
        return [None if k in dims else d for k, d in enumerate(lab)]
    return [d for k, d in enumerate(lab) if k not in dims]


def _matmul(st, node):
    a, b = node.args[0], node.args[1]
    sa, sb = _shape(a), _shape(b)
    la = _lab(st, a) or [None] * len(sa)
    lb = _lab(st, b) or [None] * len(sb)
    if len(sa) < 2 or len(sb) < 2:
        raise _Mismatch("matrix-vector product on a sliced axis")
    ka, kb = la[-1], lb[-2]
    if ka is not None or kb is not None:
        st.atoms.unify(_dim(st, ka, sa[-1]), _dim(st, kb, sb[-2]))
        for x in st.atoms.leaves(ka or kb):
            st.atoms.add_role(x, "head_dim")
    nb = max(len(sa), len(sb)) - 2
    batch: Dims = []
    for k in range(nb):
        ja, jb = k - (nb - (len(sa) - 2)), k - (nb - (len(sb) - 2))
        da = la[ja] if ja >= 0 and sa[ja] != 1 else None
        db = lb[jb] if jb >= 0 and sb[jb] != 1 else None
        if da is not None and db is not None:
            st.atoms.unify(da, db)
        elif ja >= 0 and jb >= 0 and sa[ja] == sb[jb] != 1 and (a in st.lost or b in st.lost):
            _pin_unfollowed_heads(st, node, da if da is not None else db)
        d = da if da is not None else db
        for x in st.atoms.leaves(d or []):
            st.atoms.add_role(x, "head")
        batch.append(d)
    return batch + [la[-2], lb[-1]]


def _baddbmm(st, node):
    """input + b1 @ b2 (Bloom's ALiBi scores): a core, then a broadcast add."""
    out = _matmul(st, _Args(node, node.args[1:3]))
    inp, shp = node.args[0], _shape(node)
    in_shape, in_lab = _shape(inp), _lab(st, inp)
    off = len(shp) - len(in_shape)
    for k, d in enumerate(out):
        j = k - off
        if d is None or j < 0 or in_shape[j] != shp[k] or shp[k] == 1:
            continue
        if in_lab is not None and in_lab[j] is not None:
            st.atoms.unify(d, in_lab[j])
        else:
            for a in st.atoms.leaves(d):
                st.atoms.pin(a, f"mixed with an unsliced tensor of the same size in "
                                f"{node.format_node()}")
    return out


class _Args:
    """A view of `node` with other positional args, to reuse a rule on part of an op."""

    def __init__(self, node: fx.Node, args):
        self.node, self.args, self.kwargs = node, tuple(args), {}

    def format_node(self) -> str:
        return self.node.format_node()


def _sdpa(st, node):
    q, k, v = node.args[:3]
    sq, sk = _shape(q), _shape(k)
    lq = _lab(st, q) or [None] * len(sq)
    lk = _lab(st, k) or [None] * len(sk)
    lv = _lab(st, v) or [None] * len(sk)
    st.atoms.unify(_dim(st, lq[-1], sq[-1]), _dim(st, lk[-1], sk[-1]))
    for d in (lq[-1], lv[-1]):
        for x in st.atoms.leaves(d or []):
            st.atoms.add_role(x, "head_dim")
    for x, lab, n in ((q, lq, sq[-3]), (k, lk, sk[-3]), (v, lv, sk[-3])):
        if lab[-3] is None and n > 1 and x in st.lost:  # its heads went through an unknown op
            for d in (lq[-3], lk[-3], lv[-3]):
                _pin_unfollowed_heads(st, node, d)
    hq, hk = _dim(st, lq[-3], sq[-3]), _dim(st, lk[-3], sk[-3])
    st.atoms.unify(hk, _dim(st, lv[-3], sk[-3]))
    if node.kwargs.get("enable_gqa", False) and sq[-3] != sk[-3]:
        rep = st.atoms.new(sq[-3] // sk[-3])
        st.atoms.add_role(rep, "broadcast")
        hk = hk + [rep]
    st.atoms.unify(hq, hk)
    for x in st.atoms.leaves(hq):
        st.atoms.add_role(x, "head")
    for j in range(len(sq) - 3):
        if lq[j] is not None and lk[j] is not None:
            st.atoms.unify(lq[j], lk[j])
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        _mix_mask(st, node, mask, lq[:-1] + [lk[-2]], [*sq[:-1], sk[-2]])
    return lq[:-1] + [lv[-1]]


def _pin_unfollowed_heads(st, node, d) -> None:
    """Query heads meet K/V heads the analysis lost track of (an op it has no rule for
    changed their shape): which K/V head a query head reads is unknown, so no head moves."""
    for a in st.atoms.leaves(d or []):
        st.atoms.pin(a, f"its heads meet heads of a tensor the analysis cannot follow to a "
                        f"projection in {node.format_node()}")


def _mix_mask(st, node, mask: fx.Node, scores: Dims, shape: list[int]) -> None:
    """An attention mask or bias is added to the scores [..., heads, q, k]: its axes are
    the scores' axes (an ALiBi slope per head is a per-head tensor). An axis the analysis
    cannot follow to a projection (a bias buffer) keeps the heads from being sliced."""
    m_shape, m_lab = _shape(mask), _lab(st, mask)
    off = len(shape) - len(m_shape)
    for j, size in enumerate(m_shape):
        k = j + off
        if k < 0 or size == 1 or size != shape[k] or scores[k] is None:
            continue
        if m_lab is not None and m_lab[j] is not None:
            st.atoms.unify(scores[k], m_lab[j])
            continue
        for a in st.atoms.leaves(scores[k]):
            st.atoms.pin(a, f"mixed with a per-head attention mask or bias whose head axis "
                            f"the analysis cannot follow (e.g. ALiBi slopes in a buffer): "
                            f"{node.format_node()}")


_RULES = {
    **{n: _view for n in _VIEWS},
    "expand": _expand,
    "repeat_interleave": _repeat_interleave,
    "flatten": _flatten,
    "unflatten": _unflatten,
    "transpose": _transpose,
    "permute": _permute_rule,
    "t": _t,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "select": _select,
    "slice": _slice,
    "split": _split,
    "split_with_sizes": _split,
    "chunk": _split,
    "unbind": _split,
    "cat": _cat,
    "stack": _stack,
    **{n: _softmax for n in _SOFTMAX},
    "layer_norm": _norm,
    "rms_norm": _norm,
    **{n: _reduce for n in _REDUCTIONS},
    "matmul": _matmul,
    "bmm": _matmul,
    "baddbmm": _baddbmm,
    "scaled_dot_product_attention": _sdpa,
}
