"""Per-op, per-candidate costs that routers are trained against (paper Eq. 7-8).

A `CostTable` holds, for every elastic op, one cost per candidate (smallest first) and a
fixed part, so that the cost of a sub-network is `fixed + sum_i costs[i][k_i]`. That sum is
exact for the profiler's three cost models: latency is the paper's sum of per-op table
entries, parameters and memory (weights plus key/value cache) add up per op as well.
Budgets are fractions of the full model's cost (every op at its widest candidate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..elastic.model import ElasticModel
from ..errors import ProfileError

METRICS = ("latency", "params", "memory")
UNITS = {"latency": "ms", "params": "parameters", "memory": "bytes"}


@dataclass(frozen=True)
class CostTable:
    """Cost of every candidate of every op: `costs[op][k]`, plus `fixed`.

    Example:
        >>> t = CostTable("latency", {"a": [1.0, 2.0], "b": [1.0, 3.0]}, fixed=1.0)
        >>> t.full, t.minimum, t.total({"a": 0, "b": 1})
        (6.0, 3.0, 5.0)
    """

    metric: str
    costs: dict[str, list[float]]
    fixed: float = 0.0
    unit: str = field(default="")

    def __post_init__(self):
        if not self.costs:
            raise ProfileError("a cost table needs at least one op")
        for name, row in self.costs.items():
            if not row or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in row):
                raise ProfileError(f"the costs of {name!r} must be finite numbers, one per "
                                   f"candidate, got {row!r}")
        if not self.full > 0:
            raise ProfileError(f"the full model's cost must be positive, got {self.full}")

    @property
    def full(self) -> float:
        return self.fixed + sum(row[-1] for row in self.costs.values())

    @property
    def minimum(self) -> float:
        """The smallest cost any sub-network has (every op at its cheapest candidate)."""
        return self.fixed + sum(min(row) for row in self.costs.values())

    def budget_range(self, low: float = 0.4) -> tuple[float, float]:
        """Budgets to train routers on when none are given: from `low` of the full cost, or
        from the cheapest sub-network's fraction (rounded up to 0.01) where that is more,
        up to the full model.

        Example:
            >>> CostTable("latency", {"a": [1.0, 2.0]}, fixed=2.0).budget_range()
            (0.75, 1.0)
        """
        cheapest = math.ceil(round(100 * self.minimum / self.full, 9)) / 100
        return max(low, cheapest), 1.0

    def total(self, choice: dict[str, int]) -> float:
        """Cost of the sub-network with candidate index `choice[op]` for every op."""
        return self.fixed + sum(self.costs[n][k] for n, k in choice.items())

    def fraction(self, choice: dict[str, int]) -> float:
        return self.total(choice) / self.full

    def describe(self, value: float) -> str:
        """`value` in the table's units, for messages."""
        unit = self.unit or UNITS.get(self.metric, "")
        return f"{value:,.4g} {unit}".strip()

    def check(self, em: ElasticModel) -> None:
        """Every op of `em` has one cost per candidate (`ProfileError` naming the first
        mismatch)."""
        missing = [n for n in em.ops if n not in self.costs]
        extra = [n for n in self.costs if n not in em.ops]
        if missing or extra:
            raise ProfileError(f"the cost table does not fit the model: ops without costs "
                               f"{missing[:3]}, costs of unknown ops {extra[:3]}; give one "
                               "list of costs per elastic op (ElasticModel.ops)")
        for name, op in em.ops.items():
            if len(self.costs[name]) != len(op.candidates):
                raise ProfileError(f"{name} has {len(op.candidates)} candidates "
                                   f"{list(op.candidates)} but {len(self.costs[name])} costs; "
                                   "give one cost per candidate, smallest width first")

    def tensor(self, name: str, device=None) -> torch.Tensor:
        return torch.tensor(self.costs[name], dtype=torch.float32, device=device)

    # ---- building and saving ----------------------------------------------------------
    @classmethod
    def from_cost_model(cls, cost, metric: str = "latency") -> CostTable:
        """From a profiler `CostModel`: per-op costs as differences to the full model, which
        is exact because each metric is a sum over ops."""
        if metric not in METRICS:
            raise ProfileError(f"unknown metric {metric!r}; use one of {list(METRICS)}")
        em = cost.em
        full_w = em.full_widths()
        full = cost.cost(metric, full_w)
        rows = {}
        for name, op in em.ops.items():
            rows[name] = [cost.cost(metric, dict(full_w, **{name: c})) - full
                          for c in op.candidates]
            low = min(rows[name])
            rows[name] = [c - low for c in rows[name]]
        fixed = full - sum(row[-1] for row in rows.values())
        return cls(metric, rows, fixed, UNITS[metric])

    @classmethod
    def coerce(cls, em: ElasticModel, cost, metric: str = "latency") -> CostTable:
        """A `CostTable`, a profiler `CostModel`, or a dict {op: [cost per candidate]}
        (a synthetic table, fixed part 0) -> a `CostTable` checked against `em`."""
        if isinstance(cost, CostTable):
            table = cost
        elif isinstance(cost, dict):
            table = cls(metric, {k: [float(c) for c in v] for k, v in cost.items()})
        elif hasattr(cost, "cost") and hasattr(cost, "em"):
            table = cls.from_cost_model(cost, metric)
        else:
            raise ProfileError("costs must be a CostTable, a profiler CostModel or a dict "
                               f"{{op name: [cost per candidate]}}, got {type(cost).__name__}")
        table.check(em)
        return table

    def to_dict(self) -> dict:
        return {"metric": self.metric, "costs": self.costs, "fixed": self.fixed,
                "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> CostTable:
        return cls(d["metric"], {k: list(v) for k, v in d["costs"].items()}, d["fixed"],
                   d.get("unit", ""))

    # ---- budgets ----------------------------------------------------------------------
    def budget_fraction(self, budget) -> float:
        """A budget as a fraction of the full cost: a float in (0, 1], or a profiler
        `Budget` (relative, or absolute in the table's units) of this table's metric."""
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            value = float(budget)
        elif hasattr(budget, "metric") and hasattr(budget, "relative"):
            if budget.metric != self.metric:
                raise ProfileError(f"a {budget.metric} budget cannot be met with routers "
                                   f"trained on {self.metric} costs; give a {self.metric} "
                                   "budget, or train routers with --metric "
                                   f"{budget.metric}")
            value = budget.value if budget.relative else budget.value / self.full
        else:
            raise ProfileError(f"a budget is a fraction in (0, 1] or a Budget "
                               f"('latency=0.6'), got {budget!r}")
        if not value > 0:
            raise ProfileError(f"a budget must be positive, got {value}")
        return value

    def refuse_below_minimum(self, fraction: float) -> None:
        """`ProfileError` with the smallest achievable cost when no sub-network meets
        `fraction` of the full cost."""
        if fraction * self.full < self.minimum * (1 - 1e-9):
            low = self.minimum
            raise ProfileError(
                f"no sub-network meets {self.metric} <= {fraction:.4g} of the full model "
                f"({self.describe(fraction * self.full)}): the smallest achievable is "
                f"{low / self.full:.4g} of full ({self.describe(low)}, every op at its "
                "cheapest candidate); ask for at least that much")
