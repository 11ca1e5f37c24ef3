"""The elastic graph itself, split so that every elastic block is one timed submodule.

Works for every model `flextronize` converts (no Hugging Face class is rebuilt): the graph
is cut with `torch.fx.passes.split_module` into one partition per elastic block and glue
partitions between them, and the partitions run in graph order, in context, as compiled
GraphModules (no per-node interpretation). A block's partition holds its *extent*:

- MLP: its `flextron_mlp_i` ElasticRegion node (plus anything else that depends on the
  block's width or weights on the way to it);
- attention: everything from its query/key/value projections to its `flextron_out_i`
  region: the nodes on a path to the out-region that depend on the block's own width
  (`flextron_width_i`: weight slices, head counts) or its own projection weights. Inputs
  shared with other blocks (the normed residual stream, rotary tables, the mask) are glue.

Forward hooks around the block partitions time each block; the glue (embedding, norms,
head, rotary tables, mask building, residual adds) is what the whole graph's time leaves
over (measure.py). Widths are set on the elastic model (`set`), which the split graph
shares (its WidthSource modules are the same objects), and every block partition then
runs as a static program with its widths folded in (elastic/static.py), as the whole
model does at repeated int widths, so blocks are timed as users run them.
"""

from __future__ import annotations

from types import MethodType

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from ..analyze import dataflow
from ..elastic.model import ElasticModel
from ..elastic.ops import ElasticRegion
from ..elastic.static import specialise
from ..errors import UnsupportedModelError
from ..trace import vocab_size


def block_extents(em: ElasticModel) -> dict[str, set[fx.Node]]:
    """{op name: the graph nodes of its block} (see the module docstring), in op order."""
    gm = em.graph_module
    graph = gm.graph
    g = dataflow.dataflow(graph)
    width = em.width_nodes()
    attrs = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    sinks: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ElasticRegion):
                sinks[mod.block] = node  # the last region of a block in graph order
    out = {}
    for name in em.ops:
        if name not in sinks or name not in width:
            raise UnsupportedModelError(
                f"elastic op {name} has no ElasticRegion node or no width node in the graph; "
                "the graph-level profiler times blocks by their regions (convert the model "
                "again with this flextron_fx)")
        sink = sinks[name]
        seeds = [width[name]]
        for proj in em.block(name).projections:
            seeds += [attrs[p] for p in (proj.weight, proj.bias) if p in attrs]
        upstream = nx.ancestors(g, sink) | {sink}
        reach = set().union(*(nx.descendants(g, s) for s in seeds))
        out[name] = {n for n in upstream & reach if n.op not in ("get_attr", "placeholder")}
        out[name].add(sink)
    return out


def partition_ids(em: ElasticModel, extents: dict[str, set[fx.Node]]) -> dict[fx.Node, int]:
    """Partition of every node: block k (in graph order) is 2k+1; glue between blocks k-1
    and k is 2k; a glue node goes to the first glue partition after everything it reads.
    Raises UnsupportedModelError when a block cannot be cut out (it would read its own
    result through glue)."""
    graph = em.graph_module.graph
    pos = {n: i for i, n in enumerate(graph.nodes)}
    order = sorted(extents, key=lambda name: max(pos[n] for n in extents[name]))
    block_of = {n: k for k, name in enumerate(order) for n in extents[name]}
    stage: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            stage[node] = 0
            continue
        ins = [stage[i] for i in node.all_input_nodes]
        if node in block_of:
            s = 2 * block_of[node] + 1
            if any(i > s for i in ins):
                raise UnsupportedModelError(
                    f"block {order[block_of[node]]} reads a value computed after it ({node.name}"
                    "); the graph-level profiler cannot time it as one piece")
        else:
            s = max([i + (i % 2) for i in ins], default=0)
        stage[node] = s
    return {n: s for n, s in stage.items() if n.op not in ("placeholder", "get_attr", "output")}


class GraphModel:
    """The elastic graph split into block and glue partitions (see the module docstring).

    `set(widths)` sets static widths on `em`; `split(*inputs)` runs the split graph,
    `em(*inputs)` the original one; `blocks` maps op name -> its partition module.

    Example:
        >>> gr = GraphModel(em)                                   # doctest: +SKIP
        >>> gr.set({**em.full_widths(), "model.layers.0.mlp#1": 384})  # doctest: +SKIP
        >>> gr.split(ids)                                         # doctest: +SKIP
    """

    def __init__(self, em: ElasticModel, *, check: bool = True):
        self.em = em
        extents = block_extents(em)
        ids = partition_ids(em, extents)
        gm = em.graph_module
        split = split_module(gm, None, lambda n: ids[n], keep_original_order=False)
        self.split = split.eval()
        names = {}
        for name, nodes in extents.items():
            names[ids[next(iter(nodes))]] = name
        self.blocks = {names[int(m.removeprefix("submod_"))]: getattr(split, m)
                       for m, _ in split.named_children()
                       if m.startswith("submod_") and int(m.removeprefix("submod_")) in names}
        missing = [n for n in em.ops if n not in self.blocks]
        if missing:
            raise UnsupportedModelError(f"no partition came out for the blocks {missing}")
        # the width values each block partition reads as inputs: folded in per width set
        # (elastic/static.py), as ElasticModel.forward runs a graph at repeated int widths
        feeds = {node.name: op for op, node in em.width_nodes().items()}
        self._constants = {
            name: {n.name: feeds[n.name] for n in mod.graph.nodes
                   if n.op == "placeholder" and n.name in feeds}
            for name, mod in self.blocks.items()}
        self._programs: dict = {}
        self.widths = em.static_widths(None)
        self._fold()
        if check:
            self._check_random()

    @property
    def vocab(self) -> int:
        return vocab_size(self.em.graph_module) or 100

    def set(self, widths) -> None:
        """Run at these static widths from now on ({op: width}, validated)."""
        widths = self.em.static_widths(widths)
        self.em.set_widths(widths)
        self.widths = widths
        self._fold()

    def _fold(self) -> None:
        """Run every block partition as a static program of its current widths, as the
        whole model runs at repeated int widths (hooks on the partitions still fire)."""
        for name, mod in self.blocks.items():
            constants = {ph: self.widths[op] for ph, op in self._constants[name].items()}
            key = (name, tuple(sorted(constants.items())))
            if key not in self._programs:
                self._programs[key] = specialise(mod, constants)
            program = self._programs[key]
            if program is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = MethodType(program, mod)

    def _check_random(self) -> None:
        """The split graph computes what the elastic graph does at a random per-op mix."""
        g = torch.Generator().manual_seed(0)
        widths = {n: op.candidates[int(torch.randint(len(op.candidates), (1,), generator=g))]
                  for n, op in self.em.ops.items()}
        ids = torch.randint(0, min(self.vocab, 1000), (1, self.em.sample_shape[-1]),
                            generator=g)
        before = self.em.widths
        try:
            self.set(widths)
            with torch.inference_mode():
                ref = _first_tensor(self.em(ids))
                got = _first_tensor(self.split(ids))
        finally:
            self.em.set_widths(before)
            self.widths = self.em.static_widths(None)
            self._fold()
        if ref.shape != got.shape or not torch.allclose(ref.float(), got.float(), atol=1e-4,
                                                        rtol=1e-4):
            raise UnsupportedModelError(
                "the elastic graph split into per-block pieces does not compute what the "
                "whole graph does; its blocks cannot be timed in place")


def _first_tensor(out) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif hasattr(out, "logits"):
            out = out.logits
        else:
            out = out[0]
    return out


class GraphRunner:
    """Prefill forwards of the elastic graph at one shape: `run` times the whole graph (ms);
    `run_parts` runs the split graph, whose block hooks time the blocks."""

    mode = "prefill"

    def __init__(self, gr: GraphModel, clock, shape, seed: int = 0):
        self.gr, self.clock = gr, clock
        b, n = shape
        device = next(iter(gr.em.parameters()), torch.empty(0)).device
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, gr.vocab, (b, n), generator=g).to(device)
        self.short = torch.randint(0, gr.vocab, tuple(gr.em.sample_shape),
                                   generator=g).to(device)

    def prepare(self, key=None) -> None:
        """After a width switch: the elastic model builds a width set's static program on
        its second forward in a row at it (elastic/model.py; 0.2-0.5 s for SmolLM2). Two
        untimed forwards at the traced shape build it here, so no timed forward (nor a
        warm-up, which may be zero) includes it."""
        with torch.inference_mode():
            self.gr.em(self.short)
            self.gr.em(self.short)

    def run_parts(self, key=None) -> None:
        with torch.inference_mode():
            self.gr.split(self.ids)
        self.clock.sync()

    def run(self, key=None) -> float:
        with torch.inference_mode():
            start = self.clock.mark()
            self.gr.em(self.ids)
            end = self.clock.mark()
        self.clock.sync()
        return self.clock.ms(start, end)
