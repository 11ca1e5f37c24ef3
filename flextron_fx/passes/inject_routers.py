"""Pass: inject routers, nodes that produce the blocks' widths from a budget (paper 3.2).

Requires: an elastic graph (`ElasticModel.graph_module`) whose blocks read their widths
from `WidthSource` nodes (elasticize), and no routers yet.
Ensures: one `flextron_router_i` node per elastic op, in op order, whose output replaces
that op's `WidthSource` node as the width input of every user; one `flextron_budget`
node (the budget T) read by every router; for dynamic routers, each router reads the
block's input (an MLP region's first argument, the input of the attention's q/k/v
projections) and the graph stays in topological order. `remove_routers` undoes all of it
and gives back the `WidthSource` nodes (their values unchanged), so the same outputs.

    mode="static"    R_i(T): an int width per op (Eq. 9)
    mode="dynamic"   R_i(T, h_i): a candidate index per token (Eq. 11), routed execution
    mode="capacity"  dynamic routers whose token shares per candidate keep every batch's
                     cost within the budget (needs a cost table)
"""

from __future__ import annotations

import heapq
import itertools
import warnings

import numpy as np
import torch
from torch import fx
from tqdm.auto import tqdm

from ..elastic.model import ElasticModel, width_nodes
from ..elastic.ops import ElasticRegion
from ..errors import WidthError
from ..route.costs import CostTable
from ..route.routers import BudgetSource, DynamicRouter, HiddenTap, Router, StaticRouter
from ..route.timing import routed_time_ratios
from .elasticize import _activation_input

MODES = ("static", "dynamic", "capacity")
BUDGET, ROUTER, TAP = "flextron_budget", "flextron_router_", "flextron_final_hidden"


def inject_routers(em: ElasticModel, mode: str = "static", *, cost=None, metric: str = "latency",
                   hidden: int = 64, units: int = 128, seed: int = 0) -> dict[str, Router]:
    """Insert one router per elastic op into `em`'s graph; returns {op name: router}.

    `cost` (a `CostTable`, a profiler `CostModel` or a dict {op: [cost per candidate]}) is
    needed by capacity routers; router weights are initialised from `seed`.

    Example:
        >>> routers = inject_routers(em, "static")          # doctest: +SKIP
        >>> set_budget(em, 0.6); logits = em(ids)            # doctest: +SKIP
        >>> remove_routers(em)                               # doctest: +SKIP
    """
    if mode not in MODES:
        raise WidthError(f"router mode must be one of {list(MODES)}, got {mode!r}")
    gm, graph = em.graph_module, em.graph_module.graph
    if routers_of(em):
        raise WidthError("this model already has routers; remove_routers(em) first")
    table = None
    if mode == "capacity":
        if cost is None:
            raise WidthError("capacity routers need the cost of every candidate: pass cost= "
                             "(a CostTable, a profiler CostModel or {op: [costs]})")
        table = CostTable.coerce(em, cost, metric)
    sources = width_nodes(gm)
    missing = [n for n in em.ops if n not in sources]
    if missing:
        raise WidthError(f"the widths of {missing[:3]} do not come from width nodes; "
                         "routers replace width nodes")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ids = placeholders[0]
    gm.add_submodule(BUDGET, BudgetSource(1.0))
    with graph.inserting_after(placeholders[-1]):
        budget = graph.call_module(BUDGET, ())
    out: dict[str, Router] = {}
    device = next(gm.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (name, op) in enumerate(em.ops.items()):
            src = sources[name]
            if mode == "static":
                router, args, after = StaticRouter(name, op.candidates, hidden), \
                    (budget, ids), budget
            else:
                h = _block_input(em, name, src)
                dim = _last_dim(h, op)
                router = DynamicRouter(name, op.candidates, dim, units, mode == "capacity")
                router.whole_batch = mode == "capacity" and op.kind == "attention"
                args, after = (budget, h, ids), h
            router.to(device)
            target = f"{ROUTER}{i}"
            gm.add_submodule(target, router)
            with graph.inserting_after(after):
                node = graph.call_module(target, args)
            node.meta["flextron_block"] = name
            node.meta["flextron_source"] = src.target
            src.replace_all_uses_with(node)
            graph.erase_node(src)
            out[name] = router
    if table is not None:
        set_capacity(out, table)
    if mode != "static":
        _tap_final_hidden(gm)
    _toposort(graph)
    graph.lint()
    gm.recompile()
    return out


def remove_routers(em: ElasticModel) -> None:
    """Take the routers out of `em`'s graph: every op reads its `WidthSource` node again
    (at the width it had before the routers came in). No-op without routers."""
    gm, graph = em.graph_module, em.graph_module.graph
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith(ROUTER):
            with graph.inserting_after(anchor):
                src = graph.call_module(node.meta["flextron_source"], ())
            src.meta["flextron_block"] = node.meta["flextron_block"]
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            gm.delete_submodule(node.target)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in (TAP, BUDGET):
            if node.target == TAP:
                node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            gm.delete_submodule(node.target)
    _toposort(graph)
    graph.lint()
    gm.recompile()


def routers_of(em: ElasticModel) -> dict[str, Router]:
    """{op name: router} of the routers in `em`'s graph, in op order (empty if none)."""
    gm = em.graph_module
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(ROUTER):
            found[node.meta["flextron_block"]] = gm.get_submodule(node.target)
    return {n: found[n] for n in em.ops if n in found}


def router_mode(em: ElasticModel) -> str | None:
    routers = list(routers_of(em).values())
    return routers[0].kind if routers else None


def budget_source(em: ElasticModel) -> BudgetSource:
    try:
        return em.graph_module.get_submodule(BUDGET)
    except AttributeError:
        raise WidthError("this model has no routers; inject_routers(em) first") from None


def final_hidden_tap(em: ElasticModel) -> HiddenTap | None:
    try:
        return em.graph_module.get_submodule(TAP)
    except AttributeError:
        return None


def set_budget(em: ElasticModel, budget) -> None:
    """Set the budget T the routers read: a fraction of the full cost in (0, 1], or a
    [batch] tensor of them (one budget per sequence). Dynamic routers with a budget
    calibration (`calibrate_budget`) read the input that spent T on calibration text."""
    src = budget_source(em)
    if isinstance(budget, torch.Tensor):
        b = budget.detach().float()
        if b.numel() == 0 or not bool(((b > 0) & (b <= 1)).all()):
            raise WidthError("budgets are fractions of the full model's cost in (0, 1]")
        src.value = src.router_input(b)
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
            or not 0 < float(budget) <= 1:
        raise WidthError(f"a budget is a fraction of the full model's cost in (0, 1], got "
                         f"{budget!r}")
    src.value = src.router_input(float(budget))


def fix_budget(em: ElasticModel, budget: float) -> dict[str, int]:
    """Static routers only: their widths at `budget`, then the routers removed and those
    widths set as constants (a fixed budget costs nothing at run time). Returns them."""
    routers = routers_of(em)
    if not routers:
        raise WidthError("this model has no routers; inject_routers(em) first")
    if any(r.kind != "static" for r in routers.values()):
        raise WidthError("only static routers give one width per op for a budget; dynamic "
                         "routers choose per token (keep them in the graph)")
    set_budget(em, budget)
    widths = static_choice(em, float(budget))
    remove_routers(em)
    em.set_widths(widths)
    return widths


@torch.no_grad()
def static_choice(em: ElasticModel, budget: float) -> dict[str, int]:
    """Each static router's argmax width at `budget`."""
    out = {}
    for name, r in routers_of(em).items():
        device = r.net[0].weight.device
        out[name] = r.candidates[int(r.logits(torch.tensor([budget], device=device)).argmax())]
    return out


def capacity_shares(table: CostTable, names, profile: dict | None = None, whole=()):
    """budget -> {op: cost limit per token}, the limits adding up to the budget.

    Each op starts from a target cost: its cheapest candidate, or with `profile`
    ({"grid": budgets, "ops": {op: mean cost per token at each}}, `calibrate_capacity`)
    what the dynamic routers spent there, interpolated. Room left is shared in proportion
    to each op's headroom up to its widest candidate; a shortfall is taken in proportion
    to each op's target above its cheapest. Without a profile every op gets the same
    fraction of its cost range. A profile with "measured" (the measured time of capacity
    routing at each budget of its grid, a fraction of the full width's) splits, for a
    budget T, the grid's budget whose measured time was T (`measured_budget`).

    Ops in `whole` (capacity attention) take one candidate for the whole batch, the widest
    whose cost is within their limit; their limit is rounded down to that cost, and what
    the rounding frees goes to the other ops, in proportion to their headroom (at T = 0.7
    on SmolLM2 the rounding left a tenth of the budget unspent)."""
    low = {n: min(table.costs[n]) for n in names}
    high = {n: max(table.costs[n]) for n in names}
    cache: dict[float, dict[str, float]] = {}
    planned = (lambda t: t) if not (profile or {}).get("measured") else \
        measured_budget(profile["grid"], profile["measured"])

    def shares(budget: float) -> dict[str, float]:
        if budget in cache:
            return cache[budget]
        table.refuse_below_minimum(budget)
        plan = planned(budget)
        room = plan * table.full - table.fixed
        if room + table.fixed < table.minimum * (1 - 1e-9):
            warnings.warn(f"capacity routing plans budget {budget:g} below the cheapest "
                          f"sub-network, from its measured times ({profile['measured'][0]:.3g}"
                          f" of the full model's at budget {profile['grid'][0]:g}): every "
                          "token takes its cheapest width and the measured time will be "
                          "over the budget", stacklevel=2)
        if profile is None:
            want = dict(low)
        else:
            want = {n: min(high[n], max(low[n], float(np.interp(
                plan, profile["grid"], profile["ops"][n])))) for n in names}
        spare = room - sum(want.values())
        if spare >= 0:
            head = sum(high[n] - want[n] for n in names)
            out = {n: want[n] + (min(1.0, spare / head) * (high[n] - want[n]) if head else 0)
                   for n in names}
        else:
            above = sum(want[n] - low[n] for n in names)  # 0: room is the minimum, rounded
            keep = max(0.0, 1 + spare / above) if above > 0 else 0.0
            out = {n: low[n] + (want[n] - low[n]) * keep for n in names}
        if whole:
            out = _round_whole_batch(table, out, whole, high)
        cache[budget] = out
        return out

    return shares


def _round_whole_batch(table: CostTable, limits: dict[str, float], whole,
                       high: dict[str, float]) -> dict[str, float]:
    """`limits` with each op of `whole` at its widest candidate cost within its limit and
    the room that frees shared by the other ops in proportion to their headroom."""
    out, freed = dict(limits), 0.0
    for n in whole:
        fits = [c for c in table.costs[n] if c <= out[n] * (1 + 1e-9) + 1e-12]
        rounded = max(fits) if fits else min(table.costs[n])
        freed += out[n] - rounded
        out[n] = rounded
    rounded_ops = set(whole)
    rest = [n for n in out if n not in rounded_ops]
    head = sum(high[n] - out[n] for n in rest)
    if freed > 0 and head > 0:
        take = min(1.0, freed / head)
        for n in rest:
            out[n] += take * (high[n] - out[n])
    return out


def measured_budget(grid, measured):
    """budget T -> the budget to plan for so that measured time is T: the widest budget of
    the grid whose measured time (made non-decreasing in the budget: a budget is charged
    the slowest time of any budget up to it) is at most T, interpolated towards the next;
    below the grid, T scaled by the first point's ratio."""
    if len(grid) != len(measured) or not grid or min(measured) <= 0:
        raise WidthError(f"a measured capacity profile has one positive time ratio per "
                         f"budget of its grid; got {list(measured)} for grid {list(grid)}")
    xs = np.maximum.accumulate(np.asarray(measured, dtype=float))
    gs = np.asarray(grid, dtype=float)

    def planned(budget: float) -> float:
        within = np.flatnonzero(xs <= budget)
        if not within.size:
            return budget * gs[0] / xs[0]
        i = int(within[-1])  # the widest grid budget that measured at most T
        if i == len(gs) - 1:
            return float(gs[-1])
        return float(gs[i] + (budget - xs[i]) / (xs[i + 1] - xs[i]) * (gs[i + 1] - gs[i]))

    return planned


def set_capacity(routers: dict[str, Router], table: CostTable,
                 profile: dict | None = None) -> None:
    """Give capacity routers their costs and their share of any budget
    (`capacity_shares`)."""
    shares = capacity_shares(table, list(routers), profile,
                             whole=[n for n, r in routers.items() if r.whole_batch])

    def share_of(name: str):
        return lambda budget: shares(budget)[name]

    for name, r in routers.items():
        r.costs = table.tensor(name)
        r.share = share_of(name)
        r.profile = profile


def _spent(em: ElasticModel, table: CostTable, tokens: torch.Tensor, grid,
           batch: int, progress: bool = False) -> dict[str, list[float]]:
    """Per op, the mean cost per token (table units) the routers spend on `tokens` at each
    router input of `grid`, choosing per token (dynamic mode); the routers' mode and the
    budget are restored after."""
    routers = routers_of(em)
    device = next(em.parameters()).device
    spent = {n: [] for n in routers}
    source = budget_source(em)
    saved = (source.value, source.calibration, [r.capacity for r in routers.values()])
    try:
        source.calibration = None
        for r in routers.values():
            r.capacity = False
        for g in tqdm(grid, desc="router inputs", leave=False, disable=not progress):
            set_budget(em, g)
            total = {n: 0.0 for n in routers}
            for i in range(0, tokens.shape[0], batch):
                em(tokens[i:i + batch].to(device))
                for n, r in routers.items():
                    total[n] += float(table.tensor(n)[r.last_index.cpu()].sum())
            for n in routers:
                spent[n].append(total[n] / tokens.numel())
    finally:
        source.value, source.calibration = saved[0], saved[1]
        for r, was in zip(routers.values(), saved[2]):
            r.capacity = was
    return spent


@torch.no_grad()
def calibrate_capacity(em: ElasticModel, table: CostTable, tokens: torch.Tensor,
                       grid=None, batch: int = 4, timing_reps: int = 0,
                       progress: bool = True, *, precision: float | None = 0.02) -> dict:
    """Capacity routers: run `tokens` [n, seq] through the routers in dynamic mode at each
    budget of `grid` (default 0.5-1.0 in steps of 0.05, those the table can meet), record
    each op's mean cost per token, and make those the ops' capacity targets (see
    `capacity_shares`): the budget is then split the way the routers spend it, not in
    equal fractions. Returns the profile (`save_routers` keeps it).

    With `timing_reps`, then also time capacity routing at each budget of the grid against
    the full width on this machine (`route.timing.routed_time_ratios`, that many rounds
    per batch and more, up to 4 x `timing_reps`, while a batch's ratio has a relative
    standard error above `precision`; the slowest batch) as the profile's "measured": a
    budget T is then planned at the grid's budget whose slowest batch measured T, so that
    the measured time of every batch, not only the table's prediction, stays within T
    (planned on the median batch, the slowest of 8 held-out batches measured 1.07 T on
    SmolLM2, docs/ROUTERS.md). Routed execution costs more than the table's
    sum of per-op widths (the routers' own compute, the per-token gathers and scatters),
    and the table does not see it."""
    routers = routers_of(em)
    if not routers or any(r.kind != "capacity" for r in routers.values()):
        raise WidthError("calibrate_capacity needs capacity routers "
                         "(inject_routers(em, 'capacity', cost=...))")
    if grid is None:
        grid = [g / 20 for g in range(10, 21)]
    grid = sorted(g for g in grid if g * table.full >= table.minimum)
    if not grid:
        raise WidthError("no budget of the grid is above the cheapest sub-network")
    if timing_reps and table.metric != "latency":
        raise WidthError(f"measured time calibrates latency budgets; this table's metric is "
                         f"{table.metric!r} (use timing_reps=0)")
    profile = {"grid": grid, "ops": _spent(em, table, tokens, grid, batch, progress)}
    set_capacity(routers, table, profile)
    if timing_reps:
        source = budget_source(em)
        saved, measured = source.value, []
        try:
            for g in tqdm(grid, desc="timing capacity", leave=False, disable=not progress):
                set_budget(em, g)
                measured.append(max(routed_time_ratios(
                    em, tokens, batch, timing_reps, progress=False, precision=precision)))
        finally:
            source.value = saved
        profile["measured"] = measured
        set_capacity(routers, table, profile)
    return profile


@torch.no_grad()
def calibrate_budget(em: ElasticModel, table: CostTable, tokens: torch.Tensor,
                     grid=None, batch: int = 4, resolution: float | None = 0.0025,
                     progress: bool = False, *, budgets=None, finest: float = 0.0025) -> dict:
    """Dynamic routers: run `tokens` [n, seq] at each router input of `grid` (default
    0.28-1.0 in steps of 0.04), record the token-mean cost they spend (a fraction of the
    full model's), and from then on give them, for a budget T, the widest input that spent
    at most T (`BudgetSource.router_input`). The routers learn the budget only through the
    hinge of Eq. 8, so their own reading of T over- or undershoots it by a few per cent;
    this is their counterpart of `select`'s fitting of static routers to the budget.

    Where one step of the grid moves the cost by more than `resolution`, the step is
    halved, and again, while the halves are at least `finest` wide (`resolution` None: the
    grid as given): a budget between two calibrated costs gets the lower one's input, so
    on a steep stretch of the curve (0.01 of input moved the cost by 0.02 on SmolLM2) up
    to a step's cost of the budget went unspent. Flat stretches keep the coarse steps; steep
    ones get the steps of 0.0025 a grid of 0.01 halved twice gave.

    `budgets`: only these budgets will be asked for (a benchmark's), so only the steps
    whose costs enclose one of them are halved: about 19 + 4 per budget inputs instead of
    70-250, and each of these budgets gets the same guarantee as with the whole curve
    refined: the input it reads spent at most `resolution` less than it, unless the next
    input, less than 2 x `finest` further, already spent more. Other budgets map on the
    coarse grid.
    `progress`: a bar over the router inputs (on SmolLM2, 16 x 256 tokens at about 150
    inputs took half an hour). Returns the calibration (`save_routers` keeps it)."""
    routers = routers_of(em)
    if not routers or any(r.kind != "dynamic" for r in routers.values()):
        raise WidthError("calibrate_budget needs dynamic routers (inject_routers(em, "
                         "'dynamic'); capacity routers have calibrate_capacity)")
    grid = sorted(set(grid if grid is not None else [g / 100 for g in range(28, 101, 4)]))
    if not grid or not 0 < grid[0] <= grid[-1] <= 1:
        raise WidthError(f"router inputs are fractions in (0, 1], got {grid}")
    targets = None if budgets is None else sorted({float(b) for b in budgets})
    if targets is not None and (not targets or not 0 < targets[0] <= targets[-1] <= 1):
        raise WidthError(f"budgets are fractions of the full model's cost in (0, 1], got "
                         f"{budgets}")

    def fractions(inputs: list[float]) -> list[float]:
        spent = _spent(em, table, tokens, inputs, batch, progress)
        return [(table.fixed + sum(s[i] for s in spent.values())) / table.full
                for i in range(len(inputs))]

    def coarse(a: float, b: float) -> bool:  # a step worth halving
        lo, hi = sorted((costs[a], costs[b]))
        return ((b - a) / 2 >= finest * (1 - 1e-9) and hi - lo > resolution
                and (targets is None or any(lo <= t < hi for t in targets)))

    costs = dict(zip(grid, fractions(grid)))
    while resolution is not None:
        mids = [(a + b) / 2 for a, b in itertools.pairwise(sorted(costs)) if coarse(a, b)]
        if not mids:
            break
        costs.update(zip(mids, fractions(mids)))
    inputs = sorted(costs)
    calibration = {"inputs": inputs, "costs": [costs[x] for x in inputs]}
    budget_source(em).calibration = calibration
    return calibration


def _block_input(em: ElasticModel, name: str, src: fx.Node) -> fx.Node:
    """The tensor a block reads: an MLP region's input, attention's q/k/v input."""
    gm = em.graph_module
    op = em.ops[name]
    if op.kind == "mlp":
        for user in src.users:
            if user.op == "call_module" and isinstance(gm.get_submodule(user.target),
                                                       ElasticRegion):
                return user.args[0]
    else:
        inputs = {_activation_input(p.node) for p in em.block(name).in_projs}
        inputs.discard(None)
        if len(inputs) == 1 and em.routable(name):
            return inputs.pop()
    raise WidthError(f"{name} cannot take a width per token (its token-wise part is not one "
                     "node, or its projections read different tensors); use mode='static'")


def _last_dim(h: fx.Node, op) -> int:
    val = h.meta.get("val")
    if val is not None and hasattr(val, "shape"):
        return int(val.shape[-1])
    return int(op.sizes.get("model_dim"))


_LINEAR = {torch.ops.aten.linear.default, torch.ops.aten.matmul.default,
           torch.ops.aten.mm.default}


def _tap_final_hidden(gm: fx.GraphModule) -> None:
    """A `HiddenTap` on the final hidden state: the input of the output head (or the
    graph's first output when it is not a projection)."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    first = out.args[0]
    while isinstance(first, (tuple, list, dict)):
        first = next(iter(first.values() if isinstance(first, dict) else first))
    node = first
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _LINEAR:
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return
    gm.add_submodule(TAP, HiddenTap())
    with graph.inserting_after(node):
        tap = graph.call_module(TAP, (node,))
    node.replace_all_uses_with(tap, delete_user_cb=lambda u: u is not tap)


def _toposort(graph: fx.Graph) -> None:
    """Reorder nodes so that each comes after its inputs, keeping the original order
    wherever it already is one (the smallest topological order by original position)."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [pos[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        n = nodes[heapq.heappop(ready)]
        order.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, pos[u])
    if len(order) != len(nodes):
        raise WidthError("router injection made the graph cyclic (a router reads a tensor "
                         "computed from its own width)")
    if order == nodes:
        return
    prev = order[0]
    for n in order[1:]:
        if prev.next is not n:
            prev.append(n)
        prev = n
