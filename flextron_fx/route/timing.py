"""Measured forward time of routed execution as a fraction of the full width's.

The routed pass and the full-width pass run back to back on the same batch, in
alternating order, and only their ratio is kept: a shared machine whose speed drifts by
a third within minutes moves both alike. The full width runs through the same graph with
the routers skipped (each returns its widest candidate without computing), so the ratio
charges routed execution with everything it adds: the routers' own compute, the sort,
gathers and scatters of per-token widths, and attention at the widest width of a batch.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from tqdm.auto import tqdm

from ..elastic.model import ElasticModel
from ..errors import WidthError


def routed_time_ratios(em: ElasticModel, tokens: torch.Tensor, batch: int = 4,
                       reps: int = 5, progress: bool = True, *,
                       precision: float | None = None,
                       max_reps: int | None = None) -> list[float]:
    """Per batch of `tokens` [n, seq]: the median over the rounds of (forward time with
    the routers deciding at the budget set on `em`) / (forward time at full width); the
    rounds as in `routed_timing`."""
    return [b["ratio"] for b in routed_timing(em, tokens, batch, reps, progress,
                                              precision=precision, max_reps=max_reps)]


def routed_timing(em: ElasticModel, tokens: torch.Tensor, batch: int = 4, reps: int = 5,
                  progress: bool = True, *, precision: float | None = None,
                  max_reps: int | None = None) -> list[dict]:
    """Per batch of `tokens` [n, seq]: {"ratio": the median over rounds of routed / full
    forward time, "rounds", "se": the ratio's relative standard error or None}.

    One untimed pass of each, then `reps` rounds of a routed and a full forward back to
    back (the order alternating). With `precision`, a batch whose ratio's standard error
    (`profiler.validate.ratio_se`, its spread floored at the median spread of the batches
    so far) is above it gets more rounds, up to `max_reps` (default 4 x `reps`): a
    batch's median of 5 rounds moved by 8 % between two minutes on a shared 2-core
    machine, more than capacity routing's 5 % margin (docs/ROUTERS.md)."""
    from ..passes.inject_routers import routers_of
    from ..profiler.validate import pooled_sigma, ratio_se

    routers = list(routers_of(em).values())
    if not routers:
        raise WidthError("this model has no routers to time; inject_routers(em) first")
    if reps < 1:
        raise WidthError(f"reps is the number of timed rounds per batch, at least 1, got {reps}")
    max_reps = 4 * reps if max_reps is None else max_reps
    if precision is not None and (precision <= 0 or max_reps < reps):
        raise WidthError(f"precision must be > 0 and max_reps >= reps, got {precision} and "
                         f"{max_reps} (reps {reps})")
    device = next(em.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    was = [r.full for r in routers]

    def timed(ids: torch.Tensor, full: bool) -> float:
        for r in routers:
            r.full = full
        try:
            sync()
            t0 = time.perf_counter()
            em(ids)
            sync()
            return time.perf_counter() - t0
        finally:
            for r, w in zip(routers, was):
                r.full = w

    seen: dict[int, list[float]] = {}
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, tokens.shape[0], batch), desc="timing", leave=False,
                      disable=not progress):
            ids = tokens[i:i + batch].to(device)
            timed(ids, True), timed(ids, False)
            ratios = seen[i] = []
            while len(ratios) < reps or (
                    precision is not None and len(ratios) < max_reps
                    and ratio_se(ratios, pooled_sigma(seen)) > precision):
                order = (False, True) if len(ratios) % 2 else (True, False)
                t = {full: timed(ids, full) for full in order}
                ratios.append(t[False] / t[True])
            se = ratio_se(ratios, pooled_sigma(seen))
            out.append({"ratio": statistics.median(ratios), "rounds": len(ratios),
                        "se": se if math.isfinite(se) else None})
    return out
