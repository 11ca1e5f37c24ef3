"""Per-width bias compensation as a graph node: `flextron_comp_i(y, width)`.

For each candidate width below the full one, a block adds back the expected output of the
units it removed (passes/compensate.py measures it). The node sits right after the
block's output (its `ElasticRegion`, or its output projection when the block could not be
fused) and reads the block's width like every other elastic node: an int (static: one row
for the whole batch) or a [batch, seq] tensor of candidate indices (routed: a row per
token). At full width it returns `y` itself, so the full model is unchanged bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import WidthError


class Compensation(nn.Module):
    """`forward(y, width)`: y plus the compensation row of `width`.

    `bias` is [K - 1, out features]: one row per candidate below the full width (in
    `candidates` order). It is a parameter, so elastic training tunes it (trained only
    where that width runs); `freeze` turns the row of a static width into a constant add.
    """

    def __init__(self, block: str, candidates: tuple[int, ...], bias: torch.Tensor):
        super().__init__()
        self.block, self.candidates = block, tuple(candidates)
        if bias.dim() != 2 or bias.shape[0] != len(self.candidates) - 1:
            raise ValueError(f"compensation of {block}: expected {len(self.candidates) - 1} "
                             f"rows (one per candidate below the full width), got "
                             f"{tuple(bias.shape)}")
        self.bias = nn.Parameter(bias.detach().clone())

    def extra_repr(self) -> str:
        return f"{self.block}, candidates={list(self.candidates)}"

    def row(self, width: int) -> torch.Tensor | None:
        """The bias added at static `width` (None at full width)."""
        if width == self.candidates[-1]:
            return None
        if width not in self.candidates:
            raise WidthError(f"width {width!r} of {self.block} is not a candidate; allowed: "
                             f"{list(self.candidates)}")
        return self.bias[self.candidates.index(width)]

    def forward(self, y: torch.Tensor, width) -> torch.Tensor:
        if isinstance(width, torch.Tensor):
            full = self.bias.new_zeros(1, self.bias.shape[1])
            rows = torch.cat([self.bias, full]).index_select(0, width.reshape(-1))
            return y + rows.reshape(y.shape)
        row = self.row(width)
        return y if row is None else y + row
