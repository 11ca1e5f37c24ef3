"""One ONNX file for every budget: the budget is an input, and weights are sliced inside.

`to_elastic_onnx(em, path, settings)` writes the full weights once, plus one small table
per slice and per shape constant: its length at each setting. The file's last input,
`setting`, is an int64 scalar choosing a row of those tables (setting k is `settings[k]`,
e.g. the fractions 1.0, 0.75, 0.5, or per-op widths a router picked for a budget). Each
slice becomes a `Slice` of the weight with a data-dependent end, so a smaller setting runs
smaller matmuls in onnxruntime: no masks, no second copy of any weight.

The graph is the elastic graph with its regions inlined (`dense.freeze` without the folding),
so every architecture flextronize supports exports the same way.
"""

from __future__ import annotations

import copy
import operator
import os
import warnings
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch
from torch import fx

from .._atomic import write_atomic
from ..elastic import layout as L
from ..elastic.compensation import Compensation, LowRankDelta
from ..elastic.model import ElasticModel
from ..elastic.ops import ShapeSize, WeightSlice, WidthSource, WidthSpan
from ..errors import ExportError, OutputError, WidthError
from .dense import inline_regions
from .onnx import _outputs, example_inputs, export_program, mismatch


def pick(table: torch.Tensor, setting: torch.Tensor, low: int, high: int):
    """`table[setting]` as an int the exporter treats as a size in [low, high]."""
    n = table[setting].item()
    torch._check(n >= low)
    torch._check(n <= high)
    return n


def extent(layouts: list, classes: dict):
    """Summed length of `layouts` when axis classes keep `classes` indices (symbolic in
    the exported graph: every size of a block is an expression of one number)."""
    return sum(L.extent(t, classes) for t in layouts)


def budget_graph(em: ElasticModel, settings: list) -> fx.GraphModule:
    """The elastic graph as a plain module `forward(*inputs, setting)` whose slices and
    shape constants take their sizes at `settings[setting]` from one number per block: the
    kept count of its shrinking axis class, read from a table."""
    chosen = [em.static_widths(s) for s in settings]
    if not chosen:
        raise WidthError("give at least one setting (a fraction or {op: width})")

    gm = copy.deepcopy(em.graph_module)
    inline_regions(gm)
    graph = gm.graph
    graph.set_codegen(fx.graph.CodeGen())  # plain arguments: one more input, `setting`
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        setting = graph.placeholder("setting")
    anchor = setting

    def block_of(node: fx.Node) -> str:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, WidthSpan):
            return block_of(node.args[0])
        if isinstance(mod, WidthSource):
            return mod.block
        raise ExportError(f"{node.format_node()} feeds a width but is not a width node; "
                          "export with the routers removed or with a fixed budget")

    kept: dict[str, object] = {}  # block -> its kept class count (an int or a graph node)
    at: set[fx.Node] = set()  # size nodes read from tables

    def count(block: str, rule):
        nonlocal anchor
        if block not in kept:
            values = [w[block] // rule.unit for w in chosen]
            if len(set(values)) == 1:
                kept[block] = values[0]
            else:
                name = f"flextron_table_{len(kept)}"
                gm.register_buffer(name, torch.tensor(values, dtype=torch.int64))
                with graph.inserting_after(anchor):
                    table = graph.get_attr(name)
                with graph.inserting_after(table):
                    anchor = kept[block] = graph.call_function(
                        pick, (table, setting, min(values), max(values)))
        return kept[block]

    for node in list(graph.nodes):
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, ShapeSize):
            classes = {r.cls: count(block_of(a), r) for r, a in zip(mod.rules, node.args)
                       if r.cls is not None}
            with graph.inserting_before(node):
                size = graph.call_function(extent, (list(mod.terms), classes))
            at.add(size)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
        elif isinstance(mod, WeightSlice):
            weight, width = node.args
            block = block_of(width)
            plans = [mod.plan(w[block]) for w in chosen]
            if all(p is None for p in plans) or mod.rule.cls is None:
                node.replace_all_uses_with(weight)
                graph.erase_node(node)
                continue
            with graph.inserting_before(node):
                length = graph.call_function(
                    extent, ([mod.layout], {mod.rule.cls: count(block, mod.rule)}))
                if all(not isinstance(p, torch.Tensor) for p in plans):
                    sliced = graph.call_function(torch.narrow, (weight, mod.axis, 0, length))
                else:
                    sliced = _gather(gm, graph, node, weight, mod, plans, setting, length)
            node.replace_all_uses_with(sliced)
            graph.erase_node(node)
        elif isinstance(mod, LowRankDelta):
            _delta(gm, graph, node, mod, [w[block_of(node.args[1])] for w in chosen], setting)
        elif isinstance(mod, Compensation):
            _bias(gm, graph, node, mod, [w[mod.block] for w in chosen], setting)
    _fixed_chunks(graph, at)
    graph.eliminate_dead_code()
    leftover = [n.format_node() for n in graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), (WidthSource, WidthSpan))]
    if leftover:
        raise ExportError(f"width nodes still in use after slicing: {leftover[:3]}")
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="ElasticBudgets")


def _fixed_chunks(graph: fx.Graph, at: set) -> None:
    """`split(x, size)` with a size read from a table, and `chunk(x, n)`, ->
    `split_with_sizes(x, [size] * n)` where the traced op gave n equal chunks (fused q, k
    and v; fused gate and up): the exporter cannot prove from symbolic sizes that the
    count stays n. The export-time check against
    `materialize` at every setting confirms the outputs."""
    for node in list(graph.nodes):
        split = node.target is torch.ops.aten.split.Tensor and node.args[1] in at
        if not (split or node.target is torch.ops.aten.chunk.default):
            continue
        x, size = node.args[:2]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        chunks = [str(c.shape[dim]) for c in node.meta.get("val", ())]
        if not chunks or len(set(chunks)) != 1:
            continue
        with graph.inserting_before(node):
            if not split:  # chunk(x, n): n equal parts of the (symbolic) axis
                axis = graph.call_function(torch.ops.aten.sym_size.int, (x, dim))
                size = graph.call_function(operator.floordiv, (axis, len(chunks)))
            new = graph.call_function(torch.ops.aten.split_with_sizes.default,
                                      (x, [size] * len(chunks), dim))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _bias(gm, graph, node, mod: Compensation, widths: list[int], setting) -> None:
    """A compensation bias at the setting's width: one row per setting (zeros at full
    width), picked by `setting` and added."""
    y = node.args[0]
    rows = [mod.row(w) for w in widths]
    if all(r is None for r in rows):
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        return
    name = f"{node.target}_rows"
    zero = torch.zeros_like(mod.bias[0])
    gm.register_buffer(name, torch.stack([zero if r is None else r.detach() for r in rows]))
    with graph.inserting_before(node):
        row = graph.call_function(operator.getitem, (graph.get_attr(name), setting))
        new = graph.call_function(operator.add, (y, row))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _delta(gm, graph, node, mod: LowRankDelta, widths: list[int], setting) -> None:
    """A low-rank compensation (passes/compensate.py) at the setting's width: the factors
    of every setting stacked (zeros at full width; V padded with zero rows to the
    weight's full length), the setting's pair picked, V cut to the sliced weight's kept
    length, U V^T added."""
    sliced, _, *factors = node.args
    values = [attrgetter(f.target)(gm).detach() for f in factors]
    us, vs = values[0::2], values[1::2]
    full = mod.candidates[-1]
    if all(w == full for w in widths):
        node.replace_all_uses_with(sliced)
        graph.erase_node(node)
        return
    # W itself, narrow(W, ...) or index_select(W, ...): V is padded to W's length
    weight = sliced if sliced.op == "get_attr" else sliced.args[0]
    widest = attrgetter(weight.target)(gm).shape[mod.axis]
    picked = [(torch.zeros_like(us[0]), torch.zeros(widest, us[0].shape[1], dtype=us[0].dtype))
              if w == full else (us[mod.candidates.index(w)], vs[mod.candidates.index(w)])
              for w in widths]
    name = f"{node.target}_factors"
    gm.register_buffer(f"{name}_u", torch.stack([u for u, _ in picked]))
    gm.register_buffer(f"{name}_v", torch.stack([
        torch.cat([v, v.new_zeros(widest - v.shape[0], v.shape[1])]) for _, v in picked]))
    with graph.inserting_before(node):
        u = graph.call_function(operator.getitem, (graph.get_attr(f"{name}_u"), setting))
        v = graph.call_function(operator.getitem, (graph.get_attr(f"{name}_v"), setting))
        kept = graph.call_function(torch.ops.aten.sym_size.int, (sliced, mod.axis))
        v = graph.call_function(torch.narrow, (v, 0, 0, kept))
        delta = graph.call_function(torch.matmul, (u, graph.call_function(torch.t, (v,))))
        if mod.axis == 0:
            delta = graph.call_function(torch.t, (delta,))
        new = graph.call_function(operator.add, (sliced, delta))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _gather(gm, graph, node, weight, mod: WeightSlice, plans, setting, length):
    """Kept rows that are not a prefix (query heads inside KV groups): one padded row of
    indices per setting, cut to `length`."""
    full = gm.get_parameter(weight.target).shape[mod.axis] if weight.op == "get_attr" \
        else int(weight.meta["val"].shape[mod.axis])
    rows = [torch.arange(full) if p is None else torch.arange(p) if isinstance(p, int)
            else p for p in plans]
    widest = max(len(r) for r in rows)
    padded = torch.stack([torch.cat([r, r.new_zeros(widest - len(r))]) for r in rows])
    name = f"{node.target}_rows"
    gm.register_buffer(name, padded)
    row = graph.call_function(operator.getitem, (graph.get_attr(name), setting))
    return graph.call_function(torch.index_select,
                               (weight, mod.axis, graph.call_function(torch.narrow,
                                                                      (row, 0, 0, length))))


def to_elastic_onnx(em: ElasticModel, path: str | os.PathLike, settings, *,
                    check: bool = True, tol: float = 1e-4,
                    overwrite: bool = False) -> Path:
    """Write one ONNX file serving every setting in `settings` (fractions or {op: width}).

    Its inputs are the model's inputs (dynamic batch and sequence) and `setting`, an int64
    scalar indexing `settings`. With `check`, onnxruntime must equal `em.materialize` at
    every setting on two input shapes (to `tol` of the output's scale), or nothing is
    written.

    Example:
        >>> to_elastic_onnx(em, "all.onnx", [1.0, 0.75, 0.5])     # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name ending in .onnx")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=True to replace it")
    settings = list(settings)
    module = budget_graph(em, settings)
    inputs, dynamic = example_inputs(em)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the exporter's optimiser matters here (unlike for plain sub-networks): with it,
        # setting 1.0 ran in 1.007x the time of the full per-budget file, without it in
        # 1.110x (two runs of benchmarks/onnx_budgets.py, docs/RESULTS.md)
        proto = export_program(module, (*inputs, torch.tensor(0)), (*dynamic, None),
                               [*(f"input_{i}" for i in range(len(inputs))), "setting"],
                               optimize=True)
    blob = proto.SerializeToString()
    if check:
        _check(em, blob, settings, tol)
    return write_atomic(path, blob)


def _check(em, blob: bytes, settings: list, tol: float) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    b, s = em.sample_shape[0], em.sample_shape[1] if len(em.sample_shape) > 1 else None
    for k, widths in enumerate(settings):
        dense = em.materialize(widths)
        for shape in ((b, s), (b + 1, (s + 3) if s else None)):
            inputs, _ = example_inputs(em, *shape)
            feed = {n: t.numpy() for n, t in zip(names, inputs)}
            feed[names[-1]] = np.array(k, dtype=np.int64)
            got = session.run(None, feed)
            with torch.no_grad():
                want = [w.detach().numpy() for w in _outputs(dense(*inputs))]
            for i, (g, w) in enumerate(zip(got, want)):
                err, allowed = mismatch(g, w, tol) if g.shape == w.shape else (np.inf, tol)
                if err > allowed:
                    raise ExportError(
                        f"setting {k} ({widths!r}): onnxruntime output {i} differs from the "
                        f"materialized sub-network (shape {g.shape} vs {w.shape}, error "
                        f"{err:.2e}, allowed {allowed:.1e}); the file was not written")


__all__ = ["budget_graph", "to_elastic_onnx"]
