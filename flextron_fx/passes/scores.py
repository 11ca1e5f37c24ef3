"""Importance scores: a registry of ways to rank MLP neurons and attention heads.

Every score reads statistics that `rank` measured at the input of a block's output
projection (down / o) over the calibration tokens, plus that projection's weight. Channel
c of that input is neuron c of an MLP, or one channel of one head's output for attention.

    name           kinds         what it sums over calibration tokens t
    activation     mlp           |h_c|                       (Eq. 4 on the neuron's output)
    act_x_norm     mlp           |h_c| * ||W[:, c]||_2        (the neuron's output after W)
    wanda          mlp           ||h_c||_2 over t * sum_i |W[i, c]|   (activation-aware weight)
    fluctuation    mlp, heads    Var_t(h_c) * ||W[:, c]||^2   (FLAP: variance of the unit's
                                                               output; heads sum channels)
    taylor         mlp, heads    |h_c * dL/dh_c|; a head: |sum_{c in head} h_c dL/dh_c|
                                                              (first-order Taylor of removal)
    contribution   heads         ||W[:, head] h_head||_2      (the head's output after W)
    output_l1      heads         sum_{c in head} |h_c|        (Eq. 3 read literally)

Adding a score is one decorated function: `@score("name", kinds=..., needs=...)`.
`docs/RESULTS.md` ("Zero-shot quality") has the measured comparison on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# What an observer can measure (rank.py). Each score names the ones it needs.
MEASURES = ("abs", "sum", "sq", "taylor", "contribution", "gram")


@dataclass
class Stats:
    """Sums over calibration tokens at the input of one block's output projection.

    Channel vectors are float64, in the stored (original) channel order. `heads` holds
    head-level sums ("contribution", "taylor") shaped [groups * per_group]; `head_of`
    maps every channel to its head (None for an MLP); `gram` the sum of h h^T, [in, in]
    (measure "gram", for least-squares compensation).
    """

    count: int
    abs: torch.Tensor
    sum: torch.Tensor
    sq: torch.Tensor
    taylor: torch.Tensor | None = None
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    head_of: torch.Tensor | None = None
    shape: tuple[int, int] = (1, 1)
    gram: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """Mean of every channel over the calibration tokens (E[h_c])."""
        return self.sum / max(self.count, 1)


@dataclass(frozen=True)
class Score:
    """A registered score: `channel` scores channels (for heads, summed per head unless
    `head` scores heads itself); both take (stats, weight [out, in] float64)."""

    name: str
    kinds: tuple[str, ...]
    needs: frozenset[str]
    channel: Callable | None = None
    head: Callable | None = None


SCORES: dict[str, Score] = {}


def score(name: str, *, kinds: tuple[str, ...], needs: tuple[str, ...], heads: bool = False):
    """Register the decorated `fn(stats, weight)` as score `name`: a channel score, or with
    `heads=True` a head score (a name may have one of each)."""
    def wrap(fn):
        old = SCORES.get(name)
        kw = {"head" if heads else "channel": fn}
        if old is not None:
            kw = {"channel": old.channel, "head": old.head, **kw}
            kinds_ = tuple(dict.fromkeys(old.kinds + tuple(kinds)))
            SCORES[name] = Score(name, kinds_, old.needs | frozenset(needs), **kw)
        else:
            SCORES[name] = Score(name, tuple(kinds), frozenset(needs), **kw)
        return fn
    return wrap


def names(kind: str) -> tuple[str, ...]:
    """Scores that rank blocks of `kind` ("mlp" or "attention")."""
    return tuple(n for n, s in SCORES.items() if kind in s.kinds)


def check(name: str, kind: str) -> None:
    """ValueError naming the allowed scores unless `name` ranks blocks of `kind`."""
    if name not in SCORES or kind not in SCORES[name].kinds:
        what = "MLP neurons" if kind == "mlp" else "attention heads"
        raise ValueError(f"{name!r} is not a score for {what}; choose one of "
                         f"{list(names(kind))}")


def needs(*score_names: str) -> set[str]:
    """The measures `rank` must take for these scores."""
    return set().union(*(SCORES[n].needs for n in score_names if n in SCORES))


def evaluate(name: str, kind: str, stats: Stats, weight: torch.Tensor) -> torch.Tensor:
    """Score of every neuron ([hidden]) or head ([groups, per_group]) of one block.

    `weight` is the output projection's weight as [out, in] (in = the scored channels).
    """
    check(name, kind)
    s = SCORES[name]
    w = weight.detach().double().cpu()
    if kind == "mlp":
        return s.channel(stats, w).float()
    if s.head is not None:
        values = s.head(stats, w)
    else:
        values = torch.zeros(stats.shape[0] * stats.shape[1], dtype=torch.float64)
        values.index_add_(0, stats.head_of, s.channel(stats, w).double())
    return values.reshape(stats.shape).float()


@score("activation", kinds=("mlp",), needs=("abs",))
def _activation(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.abs


@score("act_x_norm", kinds=("mlp",), needs=("abs",))
def _act_x_norm(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.abs * w.norm(dim=0)


@score("wanda", kinds=("mlp",), needs=("sq",))
def _wanda(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.sq.sqrt() * w.abs().sum(0)


@score("fluctuation", kinds=("mlp", "attention"), needs=("sum", "sq"))
def _fluctuation(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    n = max(stats.count, 1)
    var = (stats.sq / n - (stats.sum / n) ** 2).clamp(min=0)
    return var * w.pow(2).sum(0)


@score("taylor", kinds=("mlp",), needs=("taylor",))
def _taylor(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.taylor


@score("taylor", kinds=("attention",), needs=("taylor",), heads=True)
def _taylor_heads(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.heads["taylor"]


@score("contribution", kinds=("attention",), needs=("contribution",), heads=True)
def _contribution(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.heads["contribution"]


@score("output_l1", kinds=("attention",), needs=("abs",))
def _output_l1(stats: Stats, w: torch.Tensor) -> torch.Tensor:
    return stats.abs
