"""Cost models of sub-networks behind one interface: latency, parameters, memory.

* latency (ms): the paper's sum (Eq. 6-8) of per-op table entries at the chosen widths,
  plus the table's fixed parts (embedding, norms, output head, glue); see table.py;
* parameters: exact, `ElasticModel.num_params` (optionally without embedding tables);
* memory (bytes): weights at a dtype plus the key/value cache for a batch and context
  length: 2 (K and V) x batch x context x kept KV heads x head dim x bytes, summed over
  attention ops. Activations and allocator slack are not counted.

A `Budget` is a limit on one of them, either a fraction of the full model or absolute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..elastic.model import ElasticModel
from ..errors import ProfileError
from .table import LatencyTable

METRICS = ("latency", "params", "memory")
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if dtype not in _BYTES:
        raise ProfileError(f"unknown dtype {dtype!r}; known: {sorted(_BYTES)} or a torch.dtype")
    return _BYTES[dtype]


class CostModel:
    """Predicted cost of any sub-network of `em`.

    Example:
        >>> cost = CostModel(em, LatencyTable.load("lut.json"))          # doctest: +SKIP
        >>> cost.latency(0.5), cost.params(0.5, non_embedding=True)       # doctest: +SKIP
        >>> cost.memory(0.5, batch=1, context=2048, dtype="bfloat16")     # doctest: +SKIP
    """

    def __init__(self, em: ElasticModel, table: LatencyTable | None = None, *,
                 shape=None, batch: int = 1, context: int = 2048, dtype="float32"):
        """`shape`, `batch`, `context` and `dtype` are the defaults the metrics use."""
        if table is not None:
            table.check_model(em)
        self.em, self.table, self.shape = em, table, shape
        self.batch, self.context, self.dtype = batch, context, dtype
        self._ops = {k: [n for n, op in em.ops.items() if op.kind == k]
                     for k in ("mlp", "attention")}

    def widths(self, widths=None) -> dict[str, int]:
        """Per-op widths from anything `ElasticModel.set_widths` takes (default: full)."""
        return self.em.static_widths(widths if widths is not None else 1.0)

    # ---- latency ----------------------------------------------------------------------
    def latency_parts(self, widths=None, shape=None) -> dict[str, float]:
        """Predicted ms split into fixed parts and the sums over MLP and attention ops."""
        if self.table is None:
            raise ProfileError("this CostModel has no latency table; pass one: "
                               "CostModel(em, LatencyTable.load(path))")
        shape = shape if shape is not None else self.shape
        w = self.widths(widths)
        parts = dict(self.table.fixed_ms(shape))
        for kind, names in self._ops.items():
            if names:
                parts[kind] = sum(self.table.op_latency(n, w[n], shape) for n in names)
        return parts

    def latency(self, widths=None, shape=None) -> float:
        """Predicted latency in ms of the sub-network at `widths` for `shape` (table's mode)."""
        return sum(self.latency_parts(widths, shape).values())

    # ---- parameters and memory ----------------------------------------------------------
    def params(self, widths=None, *, non_embedding: bool = False) -> int:
        """Exact parameter count (that of `em.materialize(widths)`)."""
        return self.em.num_params(self.widths(widths), non_embedding=non_embedding)

    def weight_bytes(self, widths=None, dtype=None) -> int:
        return self.params(widths) * dtype_bytes(dtype or self.dtype)

    def kv_cache_bytes(self, widths=None, batch=None, context=None, dtype=None) -> int:
        """Bytes of the key/value cache at `batch` sequences of `context` tokens."""
        w = self.widths(widths)
        per_token = 0
        for name in self._ops["attention"]:
            sizes = self.em.ops[name].sizes
            per_token += 2 * self.em.kv_heads(name, w[name]) * sizes["head_dim"]
        batch = self.batch if batch is None else batch
        context = self.context if context is None else context
        return per_token * batch * context * dtype_bytes(dtype or self.dtype)

    def memory(self, widths=None, batch=None, context=None, dtype=None) -> int:
        """Weights plus KV cache, in bytes."""
        return self.weight_bytes(widths, dtype) + self.kv_cache_bytes(widths, batch, context,
                                                                      dtype)

    # ---- one entry point for budgets ----------------------------------------------------
    def cost(self, metric: str, widths=None) -> float:
        """`metric` in ("latency", "params", "memory") at the model's default settings."""
        if metric == "latency":
            return self.latency(widths)
        if metric == "params":
            return float(self.params(widths, non_embedding=True))
        if metric == "memory":
            return float(self.memory(widths))
        raise ProfileError(f"unknown metric {metric!r}; use one of {list(METRICS)}")

    def fraction(self, metric: str, widths=None) -> float:
        """Cost at `widths` over the cost of the full model."""
        return self.cost(metric, widths) / self.cost(metric, None)


_UNITS = {
    "latency": {"ms": 1.0, "s": 1e3, "us": 1e-3},
    "params": {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9},
    "memory": {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20,
               "gib": 2**30},
}


@dataclass(frozen=True)
class Budget:
    """A limit on one metric: `relative` (a fraction of the full model) or absolute
    (ms for latency, a count of non-embedding parameters, bytes for memory).

    Example:
        >>> Budget.parse("latency=60%")
        Budget(metric='latency', value=0.6, relative=True)
        >>> Budget.parse("memory=300MB").value
        300000000.0
    """

    metric: str
    value: float
    relative: bool = True

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ProfileError(f"budget metric must be one of {list(METRICS)}, "
                               f"got {self.metric!r}")
        if not self.value > 0:
            raise ProfileError(f"a budget must be positive, got {self.value}")
        if self.relative and self.value > 1:
            raise ProfileError(f"a relative budget is a fraction in (0, 1], got {self.value}; "
                               "give an absolute one with a unit, e.g. latency=12ms")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'latency=0.6', 'latency=60%', 'latency=12ms', 'params=50M', 'memory=300MB'."""
        metric, sep, amount = str(text).partition("=")
        metric, amount = metric.strip().lower(), amount.strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)([a-z%]*)", amount)
        if not sep or metric not in METRICS or not m:
            raise ProfileError(f"bad budget {text!r}: write METRIC=AMOUNT with METRIC in "
                               f"{list(METRICS)}, e.g. latency=0.6, latency=60%, "
                               "latency=12ms, params=50M, memory=300MB")
        number, unit = float(m.group(1)), m.group(2)
        if unit == "%":
            return cls(metric, number / 100, True)
        if unit == "" and number <= 1:
            return cls(metric, number, True)
        units = _UNITS[metric]
        if unit not in units:
            raise ProfileError(f"unknown unit {unit!r} for {metric}; use % or one of "
                               f"{[u for u in units if u]}")
        return cls(metric, number * units[unit], False)

    def limit(self, cost: CostModel) -> float:
        """The budget in absolute units for this cost model."""
        return self.value * cost.cost(self.metric, None) if self.relative else self.value

    def allows(self, cost: CostModel, widths) -> bool:
        return cost.cost(self.metric, widths) <= self.limit(cost) * (1 + 1e-9)
