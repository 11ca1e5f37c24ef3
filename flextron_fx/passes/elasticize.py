"""Elasticize: route every block weight through a `WeightSlice` and every shape constant
that depends on a block width through a `ShapeSize`.

Requires: `analysis` came from `analyze(gm, ...)` on this very graph.
Ensures: at full width the graph computes exactly what it did before (slices return the
weights themselves, sizes their original values); the graph lints.
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import fx
from torch.utils._pytree import tree_map

from ..analyze import Analysis, Block
from ..elastic import layout as L
from ..elastic.ops import ShapeSize, WeightSlice, WidthState

SLICE_PREFIX = "flextron_slice_"
SIZE_PREFIX = "flextron_size_"


def block_layouts(analysis: Analysis, block: Block) -> list[tuple]:
    return [L.sized(analysis.atoms, p.layout) for p in block.projections]


def elasticize(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block]) -> WidthState:
    A = analysis.atoms
    full = {c: A.size[c] for b in blocks for c in b.classes.values()}
    state = WidthState(full)
    graph = gm.graph
    counter = 0
    for block in blocks:
        groups = block.classes.get("groups")
        for proj, lay in zip(block.projections, block_layouts(analysis, block)):
            node = proj.node
            targets = [(proj.weight, proj.axis)]
            if proj.bias is not None:
                targets.append((proj.bias, 0))
            for target, axis in targets:
                consumer, src = _weight_edge(node, target)
                name = f"{SLICE_PREFIX}{counter}"
                counter += 1
                slicer = WeightSlice(state, lay, axis, groups)
                weight = attrgetter(target)(gm)
                slicer.numel_per_index = weight.numel() // weight.shape[axis]
                gm.add_submodule(name, slicer)
                with graph.inserting_before(consumer):
                    sliced = graph.call_module(name, (src,))
                consumer.replace_input_with(src, sliced)

    elastic = set(full)
    for k, sa in enumerate(analysis.shape_args):
        terms = [L.sized(A, ("prod", [A.tree(a) for a in t])) for t in sa.terms]
        if not any(L.classes(t) & elastic for t in terms):
            continue
        name = f"{SIZE_PREFIX}{k}"
        gm.add_submodule(name, ShapeSize(state, terms))
        with graph.inserting_before(sa.node):
            size_node = graph.call_module(name, ())
        args = list(sa.node.args)
        if len(sa.path) == 1:
            args[sa.path[0]] = size_node
        else:
            seq = list(args[sa.path[0]])
            seq[sa.path[1]] = size_node
            args[sa.path[0]] = seq
        sa.node.args = tuple(args)
    graph.lint()
    gm.recompile()
    return state


def _weight_edge(node: fx.Node, target: str) -> tuple[fx.Node, fx.Node]:
    """(consumer, get_attr) for a parameter read by `node` directly or through a transpose."""
    for user in [node, *node.all_input_nodes]:
        for a in user.all_input_nodes:
            if a.op == "get_attr" and a.target == target:
                return user, a
    raise AssertionError(f"{target} is not an input of {node.format_node()}")


def freeze(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace slices by sliced parameter copies and sizes by ints, in place.

    Ensures: no flextron module remains; the graph is a plain dense model.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        if node.target.startswith(SLICE_PREFIX):
            mod = gm.get_submodule(node.target)
            src = node.args[0]
            with torch.no_grad():
                value = mod(attrgetter(src.target)(gm)).detach().clone().contiguous()
            param = torch.nn.Parameter(value, requires_grad=False)
            if len(src.users) == 1:  # the usual case: the weight now has its sliced shape
                _assign(gm, src.target, param)
                node.replace_all_uses_with(src)
            else:
                new_name = f"{src.target.replace('.', '_')}__{node.target}"
                gm.register_parameter(new_name, param)
                with graph.inserting_before(node):
                    node.replace_all_uses_with(graph.get_attr(new_name))
            graph.erase_node(node)
        elif node.target.startswith(SIZE_PREFIX):
            value = gm.get_submodule(node.target)()
            for user in list(node.users):
                user.args = tree_map(lambda a, n=node, v=value: v if a is n else a, user.args)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for name, _ in list(gm.named_children()):
        if name.startswith((SLICE_PREFIX, SIZE_PREFIX)):
            delattr(gm, name)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


def _assign(gm, target: str, value) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, value)

