"""Compensate: per-width biases that add back the expected output of removed units.

At candidate width w a block drops the units stored after its first w (neurons, or heads
in their group order). Their expected contribution to the block's output is known from
calibration: for an MLP, sum over removed neurons j of E[h_j] * W_down[:, j] (h the down
projection's input); for attention, the same over the removed heads' channels of the
output projection's input, times W_o's columns. Adding it back as a bias keeps the mean of
the block's output where the full block had it (the bias-compensation idea of FLAP,
An et al. 2024), here for every nested width at once: K - 1 vectors per block, one per
candidate below the full width, all computed from one calibration pass.

`compensation_tables` computes them (after `permute`, before `elasticize`);
`compensate` inserts one `Compensation` node after each block's output that reads the
block's width (static or per token); `export.dense.fold` (part of `freeze`) turns each of those into
a constant add at a fixed width, so a materialized model equals the elastic one.

Requires: `compensation_tables`: stats from `rank.measure` on the unpermuted model, the
orders `permute` applied; `compensate`: an elasticized graph.
Ensures: at full width the graph computes exactly what it did before (the node returns
its input); the graph lints.
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import fx

from ..analyze import Analysis, Block
from ..config import FlextronConfig
from ..elastic import layout as L
from ..elastic.compensation import Compensation
from ..elastic.model import width_nodes
from ..elastic.ops import ElasticRegion
from ..elastic.widths import candidates, width_rule
from .scores import Stats

COMP_PREFIX = "flextron_comp_"


def compensation_tables(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block],
                        stats: dict[str, Stats], orders: dict, config: FlextronConfig
                        ) -> dict[str, torch.Tensor]:
    """{block: [K - 1, out features]}: row k is the expected output of the units that
    candidate k removes, from the weights as stored now (permuted by `orders`), for the
    blocks of the kinds `config.compensate` names."""
    kinds = {"none": (), "mlp": ("mlp",), "attention": ("attention",),
             "all": ("mlp", "attention")}[config.compensate]
    tables = {}
    for block in blocks:
        cands = candidates(block, config)
        if len(cands) < 2 or block.name not in stats or block.kind not in kinds:
            continue
        proj = block.out_proj
        lay = L.sized(analysis.atoms, proj.layout)
        groups = block.classes.get("groups")
        weight = attrgetter(proj.weight)(gm).detach()
        w = (weight if proj.axis == 1 else weight.t()).double()  # [out, in]
        mean = stats[block.name].mean().to(w.device)
        sel = orders.get(block.name)
        if sel:  # the stored channel p now holds the original channel index[p]
            mean = mean[L.index(lay, sel, groups).to(w.device)]
        rule = width_rule(block, config.head_mode)
        rows = []
        for width in cands[:-1]:
            keep = {c: torch.arange(k) for c, k in rule.classes(width).items()}
            removed = torch.ones(lay[2], dtype=torch.bool, device=w.device)
            removed[L.index(lay, keep, groups).to(w.device)] = False
            rows.append(w[:, removed] @ mean[removed])
        tables[block.name] = torch.stack(rows).to(weight.dtype)
    return tables


def compensate(gm: fx.GraphModule, blocks: list[Block], tables: dict[str, torch.Tensor]
               ) -> list[str]:
    """Insert `y = flextron_comp_i(out, width)` after the output of every block in
    `tables`; returns the names of the new modules (`flextron_comp_<block index>`)."""
    graph = gm.graph
    regions = {}
    for node in graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ElasticRegion):
                regions[mod.block] = node
    widths = width_nodes(gm)
    made = []
    for i, block in enumerate(blocks):
        if block.name not in tables:
            continue
        out = regions.get(block.name, block.out_proj.node)
        width = widths[block.name]
        cands = gm.get_submodule(width.target).candidates
        name = f"{COMP_PREFIX}{i}"
        gm.add_submodule(name, Compensation(block.name, cands, tables[block.name]))
        with graph.inserting_after(out):
            node = graph.call_module(name, (out, width))
        out.replace_all_uses_with(node, delete_user_cb=lambda u, n=node: u is not n)
        node.meta = dict(out.meta)
        node.meta["flextron_block"] = block.name
        made.append(name)
    graph.lint()
    gm.recompile()
    return made


def compensation_modules(gm: fx.GraphModule) -> dict[str, Compensation]:
    """Module name -> Compensation, for every compensation node of `gm`."""
    return {n: m for n, m in gm.named_children() if isinstance(m, Compensation)}
