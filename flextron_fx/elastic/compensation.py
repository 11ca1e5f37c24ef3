"""Per-width compensation as graph nodes: `flextron_comp_i(y, width)` and, with a rank,
`flextron_delta(w, width, *factors)` on the output projection's sliced weight.

For each candidate width below the full one, a block adds back the expected output of the
units it removed (passes/compensate.py measures it). The node sits right after the
block's output (its `ElasticRegion`, or its output projection when the block could not be
fused) and reads the block's width like every other elastic node: an int (static: one row
for the whole batch) or a [batch, seq] tensor of candidate indices (routed: a row per
token). At full width it returns `y` itself, so the full model is unchanged bit for bit.

With `compensation_rank` r > 0, each width below the full one also corrects the kept
columns of the block's output projection: W[:, kept] + U_k V_k^T, U_k [out, r] and
V_k [kept, r] fitted by least squares (passes/compensate.py). The factors are parameters
of the `Compensation` module (saved and trained with its bias); a `LowRankDelta` node
right after the output projection's `WeightSlice` adds them, inside the block's region,
so static widths, per-token groups and `freeze` (which folds it into the sliced weight)
all see the corrected weight.
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

    def __init__(self, block: str, candidates: tuple[int, ...], bias: torch.Tensor,
                 factors: tuple = ()):
        super().__init__()
        self.block, self.candidates = block, tuple(candidates)
        if bias.dim() != 2 or bias.shape[0] != len(self.candidates) - 1:
            raise ValueError(f"compensation of {block}: expected {len(self.candidates) - 1} "
                             f"rows (one per candidate below the full width), got "
                             f"{tuple(bias.shape)}")
        self.bias = nn.Parameter(bias.detach().clone())
        if factors and len(factors) != len(self.candidates) - 1:
            raise ValueError(f"compensation of {block}: expected {len(self.candidates) - 1} "
                             f"(U, V) pairs, got {len(factors)}")

        def own(t: torch.Tensor) -> nn.Parameter:  # contiguous: optimiser state saves as is
            return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))

        self.u = nn.ParameterList([own(u) for u, _ in factors])
        self.v = nn.ParameterList([own(v) for _, v in factors])

    @property
    def rank(self) -> int:
        """The rank of the weight correction (0: bias only)."""
        return self.u[0].shape[1] if len(self.u) else 0

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


class LowRankDelta(nn.Module):
    """`forward(w, width, *factors)`: the sliced output-projection weight `w` plus
    U_k V_k^T at candidate k below the full width (`w` itself at full width).

    `factors` are the `Compensation` module's u[0], v[0], u[1], v[1], ... (graph inputs,
    so they stay parameters of that module). `axis` is the sliced axis of the weight
    (1 for [out, in], 0 for a transposed [in, out] one). Without autograd the corrected
    weight is kept per width and rebuilt when any input changes (another tensor, or the
    same one changed in place); it holds the tensors it was built from, so a freed one's
    memory cannot come back under the same address.
    """

    def __init__(self, block: str, candidates: tuple[int, ...], axis: int):
        super().__init__()
        self.block, self.candidates, self.axis = block, tuple(candidates), axis
        self._cache: dict[int, tuple] = {}

    def extra_repr(self) -> str:
        return f"{self.block}, candidates={list(self.candidates)}, axis={self.axis}"

    def forward(self, w: torch.Tensor, width, *factors: torch.Tensor) -> torch.Tensor:
        if isinstance(width, torch.Tensor):
            raise WidthError(f"{self.block}: a low-rank compensation needs one width per "
                             "call (per-token widths run each group at its own width)")
        if width == self.candidates[-1]:
            return w
        if width not in self.candidates:
            raise WidthError(f"width {width!r} of {self.block} is not a candidate; allowed: "
                             f"{list(self.candidates)}")
        k = self.candidates.index(width)
        u, v = factors[2 * k], factors[2 * k + 1]
        if torch.is_grad_enabled() and (w.requires_grad or u.requires_grad
                                        or v.requires_grad):
            return w + self._delta(u, v)
        try:
            key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride())
                        for t in (w, u, v))
        except RuntimeError:  # inference tensors keep no version: nothing safe to cache
            return w + self._delta(u, v)
        hit = self._cache.get(width)
        if hit is None or hit[0] != key:
            hit = self._cache[width] = (key, (w, u, v), w + self._delta(u, v))
        return hit[2]

    def _delta(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d = u @ v.t()  # [out, kept]
        return d if self.axis == 1 else d.t()

    def __getstate__(self):  # the cache is rebuilt on demand, never copied or pickled
        return {**super().__getstate__(), "_cache": {}}
