"""Reachability over a torch.fx graph's dataflow (networkx), for analyses and passes."""

from __future__ import annotations

import networkx as nx
from torch import fx


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    """Nodes of `graph`, with an edge from every input to the node that reads it."""
    g = nx.DiGraph()
    g.add_nodes_from(graph.nodes)
    g.add_edges_from((a, n) for n in graph.nodes for a in n.all_input_nodes)
    return g


def live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the graph's outputs depend on (outputs included)."""
    g = dataflow(graph)
    outputs = [n for n in graph.nodes if n.op == "output"]
    return set(outputs).union(*(nx.ancestors(g, n) for n in outputs))


def between(g: nx.DiGraph, source: fx.Node, sink: fx.Node) -> set[fx.Node]:
    """Nodes on some path from `source` to `sink`, `sink` included, `source` not."""
    return (nx.ancestors(g, sink) | {sink}) & nx.descendants(g, source)
