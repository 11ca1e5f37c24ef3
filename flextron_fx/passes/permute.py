"""Permute: store neurons and heads in decreasing order of importance.

MLP neurons are sorted independently in each block. Attention keeps grouped-query
structure: KV groups are sorted as units (by the summed importance of their query heads),
and query heads are sorted inside their own group, so every query head still reads the
K/V head it was trained with.

Requires: importance scores from rank() for these blocks; the graph not yet elasticized.
Ensures: the model's outputs are unchanged (a permutation of a hidden axis, applied to
both the producing and the consuming weights).
"""

from __future__ import annotations

import torch
from torch import fx

from ..analyze import Analysis, Block
from ..elastic import layout as L


def sort_order(block: Block, score: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Selections (analysis classes -> index order) that sort `block` by `score`."""
    if block.kind == "mlp":
        return {block.classes["neurons"]: _desc(score["neurons"])}
    heads = score["heads"]  # [groups, per_group]
    sel = {}
    if "groups" in block.classes:
        sel[block.classes["groups"]] = _desc(heads.sum(1))
    if "per_group" in block.classes:
        sel[block.classes["per_group"]] = torch.stack([_desc(row) for row in heads])
    return sel


def _desc(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x, descending=True, stable=True).indices


def permute(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block],
            orders: dict[str, dict[int, torch.Tensor]]) -> None:
    A = analysis.atoms
    for block in blocks:
        sel = orders.get(block.name)
        if not sel:
            continue
        groups = block.classes.get("groups")
        for proj in block.projections:
            idx = L.index(L.sized(A, proj.layout), sel, groups)
            _reorder(gm, proj.weight, proj.axis, idx)
            if proj.bias is not None:
                _reorder(gm, proj.bias, 0, idx)


def _reorder(gm, target: str, axis: int, idx: torch.Tensor) -> None:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    with torch.no_grad():
        obj.copy_(obj.index_select(axis, idx.to(obj.device)))
