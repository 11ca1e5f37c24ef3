"""Static programs: an elastic graph with its constant widths folded in, run as plain code.

When every width a graph reads is an int, the width nodes, the sizes computed from them
and the weight slices are constants of that forward pass. `specialise` folds them: width
and size nodes become ints, a slice becomes `torch.narrow` (a view of the weight, so
gradients and in-place changes reach the real parameter) or disappears at full width.
Everything else stays: region nodes remain module calls (their own static program is
built per width by `ElasticRegion`), hooks on them still fire, and a node that produces
widths without being a constant (a router) keeps its slices as module calls.

The elastic graph itself is not changed; a static program is a derived artifact, like a
compiled kernel, and runs with the original module as `self`, so it reads the current
parameters on every call. At small batches it saves the Python cost of a few hundred tiny
module calls per forward pass (docs/RESULTS.md, "Forward speed").
"""

from __future__ import annotations

import linecache
from collections.abc import Callable
from itertools import count

import torch
from torch import fx

from .ops import ShapeSize, WeightSlice, WidthSource, WidthSpan

_serial = count()


def specialise(gm: fx.GraphModule, constants: dict[str, int] | None = None
               ) -> Callable | None:
    """`fn(gm, *inputs)` computing `gm(*inputs)` with its constant widths folded in.

    `constants` maps placeholder names to int values (a region's `width` input); width
    nodes (`WidthSource`) are read from `gm` now. Returns None when a width node holds
    per-token widths: routed execution has no static program.
    """
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    env: dict[fx.Node, object] = {}
    folded: dict[fx.Node, int] = {}
    constants = constants or {}

    def arg(a):
        return folded.get(a, env.get(a, a)) if isinstance(a, fx.Node) else a

    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "placeholder" and node.name in constants:
            folded[node] = constants[node.name]
            env[node] = graph.node_copy(node, arg)  # still an argument, no longer read
            continue
        if isinstance(mod, WidthSource):
            if isinstance(mod.value, torch.Tensor):
                return None
            folded[node] = mod.value
            continue
        if isinstance(mod, (WidthSpan, ShapeSize)) and all(a in folded for a in node.args):
            folded[node] = mod(*(folded[a] for a in node.args))
            continue
        if isinstance(mod, WeightSlice) and node.args[1] in folded:
            plan = mod.plan(folded[node.args[1]])
            weight = arg(node.args[0])
            if plan is None:
                env[node] = weight
                continue
            if isinstance(plan, int):
                env[node] = graph.call_function(torch.narrow, (weight, mod.axis, 0, plan))
                continue
        env[node] = graph.node_copy(node, arg)
    return _compile(graph, type(gm).__name__)


def _compile(graph: fx.Graph, name: str) -> Callable:
    code = graph.python_code(root_module="self")
    filename = f"<flextron static {name} {next(_serial)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    scope = dict(code.globals)
    exec(compile(code.src, filename, "exec"), scope)  # noqa: S102  (fx's own generated code)
    return scope["forward"]


__all__ = ["specialise"]
