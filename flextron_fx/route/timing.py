"""Measured forward time of routed execution as a fraction of the full width's.

The routed pass and the full-width pass run back to back on the same batch, in
alternating order, and only their ratio is kept: a shared machine whose speed drifts by
a third within minutes moves both alike. The full width runs through the same graph with
the routers skipped (each returns its widest candidate without computing), so the ratio
charges routed execution with everything it adds: the routers' own compute, the sort,
gathers and scatters of per-token widths, and attention at the widest width of a batch.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from ..elastic.model import ElasticModel
from ..errors import WidthError


def routed_time_ratios(em: ElasticModel, tokens: torch.Tensor, batch: int = 4,
                       reps: int = 5, progress: bool = True) -> list[float]:
    """Per batch of `tokens` [n, seq]: the median over `reps` rounds of (forward time
    with the routers deciding at the budget set on `em`) / (forward time at full width),
    after one untimed pass of each."""
    from ..passes.inject_routers import routers_of

    routers = list(routers_of(em).values())
    if not routers:
        raise WidthError("this model has no routers to time; inject_routers(em) first")
    if reps < 1:
        raise WidthError(f"reps is the number of timed rounds per batch, at least 1, got {reps}")
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

    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, tokens.shape[0], batch), desc="timing", leave=False,
                      disable=not progress):
            ids = tokens[i:i + batch].to(device)
            timed(ids, True), timed(ids, False)
            ratios = []
            for k in range(reps):
                order = (False, True) if k % 2 else (True, False)
                t = {full: timed(ids, full) for full in order}
                ratios.append(t[False] / t[True])
            out.append(statistics.median(ratios))
    return out
