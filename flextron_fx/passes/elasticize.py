"""Elasticize: give every block a width node, and make its weights and shapes read it.

Requires: `analysis` came from `analyze(gm, ...)` on this very graph.
Ensures:
- every block has a `WidthSource` node (its width, a constant `set_widths` changes);
  attention also a `WidthSpan` node (the widest width in the batch);
- every block weight goes through a `WeightSlice(weight, width)` node and every shape
  constant that depends on a width through a `ShapeSize(width, ...)` node;
- every MLP becomes one `ElasticRegion` node `elastic_mlp(x, width, *params)`, and every
  attention output projection one `ElasticRegion` node, so per-token widths can run there;
- at full width the graph computes exactly what it did before; the graph lints.

`export.dense.freeze` undoes all of it at fixed widths: a plain dense graph with sliced weights.
"""

from __future__ import annotations

import logging
from operator import attrgetter

import torch
from torch import fx

from ..analyze import Analysis, Block
from ..analyze.dataflow import between, dataflow
from ..config import FlextronConfig
from ..elastic import layout as L
from ..elastic.ops import ElasticRegion, ShapeSize, WeightSlice, WidthSource, WidthSpan
from ..elastic.widths import candidates, width_rule

log = logging.getLogger(__name__)

WIDTH_PREFIX = "flextron_width_"
SPAN_PREFIX = "flextron_span_"
SLICE_PREFIX = "flextron_slice_"
SIZE_PREFIX = "flextron_size_"
MLP_PREFIX = "flextron_mlp_"
OUT_PREFIX = "flextron_out_"

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default,
          torch.ops.aten._unsafe_view.default}
_ACTIVATIONS = {torch.ops.aten.silu.default: "silu", torch.ops.aten.relu.default: "relu",
                torch.ops.aten.gelu.default: "gelu", torch.ops.aten.sigmoid.default: "sigmoid",
                torch.ops.aten.tanh.default: "tanh"}


def block_layouts(analysis: Analysis, block: Block) -> list[tuple]:
    return [L.sized(analysis.atoms, p.layout) for p in block.projections]


def elasticize(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block],
               config: FlextronConfig) -> None:
    A = analysis.atoms
    graph = gm.graph
    rules = {b.name: width_rule(b, config.head_mode) for b in blocks}
    cands = {b.name: candidates(b, config) for b in blocks}
    owner = {c: b.name for b in blocks for c in b.classes.values()}
    width_node, span_node = {}, {}
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, block in enumerate(blocks):
        name = f"{WIDTH_PREFIX}{i}"
        gm.add_submodule(name, WidthSource(block.name, block.full_width, cands[block.name]))
        with graph.inserting_after(anchor):
            anchor = width_node[block.name] = graph.call_module(name, ())
        anchor.meta["flextron_block"] = block.name
        span_node[block.name] = anchor
        if block.kind == "attention":
            gm.add_submodule(f"{SPAN_PREFIX}{i}", WidthSpan(cands[block.name]))
            with graph.inserting_after(anchor):
                anchor = span_node[block.name] = graph.call_module(f"{SPAN_PREFIX}{i}",
                                                                   (anchor,))

    counter = 0
    for block in blocks:
        groups = block.classes.get("groups")
        for proj, lay in zip(block.projections, block_layouts(analysis, block)):
            targets = [(proj.weight, proj.axis)]
            if proj.bias is not None:
                targets.append((proj.bias, 0))
            for target, axis in targets:
                consumer, src = _weight_edge(proj.node, target)
                weight = attrgetter(target)(gm)
                name = f"{SLICE_PREFIX}{counter}"
                counter += 1
                gm.add_submodule(name, WeightSlice(block.name, rules[block.name], lay, axis,
                                                   groups, weight.numel() // weight.shape[axis]))
                with graph.inserting_before(consumer):
                    sliced = graph.call_module(name, (src, span_node[block.name]))
                consumer.replace_input_with(src, sliced)

    for k, sa in enumerate(analysis.shape_args):
        terms = [L.sized(A, ("prod", [A.tree(a) for a in t])) for t in sa.terms]
        used = sorted({owner[c] for t in terms for c in L.classes(t) if c in owner})
        if not used:
            continue
        name = f"{SIZE_PREFIX}{k}"
        gm.add_submodule(name, ShapeSize(terms, [rules[b] for b in used]))
        with graph.inserting_before(sa.node):
            size_node = graph.call_module(name, tuple(span_node[b] for b in used))
        args = list(sa.node.args)
        if len(sa.path) == 1:
            args[sa.path[0]] = size_node
        else:
            seq = list(args[sa.path[0]])
            seq[sa.path[1]] = size_node
            args[sa.path[0]] = seq
        sa.node.args = tuple(args)

    for i, block in enumerate(blocks):
        widths = {width_node[block.name], span_node[block.name]}
        out = block.out_proj
        if block.kind == "mlp":
            x = _activation_input(block.in_projs[0].node)
            if any(_activation_input(p.node) is not x for p in block.in_projs):
                why = "its input projections read different tensors"
            else:
                why = _fuse(gm, f"{MLP_PREFIX}{i}", x, out.node, width_node[block.name],
                            widths, block, rules[block.name], cands[block.name],
                            pattern=_mlp_pattern(block))
        else:
            lay = L.sized(A, out.layout)
            why = _fuse(gm, f"{OUT_PREFIX}{i}", _activation_input(out.node), out.node,
                        width_node[block.name], widths, block, rules[block.name],
                        cands[block.name], in_layout=lay,
                        pattern={"projections": {"o": out.weight}})
        if why:
            log.info("%s runs at one width per batch only (no per-token widths): %s",
                     block.name, why)
    graph.lint()
    gm.recompile()


def _weight_edge(node: fx.Node, target: str) -> tuple[fx.Node, fx.Node]:
    """(consumer, get_attr) for a parameter read by `node` directly or through a transpose."""
    for user in [node, *node.all_input_nodes]:
        for a in user.all_input_nodes:
            if a.op == "get_attr" and a.target == target:
                return user, a
    raise AssertionError(f"{target} is not an input of {node.format_node()}")


def _is_weight_path(node: fx.Node) -> bool:
    """A parameter, its slice, or an op on those alone (a transpose of a weight)."""
    if node.op == "get_attr":
        return True
    if node.op == "call_module":
        return node.target.startswith(SLICE_PREFIX)
    inputs = node.all_input_nodes
    return node.op == "call_function" and bool(inputs) and all(
        _is_weight_path(a) or _is_width(a) for a in inputs)


def _is_width(node: fx.Node) -> bool:
    return node.op == "call_module" and node.target.startswith((WIDTH_PREFIX, SPAN_PREFIX))


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_module" and node.target.startswith(SIZE_PREFIX)


def _activation_input(node: fx.Node) -> fx.Node | None:
    """The one input of a projection that is not a weight (the tokens it multiplies)."""
    ins = [a for a in node.all_input_nodes if not _is_weight_path(a)]
    return ins[0] if len(ins) == 1 else None


def _mlp_pattern(block: Block) -> dict:
    roles = {p.role for p in block.in_projs}
    return {"gated": bool(roles & {"gate", "gate_up"}), "biases": block.biases,
            "projections": {p.role: p.weight for p in block.projections}}


def _token_shape(node: fx.Node):
    val = node.meta.get("val")
    return None if val is None else [str(s) for s in val.shape[:-1]]


def _fuse(gm: fx.GraphModule, name: str, x: fx.Node | None, out: fx.Node, width: fx.Node,
          widths: set, block: Block, rule, cands, *, in_layout=None,
          pattern: dict) -> str | None:
    """Replace the token-wise subgraph from `x` to `out` by one ElasticRegion node.

    Returns why it could not (the block then keeps its sliced ops, static widths only).
    """
    graph = gm.graph
    if x is None:
        return "its projection has no single activation input"
    if _token_shape(x) is None or _token_shape(x) != _token_shape(out):
        return "its input and output have different token axes"
    order = _region(graph, x, out)
    if isinstance(order, str):
        return order
    made = _reference(gm, x, out, order, widths, f"{block.kind}_reference")
    if isinstance(made, str):
        return made
    ref, params, pointwise = made
    if block.kind == "mlp":
        named = [a for a in pointwise if a in _ACTIVATIONS.values() or a == "gelu_tanh"]
        rest = sorted(a for a in pointwise if a not in named)
        plain = len(named) == 1 and rest == (["mul"] if pattern["gated"] else [])
        pattern = {**pattern, "activation": named[0] if plain else "composite",
                   "pointwise": sorted(pointwise)}
    gm.add_submodule(name, ElasticRegion(block.kind, block.name, ref, cands, rule,
                                         in_layout=in_layout, groups=block.classes.get("groups"),
                                         pattern=pattern))
    with graph.inserting_before(out):
        node = graph.call_module(name, (x, width, *params))
    node.meta = dict(out.meta)
    node.meta["flextron_block"] = block.name
    out.replace_all_uses_with(node)
    for n in reversed(order):
        if not n.users:
            graph.erase_node(n)
    return None


def _region(graph: fx.Graph, x: fx.Node, out: fx.Node) -> list[fx.Node] | str:
    """The nodes from `x` to `out` with the weight slices and width-dependent sizes they
    read, in graph order; or why they do not form a region of their own."""
    region = between(dataflow(graph), x, out)
    stack = list(region)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in region and a is not x and a.op != "get_attr" and not _is_width(a) \
                    and (_is_weight_path(a) or _is_size(a)):
                region.add(a)
                stack.append(a)
    order = [n for n in graph.nodes if n in region]
    for n in order:  # slices and sizes used elsewhere too are copied, anything else moves
        if n is not out and not (_is_weight_path(n) or _is_size(n)) \
                and any(u not in region for u in n.users):
            return f"{n.format_node()} is also used outside the block"
    return order


def _reference(gm: fx.GraphModule, x: fx.Node, out: fx.Node, order: list[fx.Node],
               widths: set, class_name: str):
    """(GraphModule(x, width, *params), the params' get_attr nodes, pointwise op names) of
    the region `order`; or why it cannot stand alone."""
    sub = fx.Graph()
    env = {x: sub.placeholder("x")}
    ph_width = sub.placeholder("width")
    env.update(dict.fromkeys(widths, ph_width))
    params = []
    for n in order:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = sub.placeholder("p_" + a.target.replace(".", "_"))
                params.append(a)
    region, token_dims = set(order), {}

    def token_dim(i: int) -> fx.Node:  # size i of the region's own input
        if i not in token_dims:
            token_dims[i] = sub.call_function(torch.ops.aten.sym_size.int, (env[x], i))
        return token_dims[i]

    modules, pointwise = {}, []
    for n in order:
        args = n.args
        if n.target in _VIEWS:
            args = _token_free_view(n, x, region, env, token_dim)
            if args is None:
                return f"{n.format_node()} reshapes more than the token axes"
        for a in _nodes_in((args, n.kwargs)):
            if a not in env and a not in token_dims.values():
                return f"{n.format_node()} reads {a.format_node()} from outside the block"
        new = sub.create_node(n.op, n.target, fx.node.map_arg(args, lambda a: env.get(a, a)),
                              fx.node.map_arg(n.kwargs, env.__getitem__), name=n.name)
        new.meta = dict(n.meta)
        if n.op == "call_module":
            modules[n.target] = gm.get_submodule(n.target)
        if n.target in _ACTIVATIONS:
            act = _ACTIVATIONS[n.target]
            pointwise.append("gelu_tanh" if act == "gelu"
                             and n.kwargs.get("approximate") == "tanh" else act)
        elif isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags:
            pointwise.append(str(n.target.overloadpacket.__name__))
        env[n] = new
    sub.output(env[out])
    sub.lint()
    return fx.GraphModule(modules, sub, class_name=class_name), params, pointwise


def _nodes_in(tree) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(tree, lambda a: found.append(a) or a)
    return found


def _token_free_view(n: fx.Node, x: fx.Node, region: set, env: dict, token_dim):
    """A view inside a token-wise region, rewritten so that its token axes come from the
    region's own input: its sizes if the ranks agree, [1, ..., 1, -1] otherwise (so a
    group of tokens runs alone). None if the view also reshapes the feature axis."""
    src, shape = n.args[0], n.args[1]
    outside = [a for a in _nodes_in(shape) if a not in region and a not in env]
    if not outside:
        return n.args
    src_val, out_val, x_val = src.meta.get("val"), n.meta.get("val"), x.meta.get("val")
    if src_val is None or out_val is None or str(src_val.shape[-1]) != str(out_val.shape[-1]):
        return None
    last = shape[-1]
    if isinstance(last, fx.Node) and last not in region and last not in env:
        return None
    if [str(s) for s in out_val.shape[:-1]] == [str(s) for s in x_val.shape[:-1]]:
        return (src, [token_dim(i) for i in range(len(shape) - 1)] + [last])
    return (src, [1] * (len(shape) - 2) + [-1, last])


__all__ = ["block_layouts", "elasticize"]
