"""Router modules: graph nodes that turn a budget T (and a hidden state) into block widths.

    flextron_budget   = self.flextron_budget()                         # BudgetSource: T
    flextron_router_i = self.flextron_router_i(budget, ids)            # static (Eq. 9)
    flextron_router_i = self.flextron_router_i(budget, h_i, ids)       # dynamic (Eq. 11)

A router's output replaces the block's `WidthSource` node, so it is the block's width: an
int candidate width (static router, one budget) or a [batch, seq] tensor of candidate
indices (dynamic router; a static router given one budget per sequence), which the
elastic ops run in routed mode. `ids` (the graph's first input) only gives batch and
sequence sizes.

Training (`sampling = True`): each router draws a straight-through Gumbel-softmax sample
per decision (forward: one-hot, gradient: the soft sample) from `generator`, and keeps
`record = (probs, sample)` for the latency loss (Eq. 8) and the surrogate (Eq. 10). The
backbone gets no gradient from routers (widths are integers) and routers none through
the backbone (hidden states are detached).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WidthError


class BudgetSource(nn.Module):
    """The budget T as a graph node: a fraction of the full model's cost, one float for the
    batch or a [batch] tensor (one budget per sequence). `set_budget` changes it.

    `calibration` ({"inputs": budgets the routers read, "costs": the token-mean cost they
    spent there}, `calibrate_budget`) makes `set_budget(T)` give dynamic routers the input
    at which they spent T on calibration text, instead of T itself."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.value: float | torch.Tensor = value
        self.calibration: dict | None = None

    def router_input(self, budget: float | torch.Tensor) -> float | torch.Tensor:
        """The value the routers read for budget T: T itself, or with a calibration the
        largest calibrated input whose cost was at most T (so on the calibration text the
        routers spend at most T; below the cheapest calibrated cost, the smallest input,
        with a warning that they will spend more than T)."""
        if self.calibration is None:
            return budget
        inputs = np.asarray(self.calibration["inputs"], dtype=np.float64)
        costs = np.asarray(self.calibration["costs"], dtype=np.float64)
        b = np.asarray(budget, dtype=np.float64)[..., None]
        fitting = np.where(costs <= b + 1e-12, inputs, -np.inf).max(-1)
        if not np.isfinite(fitting).all():
            warnings.warn(f"these dynamic routers spent at least {costs.min():.3f} of the full "
                          f"cost on their calibration text; a budget of "
                          f"{float(b.min()):.3f} is below that, so they get their smallest "
                          "input and will spend more than the budget", stacklevel=3)
        mapped = np.where(np.isfinite(fitting), fitting, inputs.min())
        if isinstance(budget, torch.Tensor):
            return torch.as_tensor(mapped, dtype=budget.dtype, device=budget.device)
        return float(mapped)

    def forward(self):
        return self.value

    def extra_repr(self) -> str:
        v = self.value
        return f"T={v:g}" if isinstance(v, float) else f"T per sequence {tuple(v.shape)}"


def gumbel_straight_through(logits: torch.Tensor, tau: float,
                            generator: torch.Generator | None) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """(one-hot sample with the soft sample's gradient, soft sample) over the last axis."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32)
    u = u.to(logits.device).clamp_(1e-10, 1 - 1e-7)
    soft = F.softmax((logits.float() - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach(), soft


class Router(nn.Module):
    """Common part of the routers of one block: candidates, sampling switch, record."""

    kind = "router"

    def __init__(self, block: str, candidates: tuple[int, ...]):
        super().__init__()
        self.block, self.candidates = block, tuple(candidates)
        self.sampling = False
        self.full = False  # give the widest candidate, whatever the budget (a reference)
        self.tau = 1.0
        self.generator: torch.Generator | None = None
        self.record: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_index: torch.Tensor | int | None = None

    def extra_repr(self) -> str:
        return f"{self.block}, candidates={list(self.candidates)}"

    def _decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Candidate indices (last axis argmax, or a Gumbel sample when sampling)."""
        if self.sampling:
            sample, _ = gumbel_straight_through(logits, self.tau, self.generator)
            self.record = (F.softmax(logits.float(), -1), sample)
            return sample.detach().argmax(-1)
        self.record = None
        return logits.argmax(-1)


SHARPNESS = 12.0


def _budget_steps(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Hidden unit j = sigmoid(SHARPNESS * (T - c_j)) with thresholds c_j spread over
    [0, 1]: a basis of soft steps in the budget, so the output layer can make a different
    candidate win in every budget range. PyTorch's default init gives units that barely
    change between T = 0.5 and 1: on SmolLM2, 420 steps of training left every op's
    choice the same for every budget (docs/ROUTERS.md)."""
    with torch.no_grad():
        weight.fill_(SHARPNESS)
        bias.copy_(-SHARPNESS * torch.linspace(0, 1, bias.numel()))


def _uniform_start(layer: nn.Linear) -> None:
    """Zero output layer: every candidate equally likely at first, so the first proposals
    cover the whole space the surrogate has to learn."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _budget_tensor(budget, batch: int, device) -> torch.Tensor:
    """T as a [batch] float tensor."""
    if isinstance(budget, torch.Tensor):
        t = budget.to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise WidthError(f"the budget holds {t.numel()} values for a batch of {batch} "
                             "sequences; give one budget, or one per sequence")
        return t
    return torch.full((batch,), float(budget), device=device)


class StaticRouter(Router):
    """Eq. 9: a small MLP from the budget T to logits over the block's candidates; the
    width is the argmax. One budget: an int width. One budget per sequence (or sampling):
    a [batch, seq] tensor of candidate indices, the same along each sequence."""

    kind = "static"

    def __init__(self, block: str, candidates: tuple[int, ...], hidden: int = 64):
        super().__init__(block, candidates)
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Sigmoid(),
                                 nn.Linear(hidden, len(candidates)))
        _budget_steps(self.net[0].weight, self.net[0].bias)
        _uniform_start(self.net[-1])

    def logits(self, budget: torch.Tensor) -> torch.Tensor:
        """[n] budgets -> [n, K] logits."""
        return self.net(budget.reshape(-1, 1).to(self.net[0].weight.dtype))

    def forward(self, budget, ids: torch.Tensor):
        if self.full:
            return self.candidates[-1]
        batch, seq = ids.shape[0], ids.shape[1]
        device = self.net[0].weight.device
        if not self.sampling and not isinstance(budget, torch.Tensor):
            k = int(self.logits(torch.tensor([float(budget)], device=device)).argmax())
            self.record, self.last_index = None, k
            return self.candidates[k]
        index = self._decide(self.logits(_budget_tensor(budget, batch, device)))
        index = index[:, None].expand(batch, seq).contiguous()
        self.last_index = index
        return index


class DynamicRouter(Router):
    """Eq. 11: R(T, h) = sigma(T * W + h W_H^T + b) W_R per token, h the block's input
    (detached), U hidden units; the width of a token is the argmax. The bias b (not in
    the paper's equation) and W start as the static router's soft steps in T, so the
    budget decides from the first step and the token term h W_H^T (PyTorch's default
    init, a perturbation of about +-0.6 on SmolLM2) learns where tokens differ; with the
    paper's W ~ N(0, 1/U) and no b, T moved each unit by about 0.05 over budgets 0.5-1.

    `capacity` (Mixture-of-Nested-Experts style): every batch gets a number of tokens per
    candidate: as many as choose it by argmax, then tokens moved to cheaper candidates
    until the block's mean cost per token is at most its share of the budget; candidates
    from the widest down take the tokens that prefer them most. A batch within its share
    keeps dynamic mode's number of tokens per candidate. Needs `costs` (this block's cost
    per candidate) and `share` (a function budget -> this block's cost limit per token),
    set by `inject_routers`. With `whole_batch` (capacity attention: routed attention computes
    queries, keys and values at the widest width any token uses, so per-token widths save
    little there), the batch gets one width: the widest candidate that costs no more than
    the mean of those counts.
    """

    kind = "dynamic"

    def __init__(self, block: str, candidates: tuple[int, ...], dim: int, units: int = 128,
                 capacity: bool = False):
        super().__init__(block, candidates)
        self.w_budget = nn.Parameter(torch.empty(units))
        self.b_budget = nn.Parameter(torch.empty(units))
        _budget_steps(self.w_budget, self.b_budget)
        self.w_hidden = nn.Linear(dim, units, bias=False)
        self.w_out = nn.Linear(units, len(candidates))
        _uniform_start(self.w_out)
        self.capacity = capacity
        self.costs: torch.Tensor | None = None
        self.share = None
        self.profile: dict | None = None  # calibrate_capacity's targets, if calibrated
        self.whole_batch = False
        self._shift, self._shift_key = None, None  # `_logits_at`'s budget term
        if capacity:
            self.kind = "capacity"

    def start_from(self, static: StaticRouter) -> None:
        """Start as `static`: its H budget units become this router's first H units, its
        output layer reads them, the token term and the other units' outputs start at
        zero, so every token gets the static router's choice for its budget and training
        learns only where tokens should differ. (The paper starts dynamic routers from
        scratch; on SmolLM2, 120 steps from scratch did not reach the static routers'
        loss, docs/ROUTERS.md.)"""
        first, last = static.net[0], static.net[-1]
        hidden = first.out_features
        if static.candidates != self.candidates:
            raise WidthError(f"the static router of {static.block} chooses among "
                             f"{list(static.candidates)}, this one among "
                             f"{list(self.candidates)}")
        if hidden > self.w_budget.numel():
            raise WidthError(f"a static router with {hidden} hidden units does not fit a "
                             f"dynamic router with {self.w_budget.numel()} units; use "
                             f"units >= {hidden}")
        with torch.no_grad():
            self.w_budget[:hidden] = first.weight[:, 0]
            self.b_budget[:hidden] = first.bias
            self.w_hidden.weight.zero_()
            self.w_out.weight.zero_()
            self.w_out.weight[:, :hidden] = last.weight
            self.w_out.bias.copy_(last.bias)

    def logits(self, budget: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """[batch] budgets, [batch, seq, dim] hidden states -> [batch, seq, K] logits."""
        return self.logits_after(budget[:, None, None] * self.w_budget + self.b_budget, h)

    def _logits_at(self, budget: float, h: torch.Tensor) -> torch.Tensor:
        """`logits` for one budget without autograd, in fewer operations (decoding runs a
        router per block and token): the budget's term is kept until the budget or the
        weights change. The same arithmetic, so the same logits."""
        key = (budget, self.w_budget._version, self.b_budget._version, self.w_budget.device)
        if self._shift_key != key:
            self._shift = budget * self.w_budget + self.b_budget
            self._shift_key = key
        return self.logits_after(self._shift, h)

    def logits_after(self, shift: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The logits from the budget's term `shift` (T * W + b: [units], or [batch, 1,
        units]) and `h`."""
        z = shift + F.linear(h.to(self.w_out.weight.dtype), self.w_hidden.weight)
        return F.linear(torch.sigmoid(z), self.w_out.weight, self.w_out.bias)

    def forward(self, budget, h: torch.Tensor, ids: torch.Tensor):
        if self.full:
            return self.candidates[-1]
        batch, seq = ids.shape[0], ids.shape[1]
        h = h.detach()
        if h.numel() != batch * seq * h.shape[-1]:
            raise WidthError(f"the router of {self.block} got a hidden state of shape "
                             f"{tuple(h.shape)} for {batch} x {seq} tokens")
        h = h.reshape(batch, seq, h.shape[-1])
        if isinstance(budget, (int, float)) and not torch.is_grad_enabled():
            logits = self._logits_at(float(budget), h)
        else:
            logits = self.logits(_budget_tensor(budget, batch, h.device), h)
        if self.capacity and not self.sampling:
            index = self._capacity(budget, logits)
            if isinstance(index, int):  # one width for the batch
                self.last_index = index
                return self.candidates[index]
        else:
            index = self._decide(logits)
        self.last_index = index
        return index

    def _capacity(self, budget, logits: torch.Tensor) -> torch.Tensor | int:
        if isinstance(budget, torch.Tensor):
            if budget.numel() != 1 and not bool((budget == budget.reshape(-1)[0]).all()):
                raise WidthError("capacity routing keeps each batch within one budget; "
                                 "give one budget for the batch, not one per sequence")
            budget = float(budget.reshape(-1)[0])
        if self.costs is None or self.share is None:
            raise WidthError(f"the capacity router of {self.block} has no costs; inject "
                             "routers with mode='capacity' and a cost table")
        self.record = None
        probs = F.softmax(logits.detach().float(), -1).reshape(-1, logits.shape[-1])
        chosen = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1])
        costs = self.costs.tolist()
        counts = capacity_counts(chosen.float() / probs.shape[0], costs, probs.shape[0],
                                 self.share(budget))
        if self.whole_batch:
            mean = sum(c * k for c, k in zip(costs, counts)) / probs.shape[0]
            return max((j for j, c in enumerate(costs) if c <= mean * (1 + 1e-9)),
                       key=lambda j: (costs[j], j))
        return assign_by_preference(probs, counts).reshape(logits.shape[:-1])


def capacity_counts(preference: torch.Tensor, costs: list[float], n: int,
                    limit: float) -> list[int]:
    """Tokens per candidate: the batch's `preference` (shares of its tokens), rounded down
    (the rest to the cheapest candidate), then tokens moved to cheaper candidates, most
    expensive first, until the mean cost per token is at most `limit`."""
    counts = [math.floor(float(p) * n) for p in preference]
    cheapest = min(range(len(costs)), key=lambda k: costs[k])
    counts[cheapest] += n - sum(counts)
    budget = limit * n * (1 + 1e-9)
    spent = sum(c * k for c, k in zip(costs, counts))
    while spent > budget:
        used = [k for k in range(len(costs)) if counts[k] and costs[k] > costs[cheapest]]
        if not used:
            break  # every token at the cheapest candidate: the limit is below the minimum
        k = max(used, key=lambda j: (costs[j], j))
        lower = [j for j in range(k) if costs[j] < costs[k]]
        to = max(lower) if lower else cheapest
        move = min(counts[k], math.ceil((spent - budget) / (costs[k] - costs[to]) - 1e-9))
        counts[k] -= move
        counts[to] += move
        spent -= move * (costs[k] - costs[to])
    return counts


def assign_by_preference(probs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[n, K] router probabilities, tokens per candidate -> [n] candidate indices: from the
    widest candidate down, each takes its count of the still-free tokens that prefer it
    most (expert-preferred routing)."""
    n, k = probs.shape
    index = torch.zeros(n, dtype=torch.long, device=probs.device)
    free = torch.ones(n, dtype=torch.bool, device=probs.device)
    order = sorted(range(k), reverse=True)
    for c in order[:-1]:
        if counts[c] == 0:
            continue
        score = probs[:, c].masked_fill(~free, float("-inf"))
        take = score.topk(counts[c]).indices
        index[take] = c
        free[take] = False
    index[free] = order[-1]
    return index


class HiddenTap(nn.Module):
    """Passes the final hidden state through and, while `recording`, keeps it (detached)
    for the dynamic surrogate (paper: Eq. 10 extended with h_N)."""

    def __init__(self):
        super().__init__()
        self.recording = False
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x.detach() if self.recording else None
        return x
