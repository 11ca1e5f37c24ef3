"""Compensate: per-width biases that add back the expected output of removed units.

At candidate width w a block drops the units stored after its first w (neurons, or heads
in their group order). Their expected contribution to the block's output is known from
calibration: for an MLP, sum over removed neurons j of E[h_j] * W_down[:, j] (h the down
projection's input); for attention, the same over the removed heads' channels of the
output projection's input, times W_o's columns. Adding it back as a bias keeps the mean of
the block's output where the full block had it (the bias-compensation idea of FLAP,
An et al. 2024), here for every nested width at once: K - 1 vectors per block, one per
candidate below the full width, all computed from one calibration pass.

With `FlextronConfig.compensation_rank` r > 0 the compensation is a least-squares fit
instead of a mean: at each width, the kept columns of the output projection get a rank-r
correction U V^T and the bias is refitted, so that W_kept' h_kept + b best reproduces the
full block's output W h over the calibration tokens (removed units are predicted from the
kept ones; the Gram matrix of h, measure "gram", gives the fit in closed form, ridge
1e-3 of the mean diagonal). The truncation to rank r keeps the directions that matter
most for the block's output (an SVD in the metric of the kept units' covariance). Full
width is still unchanged; `freeze` folds U V^T into the sliced weight, so a materialized
or exported sub-network has the usual shapes.

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
from typing import NamedTuple

import torch
from torch import fx

from ..analyze import Analysis, Block
from ..config import FlextronConfig
from ..elastic import layout as L
from ..elastic.compensation import Compensation, LowRankDelta
from ..elastic.model import width_nodes
from ..elastic.ops import ElasticRegion, WeightSlice
from ..elastic.widths import candidates, width_rule
from .scores import Stats

COMP_PREFIX = "flextron_comp_"
DELTA = "flextron_delta"
RIDGE = 1e-3  # of the mean of the kept units' second moments


class Table(NamedTuple):
    """A block's compensation: `bias` [K - 1, out features], one row per candidate below
    the full width; `factors`, with a rank, one (U [out, r], V [kept, r]) per candidate."""

    bias: torch.Tensor
    factors: tuple = ()


def compensated_kinds(config: FlextronConfig) -> tuple[str, ...]:
    """The block kinds that `config.compensate` names."""
    return {"none": (), "mlp": ("mlp",), "attention": ("attention",),
            "all": ("mlp", "attention")}[config.compensate]


def compensation_tables(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block],
                        stats: dict[str, Stats], orders: dict, config: FlextronConfig
                        ) -> dict[str, Table]:
    """{block: Table}: row k of the bias is the expected output of the units that
    candidate k removes (or, with `config.compensation_rank`, the least-squares bias next
    to a rank-r correction of the kept columns), from the weights as stored now (permuted
    by `orders`), for the blocks of the kinds `config.compensate` names."""
    kinds = compensated_kinds(config)
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
        st = stats[block.name]
        mean = st.mean().to(w.device)
        gram = None
        if config.compensation_rank:
            if st.gram is None:
                raise ValueError(f"compensation_rank needs the 'gram' measure; {block.name} "
                                 "was calibrated without it")
            gram = (st.gram / max(st.count, 1)).to(w.device)
        sel = orders.get(block.name)
        if sel:  # the stored channel p now holds the original channel index[p]
            perm = L.index(lay, sel, groups).to(w.device)
            mean = mean[perm]
            gram = None if gram is None else gram[perm][:, perm]
        rule = width_rule(block, config.head_mode)
        rows, factors = [], []
        for width in cands[:-1]:
            keep = {c: torch.arange(k) for c, k in rule.classes(width).items()}
            kept = L.index(lay, keep, groups).to(w.device)  # in the slice's order
            if gram is None:
                removed = torch.ones(lay[2], dtype=torch.bool, device=w.device)
                removed[kept] = False
                rows.append(w[:, removed] @ mean[removed])
                continue
            bias, u, v = least_squares(w, mean, gram, kept, config.compensation_rank)
            rows.append(bias)
            factors.append((u.to(weight.dtype), v.to(weight.dtype)))
        tables[block.name] = Table(torch.stack(rows).to(weight.dtype), tuple(factors))
    return tables


def least_squares(w: torch.Tensor, mean: torch.Tensor, gram: torch.Tensor,
                  kept: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """(bias [out], U [out, r], V [kept, r]) minimising E ||W h - (W_K + U V^T) h_K - b||^2
    over the calibration tokens, from E[h] (`mean`) and E[h h^T] (`gram`), float64.

    The full-rank fit regresses h on [h_K, 1] (ridge `RIDGE`); its correction D of W_K
    is truncated to rank r where it moves the output most: the SVD of D L, with L L^T
    the covariance of h_K, so that E ||(D - U V^T)(h_K - E h_K)||^2 is least.
    """
    k = len(kept)
    g_kk = gram[kept][:, kept]
    ridge = RIDGE * g_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(k, dtype=w.dtype,
                                                                         device=w.device)
    a = torch.zeros(k + 1, k + 1, dtype=w.dtype, device=w.device)
    a[:k, :k], a[:k, k], a[k, :k], a[k, k] = g_kk + ridge, mean[kept], mean[kept], 1
    c = torch.cat([w @ gram[:, kept], (w @ mean)[:, None]], dim=1)  # E[W h [h_K, 1]^T]
    d = torch.linalg.solve(a, c.t()).t()[:, :k] - w[:, kept]
    cov = g_kk - torch.outer(mean[kept], mean[kept]) + ridge
    chol = torch.linalg.cholesky(cov)
    left, s, right = torch.linalg.svd(d @ chol, full_matrices=False)
    r = min(rank, len(s))
    u = left[:, :r] * s[:r]
    v = torch.linalg.solve_triangular(chol.t(), right[:r].t(), upper=True)  # L^-T V_r
    bias = w @ mean - (w[:, kept] + u @ v.t()) @ mean[kept]
    pad = min(rank, w.shape[0]) - r  # zero columns: every width of a block has one rank
    if pad > 0:                       # (a width with fewer kept units than r has less)
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
        v = torch.cat([v, v.new_zeros(v.shape[0], pad)], dim=1)
    return bias, u, v


def compensate(gm: fx.GraphModule, blocks: list[Block], tables: dict[str, Table]
               ) -> list[str]:
    """Insert `y = flextron_comp_i(out, width)` after the output of every block in
    `tables` and, for a table with factors, a `LowRankDelta` after its output
    projection's weight slice; returns the names of the new modules
    (`flextron_comp_<block index>`)."""
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
        table = tables[block.name]
        out = regions.get(block.name, block.out_proj.node)
        width = widths[block.name]
        cands = gm.get_submodule(width.target).candidates
        name = f"{COMP_PREFIX}{i}"
        gm.add_submodule(name, Compensation(block.name, cands, table.bias, table.factors))
        if table.factors:
            _insert_delta(gm, block, name, cands, regions.get(block.name))
        with graph.inserting_after(out):
            node = graph.call_module(name, (out, width))
        out.replace_all_uses_with(node, delete_user_cb=lambda u, n=node: u is not n)
        node.meta = dict(out.meta)
        node.meta["flextron_block"] = block.name
        made.append(name)
    graph.lint()
    gm.recompile()
    return made


def _insert_delta(gm: fx.GraphModule, block: Block, comp: str, cands: tuple,
                  region: fx.Node | None) -> None:
    """`w = flextron_delta(slice(W_out, width), width, *factors)` where the output
    projection's weight is sliced: inside the block's region (factors become region
    inputs) or, for a block without one, in `gm` itself."""
    mod = gm.get_submodule(comp)
    target = block.out_proj.weight
    owner = gm if region is None else gm.get_submodule(region.target).ref
    with gm.graph.inserting_before(region if region is not None else block.out_proj.node):
        factors = [gm.graph.get_attr(f"{comp}.{uv}.{k}")
                   for k in range(len(mod.u)) for uv in ("u", "v")]
    if region is None:
        source = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
        inputs = factors
    else:
        j = next(j for j, a in enumerate(region.args[2:])
                 if isinstance(a, fx.Node) and a.op == "get_attr" and a.target == target)
        holders = [n for n in owner.graph.nodes if n.op == "placeholder"]
        source = holders[2 + j]
        with owner.graph.inserting_after(holders[-1]):
            inputs = [owner.graph.placeholder(f"p_{f.target.replace('.', '_')}")
                      for f in reversed(factors)][::-1]
        region.args = (*region.args, *factors)
    sliced = next(u for u in source.users if u.op == "call_module" and isinstance(
        owner.get_submodule(u.target), WeightSlice))
    name = DELTA if region is not None else f"{DELTA}_{comp.removeprefix(COMP_PREFIX)}"
    owner.add_submodule(name, LowRankDelta(block.name, cands, block.out_proj.axis))
    with owner.graph.inserting_after(sliced):
        node = owner.graph.call_module(name, (sliced, sliced.args[1], *inputs))
    sliced.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    node.meta = dict(sliced.meta)
    owner.graph.lint()
    owner.recompile()


def compensation_modules(gm: fx.GraphModule) -> dict[str, Compensation]:
    """Module name -> Compensation, for every compensation node of `gm`."""
    return {n: m for n, m in gm.named_children() if isinstance(m, Compensation)}
