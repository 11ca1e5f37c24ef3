"""Dense models: an elastic graph at fixed widths turned into a plain one.

`materialize` copies the elastic graph, sets its widths and `freeze`s the copy: regions are
inlined (`inline_regions`), width and size nodes become ints, each weight slice becomes a
sliced copy of its parameter, and compensation rows become constant adds (`fold`). The
result holds no flextron module; ONNX, Hugging Face and the profiler all start from it.
"""

from __future__ import annotations

import copy
import warnings
from operator import attrgetter

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from ..elastic.compensation import Compensation, LowRankDelta
from ..elastic.model import ElasticModel, _sources
from ..errors import WidthError
from ..passes.elasticize import (
    MLP_PREFIX,
    OUT_PREFIX,
    SIZE_PREFIX,
    SLICE_PREFIX,
    SPAN_PREFIX,
    WIDTH_PREFIX,
)


def materialize(em: ElasticModel, widths=None) -> nn.Module:
    """A plain dense copy of `em` at `widths` (default: its current ones) with sliced
    weights; what `ElasticModel.materialize` returns.

    The result holds no flextron modules: its parameters have the smaller shapes and
    its shape constants the smaller values; none of them requires grad.
    """
    chosen = em.static_widths(widths)
    with warnings.catch_warnings():  # torch's own pytree deprecation, nothing to act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        gm = copy.deepcopy(em.graph_module)
    for name, src in _sources(gm, em.ops).items():
        src.value = chosen[name]
    frozen = freeze(gm)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def freeze(gm: fx.GraphModule) -> fx.GraphModule:
    """Inline every region and replace widths by their (static) values, slices by sliced
    parameter copies and sizes by ints, in place.

    Ensures: no flextron module remains; the graph is a plain dense model.
    """
    graph = gm.graph
    inline_regions(gm)
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.target.startswith(
                (WIDTH_PREFIX, SPAN_PREFIX, SIZE_PREFIX)):
            continue
        args = tree_map(lambda a: a, node.args)
        value = gm.get_submodule(node.target)(*args)
        if isinstance(value, torch.Tensor):
            raise WidthError(f"{node.target} holds per-token widths; a dense model needs "
                             "one width per op")
        for user in list(node.users):
            user.args = tree_map(lambda a, n=node, v=value: v if a is n else a, user.args)
        graph.erase_node(node)
    fold(gm)  # compensation rows become constant adds
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.target.startswith(SLICE_PREFIX):
            continue
        _to_constant(gm, node)
    for node in list(graph.nodes):  # low-rank compensations: into the sliced weights
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   LowRankDelta):
            _to_constant(gm, node)
    graph.eliminate_dead_code()
    for name, _ in list(gm.named_children()):
        if name.startswith((SLICE_PREFIX, SIZE_PREFIX, WIDTH_PREFIX, SPAN_PREFIX, MLP_PREFIX,
                            OUT_PREFIX)):
            delattr(gm, name)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


def inline_regions(gm: fx.GraphModule) -> None:
    """Put each region's reference subgraph back in place of its node."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not node.target.startswith((MLP_PREFIX, OUT_PREFIX)):
            continue
        ref = gm.get_submodule(node.target).ref
        placeholders = [n for n in ref.graph.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, node.args))
        with graph.inserting_before(node):
            for n in ref.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    node.replace_all_uses_with(env[n.args[0]])
                    break
                target = n.target
                if n.op == "call_module":
                    target = f"{n.target}_in_{node.target}"
                    gm.add_submodule(target, ref.get_submodule(n.target))
                env[n] = graph.create_node(n.op, target,
                                           fx.node.map_arg(n.args, env.__getitem__),
                                           fx.node.map_arg(n.kwargs, env.__getitem__))
                env[n].meta = dict(n.meta)
        graph.erase_node(node)


def _to_constant(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace `node`, a module call on a parameter (a slice, or a low-rank compensation
    of a sliced weight) whose other inputs are constants by now, by a parameter holding
    its value: the weight itself when nothing else reads it, a new one otherwise."""
    graph = gm.graph
    src, *rest = node.args
    args = [attrgetter(a.target)(gm) if isinstance(a, fx.Node) else a for a in rest]
    with torch.no_grad():
        value = gm.get_submodule(node.target)(attrgetter(src.target)(gm), *args)
    param = torch.nn.Parameter(value.detach().clone().contiguous(), requires_grad=False)
    if len(src.users) == 1:  # the usual case: the weight now has its sliced shape
        _assign(gm, src.target, param)
        node.replace_all_uses_with(src)
    else:
        new_name = f"{src.target.replace('.', '_')}__{node.target}"
        gm.register_parameter(new_name, param)
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.get_attr(new_name))
    graph.erase_node(node)


def _assign(gm, target: str, value) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, value)




def fold(gm: fx.GraphModule) -> None:
    """Replace every compensation node, whose width is an int by now, by a constant add
    (or by its input at full width). Part of `freeze`, once widths are constants."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target),
                                                      Compensation):
            continue
        mod = gm.get_submodule(node.target)
        y, width = node.args
        if isinstance(width, (fx.Node, torch.Tensor)):
            raise WidthError(f"{mod.block} holds per-token widths; a dense model needs one "
                             "width per op")
        row = mod.row(width)
        if row is None:
            node.replace_all_uses_with(y)
        else:
            const = f"{node.target}_bias"
            gm.register_buffer(const, row.detach().clone())
            with graph.inserting_before(node):
                add = graph.call_function(torch.ops.aten.add.Tensor, (y, graph.get_attr(const)))
            add.meta = dict(node.meta)
            node.replace_all_uses_with(add)
        graph.erase_node(node)


__all__ = ["fold", "freeze", "inline_regions", "materialize"]
