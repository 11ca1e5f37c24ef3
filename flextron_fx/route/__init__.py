"""Stage: route. Routers that pick sub-networks for a budget (paper section 3.2).

    passes.inject_routers(em, mode)     router nodes produce the blocks' widths
         static  R_i(T)      (Eq. 9)    one width per op for a budget
         dynamic R_i(T, h_i) (Eq. 11)   one width per token (routed execution)
         capacity                       per-token, every batch within the budget
    costs.CostTable                     per-op, per-candidate cost (latency, params, memory)
    surrogate.Surrogate                 predicts a sub-network's loss (Eq. 10)
    train.train_routers                 Figure 3: latency loss (Eq. 8) + surrogate
    measured                            or per-token targets from measured excess
    joint.tune_jointly                  then routers and backbone on the real loss
    select.select(em, budget, table)    static routers -> per-op widths, once

Example:
    >>> from flextron_fx.route import RouterConfig, train_routers, select   # doctest: +SKIP
    >>> train_routers(em, blocks, "runs/r", RouterConfig(steps=300), cost)  # doctest: +SKIP
    >>> select(em, 0.6, CostTable.coerce(em, cost)).widths                   # doctest: +SKIP
"""

import importlib

# Names and the module that holds them; imported on first use, so that the pass
# (passes/inject_routers.py), which imports the router modules of this package, and this
# package can import each other without a cycle.
_WHERE = {
    "fix_budget": "..passes.inject_routers", "inject_routers": "..passes.inject_routers",
    "remove_routers": "..passes.inject_routers", "routers_of": "..passes.inject_routers",
    "set_budget": "..passes.inject_routers", "CostTable": ".costs",
    "Selection": ".selection", "load_routers": ".selection", "save_routers": ".selection",
    "select": ".selection", "Surrogate": ".surrogate", "RouterConfig": ".train",
    "train_routers": ".train", "JointConfig": ".joint", "tune_jointly": ".joint",
}
__all__ = ["CostTable", "JointConfig", "RouterConfig", "Selection", "Surrogate", "fix_budget",
           "inject_routers", "load_routers", "remove_routers", "routers_of", "save_routers",
           "select", "set_budget", "train_routers", "tune_jointly"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
