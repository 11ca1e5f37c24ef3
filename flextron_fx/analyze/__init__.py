"""Stage 2: find MLP and attention blocks in a traced graph by dataflow alone.

`analyze(gm, sample_inputs)` runs the graph once on the sample inputs to record concrete
shapes, propagates dimension atoms (propagate.py), and reads the blocks off the result:

* an MLP is a set of projections from one input whose output axes unify into one class
  (the neurons) that a single projection contracts back (down);
* attention is the same with an attention core (scaled_dot_product_attention or
  matmul-softmax-matmul) in between; the axes that the core batches over are the heads,
  those present in every projection are KV groups, the rest are query heads per group.

Nothing here reads class or parameter names. A block whose axes got pinned (an op that
needs the full axis, or one the analysis does not know) is reported with the node and the
reason and left dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import attrgetter

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from . import dataflow
from .dims import AtomTable
from .propagate import Projection, Propagation, ShapeArg, _is_transpose, propagate

__all__ = ["Analysis", "Block", "Fixed", "Proj", "Skipped", "analyze"]


@dataclass
class Proj:
    """One weight of a block: which node, which parameter, which axis is sliced, and how."""

    role: str  # gate / up / gate_up / in / down ; q / k / v / qkv / kv / o
    node: fx.Node
    weight: str  # get_attr target of the weight
    bias: str | None  # get_attr target of the bias sliced with it (in-projections only)
    axis: int  # weight axis that is sliced
    layout: tuple  # AtomTable.tree of the sliced axis


@dataclass
class Block:
    """An elastic MLP or attention block, with the facts passes and users need."""

    name: str
    kind: str  # "mlp" or "attention"
    projections: list[Proj]
    classes: dict[str, int]  # "neurons" / "groups" / "per_group" -> atom class
    sizes: dict[str, int]  # hidden, heads, kv_heads, head_dim, model_dim
    biases: bool
    module_path: str = ""

    @property
    def out_proj(self) -> Proj:
        return self.projections[-1]

    @property
    def in_projs(self) -> list[Proj]:
        return self.projections[:-1]

    @property
    def full_width(self) -> int:
        return self.sizes["hidden"] if self.kind == "mlp" else self.sizes["heads"]

    def describe(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "module": self.module_path,
            "projections": {p.role: p.weight for p in self.projections},
            "sizes": dict(self.sizes), "biases": self.biases,
        }


@dataclass
class Skipped:
    """A block-like region left dense, and why."""

    node: str
    module_path: str
    reason: str
    nodes: list[str] = field(default_factory=list)  # the linear layers left dense here


@dataclass
class Fixed:
    """A linear layer that is no part of any block and needs none: it stays as it is.

    `part` is one of FIXED_PARTS (see there for what each one means).
    """

    node: str
    weight: str
    part: str


FIXED_PARTS = {
    "output head": "its result reaches the model output through unary ops only (lm_head, "
                   "classifier)",
    "input projection": "no linear layer lies between the model inputs and it (a projection "
                        "of the embeddings, e.g. ALBERT's or ELECTRA's embedding mapping)",
    "unused": "its result never reaches the model output (a pooler the traced output skips)",
    "unsliced part of a block": "its output is the per-head feature axis of an attention "
                                "and no head count changes it (K/V of an attention with a "
                                "single KV head, shared by every query head)",
}


@dataclass
class Analysis:
    atoms: AtomTable
    blocks: list[Block]
    skipped: list[Skipped]
    shape_args: list[ShapeArg] = field(default_factory=list)
    fixed: list[Fixed] = field(default_factory=list)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("model.") if path else ""


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return ".".join(out)


def analyze(gm: fx.GraphModule, sample_inputs: tuple) -> Analysis:
    """Find the elastic blocks of `gm` (see the module docstring).

    Requires: `gm` is an aten-level graph (torch.export), parameters as get_attr nodes.
    Ensures: every node has `meta["tensor_meta"]`; blocks list their projections in
    graph order with the out-projection last.

    Example:
        >>> from flextron_fx.trace import trace
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        >>> x = (torch.randn(2, 3, 8),)
        >>> [b.kind for b in analyze(trace(m, x).graph_module, x).blocks]
        ['mlp']
    """
    with torch.no_grad():
        ShapeProp(gm).propagate(*sample_inputs)
    st = propagate(gm)
    st.atoms.close_pins()
    blocks, skipped = _extract(gm, st)
    fixed = _account(gm, st, blocks, skipped)
    return Analysis(atoms=st.atoms, blocks=blocks, skipped=skipped, shape_args=st.shape_args,
                    fixed=fixed)


def _extract(gm: fx.GraphModule, st: Propagation):
    A = st.atoms
    blocks: list[Block] = []
    skipped: list[Skipped] = []
    by_root: dict[int, list[Projection]] = {}
    for p in st.projections:
        for r in A.tree_roots(p.out_atom):
            by_root.setdefault(r, []).append(p)
    used: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pending: list[tuple[set, set, Skipped, str]] = []

    for out in st.projections:
        if not out.contraction:
            continue
        roots = [A.find(a) for a in out.contraction if A.size[A.find(a)] > 1]
        derived = [r for r in roots if A.is_derived(r)]
        if not derived:
            continue
        heads = [r for r in derived if A.has_role(r, "head")]
        kind = "attention" if heads else "mlp"
        elastic = heads if heads else derived
        ins = {p.node: p for r in elastic for p in by_root.get(r, []) if p is not out}
        path = _common_prefix([_module_path(p.node) for p in [*ins.values(), out]])
        where = f"{out.node.format_node()}"
        if not ins:
            continue
        names = [p.node.name for p in [*ins.values(), out]]
        if not heads and all(A.has_role(r, "head_dim") for r in derived):
            # one head: the only derived axis is its feature axis, which is no MLP's neurons
            skipped.append(Skipped(where, path, "attention with a single head: there is no "
                                                "head to remove; left dense", names))
            continue
        pins = [A.pinned[r] for r in elastic if r in A.pinned]
        if pins:
            pending.append((set(ins), {A.find(c) for c in elastic},
                            Skipped(where, path, f"{kind} left dense: {pins[0]}", names), kind))
            continue
        if kind == "mlp" and len(set(derived)) != 1:
            skipped.append(Skipped(where, path, "mlp hidden axis is a product of several "
                                               "axes; left dense", names))
            continue
        if any(n in used for n in [*ins, out.node]):
            skipped.append(Skipped(where, path, "projection shared with another block", names))
            continue
        shared = _shared_weight(gm, [*ins.values(), out])
        if shared:
            skipped.append(Skipped(where, path, f"{kind} left dense: {shared}", names))
            continue
        block = _make_block(gm, st, out, sorted(ins.values(), key=lambda p: order[p.node]),
                            kind, elastic, path, len(blocks))
        if isinstance(block, Skipped):
            block.nodes = names
            skipped.append(block)
            continue
        used.update([*ins, out.node])
        blocks.append(block)
        for proj in block.projections:  # analyses write facts into node.meta
            proj.node.meta["flextron"] = {"block": block.name, "kind": block.kind,
                                          "role": proj.role, "sizes": dict(block.sizes)}
    # A pinned "block" whose axis several projections read, or the in-projections of found
    # blocks read, or that only found blocks' out-projections write, is the residual stream
    # between blocks, not a block that was missed: a block's hidden axis (neurons, heads) is
    # written by its in-projections and read back by its one out-projection only. (After the
    # last layer of a parallel-residual model, attention and MLP outputs are summed into an
    # axis only the output head reads; any linear layer dropped here is still accounted for.)
    readers: dict[int, set] = {}
    for p in st.projections:
        for a in p.contraction or ():
            readers.setdefault(A.find(a), set()).add(p.node)
    by_node = {p.node: p for p in st.projections}
    stream = {A.find(a) for b in blocks for q in b.in_projs
              for a in by_node[q.node].contraction or ()}
    outs = {b.out_proj.node.name for b in blocks} | \
        {s.nodes[-1] for s in [*skipped, *(p[2] for p in pending if p[3] == "attention")]
         if s.nodes}
    skipped += [s for ins, classes, s, _ in pending
                if not classes & stream and all(len(readers[c]) == 1 for c in classes)
                and not {n.name for n in ins} <= outs]
    return blocks, skipped


def _shared_weight(gm: fx.GraphModule, projs: list[Projection]) -> str | None:
    """Why a block's weights cannot be reordered and sliced for it alone, or None.

    Sharing is found by parameter identity, not by node: one Linear applied in two places
    (ALBERT-style layer sharing, a tied weight) gives two nodes reading one parameter, and
    one parameter cannot hold two neuron orders or be counted as sliced twice.
    """
    mine = {p.node for p in projs}
    sliced: dict[int, str] = {}
    for p in projs:
        for w in (p.weight, p.bias if p is not projs[-1] else None):
            if isinstance(w, fx.Node) and w.op == "get_attr":
                sliced[id(attrgetter(w.target)(gm))] = w.target
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            tensor = attrgetter(node.target)(gm)
        except AttributeError:  # pragma: no cover - a get_attr of a submodule
            continue
        if id(tensor) not in sliced:
            continue
        for user in node.users:
            readers = list(user.users) if _is_transpose(user) else [user]
            other = next((r for r in readers if r not in mine), None)
            if other is not None:
                return (f"its weight {sliced[id(tensor)]} is also read by "
                        f"{other.format_node()} (one parameter used by several layers, e.g. "
                        "ALBERT-style layer sharing, cannot hold one neuron order per use)")
    return None


def _account(gm: fx.GraphModule, st: Propagation, blocks: list[Block],
             skipped: list[Skipped]) -> list[Fixed]:
    """Say where every linear layer went: in a block, in `skipped`, or a fixed part.

    Ensures: a linear layer that is none of these is added to `skipped` with the reason,
    so no part of the model is left dense without the user being told.
    """
    A = st.atoms
    covered = {p.node.name for b in blocks for p in b.projections}
    covered |= {n for s in skipped for n in s.nodes}
    by_node = {p.node: p for p in st.projections}
    kept_whole = [{A.find(a) for a in by_node[b.out_proj.node].contraction} for b in blocks]
    live = dataflow.live(gm.graph)
    fixed: list[Fixed] = []
    names = {n.name: n for n in gm.graph.nodes}
    region_out = {names[s.nodes[-1]]: s for s in skipped if s.nodes and s.nodes[-1] in names}
    for p in st.projections:
        if p.node.name in covered:
            continue
        region = next((region_out[o] for o in _feeds(p.node, set(region_out), by_node)), None)
        if region is not None:  # computed within a region left dense: part of it
            region.nodes.append(p.node.name)
            continue
        if p.node not in live:
            part = "unused"
        elif _unary_path_to_output(p.node, live):
            part = "output head"
        elif (all(A.has_role(a, "head_dim") for a in A.leaves([p.out_atom]))
              or any(A.tree_roots(p.out_atom) <= k for k in kept_whole)
              or _feeds(p.node, {b.out_proj.node for b in blocks}, by_node)):
            part = "unsliced part of a block"
        elif not _projection_before(p.x, by_node):
            part = "input projection"
        else:
            skipped.append(Skipped(
                p.node.format_node(), _module_path(p.node),
                "a linear layer in no MLP or attention block the analysis found (for example "
                "a mixture-of-experts router, or a block whose pattern is not recognised); "
                "left dense", [p.node.name]))
            continue
        fixed.append(Fixed(p.node.name, p.weight.target, part))
    return fixed


def _feeds(node: fx.Node, outs: set, by_node) -> list[fx.Node]:
    """Which of `outs` `node` reaches with no linear layer in between: its output is
    computed with inside that block (a K/V with one KV head, its features rotated by an op
    that leaves their axis unlabelled)."""
    seen, stack, found = set(), [node], []
    while stack:
        for user in stack.pop().users:
            if user in outs:
                found.append(user)
            elif user not in seen and user not in by_node:
                seen.add(user)
                stack.append(user)
    return found


def _unary_path_to_output(node: fx.Node, live: set) -> bool:
    """Whether every live use of `node` leads to the output through one-tensor ops only."""
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user not in live or user.op == "output":
                continue
            tensors = [a for a in user.all_input_nodes if "tensor_meta" in a.meta
                       and hasattr(a.meta["tensor_meta"], "shape")]
            if user.op != "call_function" or len(tensors) != 1:
                return False
            stack.append(user)
    return True


def _projection_before(x, by_node) -> bool:
    """Whether some linear layer lies between the graph inputs and `x`."""
    if not isinstance(x, fx.Node):
        return False
    return any(n in by_node for n in nx.ancestors(dataflow.dataflow(x.graph), x) | {x})


def _terms(tree) -> list[list[int]]:
    """Roots of each product term of a layout tree (sums expanded into separate terms)."""
    kind = tree[0]
    if kind == "atom":
        return [[tree[1]]]
    if kind == "sum":
        return [t for c in tree[1] for t in _terms(c)]
    out = [[]]
    for c in tree[1]:
        out = [a + b for a in out for b in _terms(c)]
    return out


def _make_block(gm, st, out: Projection, ins: list[Projection], kind, elastic, path, idx):
    A = st.atoms
    projs: list[Proj] = []
    biases = False
    for p in ins:
        bias = p.bias.target if isinstance(p.bias, fx.Node) else None
        biases |= bias is not None
        projs.append(Proj("", p.node, p.weight.target, bias, p.out_axis, A.tree(p.out_atom)))
    out_bias = out.bias is not None
    projs.append(Proj("o" if kind == "attention" else "down", out.node, out.weight.target, None,
                      1 - out.out_axis, ("prod", [A.tree(a) for a in out.contraction])))
    model_dim = attrgetter(out.weight.target)(gm).shape[out.out_axis]
    name = f"{path or 'block'}#{idx}"
    if kind == "mlp":
        n = elastic[0]
        _name_mlp(projs)
        sizes = {"hidden": A.size[n], "model_dim": model_dim}
        return Block(name, kind, projs, {"neurons": n}, sizes, biases or out_bias, path)

    # query heads that share one K/V head were broadcast to it (repeat_kv or enable_gqa)
    per_group = {c for c in elastic if A.has_role(c, "broadcast")}
    groups = set(elastic) - per_group
    if len(groups) > 1 or len(per_group) > 1:
        return Skipped(out.node.format_node(), path,
                       "attention heads factor into more than two axes; left dense")
    g = next(iter(groups), None)
    r = next(iter(per_group), None)
    G = A.size[g] if g is not None else 1
    R = A.size[r] if r is not None else 1
    head_dim = math.prod(A.size[A.find(a)] for a in out.contraction) // (G * R)
    classes = {}
    if g is not None:
        classes["groups"] = g
    if r is not None:
        classes["per_group"] = r
    _name_attention(projs, r)
    kv = G  # with no per-group axis every head has its own K/V
    sizes = {"heads": G * R, "kv_heads": kv, "head_dim": head_dim, "model_dim": model_dim}
    return Block(name, "attention", projs, classes, sizes, biases or out_bias, path)


def _name_mlp(projs: list[Proj]) -> None:
    ins = projs[:-1]
    if len(ins) == 1:
        ins[0].role = "gate_up" if ins[0].layout[0] == "sum" else "up"
        return
    # the gate goes through a non-linearity before meeting the other input at a product
    for p in ins:
        user = next(iter(p.node.users), None)
        p.role = "up" if user is not None and len(user.all_input_nodes) > 1 else "gate"
    if all(p.role == "up" for p in ins) or all(p.role == "gate" for p in ins):
        for k, p in enumerate(ins):
            p.role = f"in{k}"


def _name_attention(projs: list[Proj], r) -> None:
    ins = projs[:-1]
    if len(ins) == 1:
        ins[0].role = "qkv" if len(_terms(ins[0].layout)) >= 3 else "q"
        return
    for p in ins:
        n_terms = len(_terms(p.layout))
        has_r = r is not None and r in {a for t in _terms(p.layout) for a in t}
        p.role = "qkv" if n_terms >= 3 else ("q" if has_r else "")
    unnamed = [p for p in ins if not p.role]
    if len(unnamed) == 3 and r is None:
        for p, role in zip(unnamed, "qkv"):
            p.role = role
    elif len(unnamed) == 2:
        unnamed[0].role, unnamed[1].role = "k", "v"
    elif len(unnamed) == 1:
        unnamed[0].role = "kv" if len(_terms(unnamed[0].layout)) == 2 else "k"
    for k, p in enumerate(ins):
        p.role = p.role or f"in{k}"
