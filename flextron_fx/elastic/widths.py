"""What a block's width means: its candidates, and the kept size of each axis class.

An op's width counts MLP neurons or attention query heads. Attention shrinks along one
axis class chosen by the head mode (query heads inside each KV group, or whole KV groups);
`WidthRule` is the one place that turns a width into kept sizes of axis classes, for the
elastic graph, the parameter count, the profiler and export alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analyze import Block
from ..config import FlextronConfig


@dataclass(frozen=True)
class WidthRule:
    """How an op's width sets the kept size of its shrinking axis class.

    `cls` is the class that shrinks (None: nothing does), `unit` the op-width units per
    index of it (query heads per KV group when whole groups go), `size` its full size.
    """

    cls: int | None
    unit: int
    size: int

    def classes(self, width: int) -> dict[int, int]:
        """{axis class: kept size} at `width` (empty at full width)."""
        if self.cls is None or width == self.size * self.unit:
            return {}
        return {self.cls: width // self.unit}


def width_rule(block: Block, head_mode: str) -> WidthRule:
    """The rule of `block` under `head_mode` ("query" or "group")."""
    if block.kind == "mlp":
        return WidthRule(block.classes["neurons"], 1, block.sizes["hidden"])
    g, r = block.classes.get("groups"), block.classes.get("per_group")
    G = block.sizes["kv_heads"] if g is not None else 1
    R = block.sizes["heads"] // G
    if head_mode == "query":
        use_per_group = r is not None and R > 1
    else:
        use_per_group = not (g is not None and G > 1)
    key, size, unit = ("per_group", R, G) if use_per_group else ("groups", G, R)
    return WidthRule(block.classes.get(key), unit, size)


def mlp_candidates(hidden: int, k: int, multiple: int) -> tuple[int, ...]:
    """K nested MLP widths, rounded to a multiple that still leaves K distinct values."""
    step = max(1, min(multiple, hidden))
    while step > 1 and hidden // step < k:
        step //= 2
    out = {hidden}
    for i in range(1, k):
        out.add(min(hidden, max(step, round(hidden * i / k / step) * step)))
    return tuple(sorted(out))


def head_candidates(axis: int, k: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(axis * i / k)) for i in range(1, k + 1)}))


def candidates(block: Block, config: FlextronConfig) -> tuple[int, ...]:
    """The nested widths of `block`, smallest first; the last is the full width."""
    if block.kind == "mlp":
        return mlp_candidates(block.full_width, config.num_candidates, config.mlp_multiple)
    rule = width_rule(block, config.head_mode)
    return tuple(c * rule.unit for c in head_candidates(rule.size, config.num_candidates))
