"""Stage: profile. What sub-networks cost on a device: latency, parameters, memory.

    measure.profile(em, ProfileConfig)   time every elastic op at every width, in context
                                          (graphrun: the elastic graph's own blocks, any
                                          architecture; runtime: HF class, for decode)
         -> table.LatencyTable            fingerprinted JSON (machine, backend, dtype, shapes)
    cost.CostModel(em, table)            latency (Eq. 6-8 sum), exact params, memory
         + cost.Budget                    a fraction of the full model or absolute units
    validate.check(em, table)            predicted vs measured on random sub-networks, each
                                          timed between two full-model forwards: the error
                                          of its latency ratio to full, and in ms

Example:
    >>> from flextron_fx.profiler import ProfileConfig, profile, CostModel   # doctest: +SKIP
    >>> table = profile(em, ProfileConfig(mode="decode", shapes="1x256"))  # doctest: +SKIP
    >>> CostModel(em, table).latency(0.5)                                # doctest: +SKIP
"""

from .cost import Budget, CostModel
from .measure import ProfileConfig, profile
from .table import LatencyTable
from .validate import check

__all__ = ["Budget", "CostModel", "LatencyTable", "ProfileConfig", "check", "profile"]
