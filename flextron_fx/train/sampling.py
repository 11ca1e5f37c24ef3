"""Which sub-networks a training step visits (paper Eq. 5: the full model plus k samples).

A sampler maps a `torch.Generator` to one width per elastic op. Every rank of a
distributed run seeds its generator the same way, so all ranks train the same
sub-networks at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..elastic.model import ElasticModel
from ..errors import FlextronError

Widths = dict[str, int]


def _pick(seq, gen: torch.Generator):
    return seq[int(torch.randint(len(seq), (1,), generator=gen))]


def _varies(op, kind: str | None) -> bool:
    return kind is None or op.kind == kind


def uniform(em: ElasticModel, kind: str | None = None) -> Callable[[torch.Generator], Widths]:
    """The paper's sampler: an independent random candidate for every op of every layer.
    With `kind` ("mlp" or "attention") only ops of that kind vary; the others stay full."""
    def sample(gen: torch.Generator) -> Widths:
        return {name: _pick(op.candidates, gen) if _varies(op, kind) else op.full
                for name, op in em.ops.items()}
    return sample


def matformer(em: ElasticModel, kind: str | None = None,
              budget_range: tuple[float, float] | None = None
              ) -> Callable[[torch.Generator, int], list[Widths]]:
    """MatFormer's sampler: one granularity for the whole network, the i-th smallest
    candidate of every op, for i below full. The k samples of a step are distinct
    granularities (a random order, started afresh after every granularity has been used),
    so no pass repeats another on the same batch. With `budget_range` only granularities
    whose non-embedding parameters are within it (as fractions of the full model's) are
    drawn."""
    top = min(len(op.candidates) for op in em.ops.values() if _varies(op, kind))
    if top < 2:
        raise FlextronError("the matformer sampler needs at least two candidate widths per op")

    def at(i: int) -> Widths:
        return {name: op.candidates[min(i, len(op.candidates) - 1)] if _varies(op, kind)
                else op.full for name, op in em.ops.items()}

    grains = list(range(top - 1))
    if budget_range is not None:
        low, high = _checked(budget_range)
        full = em.num_params(em.full_widths(), non_embedding=True)
        fractions = {i: em.num_params(at(i), non_embedding=True) / full for i in grains}
        grains = [i for i in grains if low <= fractions[i] <= high]
        if not grains:
            raise FlextronError(
                f"no granularity below full has its parameters within [{low}, {high}] of the "
                f"full model's (they have {', '.join(f'{f:.3f}' for f in fractions.values())}); "
                "widen --budget-range")

    def sample(gen: torch.Generator, k: int) -> list[Widths]:
        order: list[int] = []
        while len(order) < k:
            order += [grains[j] for j in torch.randperm(len(grains), generator=gen).tolist()]
        return [at(i) for i in order[:k]]
    return sample


def _checked(budget_range: tuple[float, float]) -> tuple[float, float]:
    low, high = budget_range
    if not 0.0 < low <= high <= 1.0:
        raise FlextronError(f"a budget range is 0 < low <= high <= 1, got [{low}, {high}]")
    return low, high


def smallest(em: ElasticModel, kind: str | None = None) -> Widths:
    return {name: op.candidates[0] if _varies(op, kind) else op.full
            for name, op in em.ops.items()}


def sandwich(em: ElasticModel, kind: str | None = None
             ) -> Callable[[torch.Generator, int], list[Widths]]:
    """The smallest network as the first sample of each step, uniform ones after it."""
    draw = uniform(em, kind)

    def sample(gen: torch.Generator, k: int) -> list[Widths]:
        return [smallest(em, kind)] + [draw(gen) for _ in range(k - 1)] if k else []
    return sample


def budget(em: ElasticModel, low: float, high: float, kind: str | None = None,
           tries: int = 200) -> Callable[[torch.Generator], Widths]:
    """Uniform samples kept only if their non-embedding parameters are within [low, high]
    of the full model's (rejection sampling; the closest of `tries` draws otherwise)."""
    _checked((low, high))
    full = em.num_params(em.full_widths(), non_embedding=True)
    draw = uniform(em, kind)

    def sample(gen: torch.Generator) -> Widths:
        best, gap = None, float("inf")
        for _ in range(tries):
            w = draw(gen)
            f = em.num_params(w, non_embedding=True) / full
            d = max(low - f, f - high, 0.0)
            if d == 0.0:
                return w
            if d < gap:
                best, gap = w, d
        return best
    return sample


SAMPLERS = ("uniform", "sandwich", "budget", "matformer")
DEFAULT_BUDGET = (0.4, 0.8)
KINDS = (None, "mlp", "attention")


def make_sampler(em: ElasticModel, name: str, budget_range: tuple[float, float] | None = None,
                 kind: str | None = None) -> Callable[[torch.Generator, int], list[Widths]]:
    """A function (generator, k) -> the k sub-networks (widths) of one training step.
    `budget_range` is the parameter-fraction range of the budget sampler (default 0.4-0.8)
    and, when given, limits the matformer sampler's granularities to it. `kind` limits the
    sampled ops to one kind ("mlp" or "attention"); the others stay at full width."""
    if kind not in KINDS:
        raise FlextronError(f"kind must be 'mlp', 'attention' or None (both), got {kind!r}")
    if name == "sandwich":
        return sandwich(em, kind)
    if name == "matformer":
        return matformer(em, kind, budget_range)
    if name == "uniform":
        draw = uniform(em, kind)
    elif name == "budget":
        draw = budget(em, *(budget_range or DEFAULT_BUDGET), kind=kind)
    else:
        raise FlextronError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return lambda gen, k: [draw(gen) for _ in range(k)]
