"""Routers injected into the elastic graph (paper 3.2): static, dynamic, capacity; their
training through a surrogate model; select; the CLI."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    calibration,
    output,
    perturb_routers,
    saved_real_vocab_llama,
    self_sampled_tokens,
    width_share_costs,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import ProfileError, WidthError
from flextron_fx.passes.inject_routers import (
    budget_source,
    calibrate_budget,
    calibrate_capacity,
    capacity_shares,
    fix_budget,
    inject_routers,
    measured_budget,
    remove_routers,
    routers_of,
    set_budget,
    static_choice,
)
from flextron_fx.profiler import Budget, CostModel
from flextron_fx.route import CostTable, RouterConfig, load_routers, save_routers, select, timing
from flextron_fx.route.routers import (
    BudgetSource,
    DynamicRouter,
    StaticRouter,
    assign_by_preference,
    capacity_counts,
)
from flextron_fx.route.surrogate import Surrogate
from flextron_fx.route.timing import routed_time_ratios
from flextron_fx.route.train import (
    RouterTraining,
    chosen_cost,
    evaluate_routers,
    expected_cost,
    latency_loss,
    read_metrics,
    router_step,
    sequence_losses,
    train_routers,
)

ARCHS = ["llama", "gpt2", "opt", "phi3", "nanogpt"]
MODES = ["static", "dynamic", "capacity"]
BATCH, SEQ = 3, 6


def _ids(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def routed(zoo_converted):
    """get(arch, mode) -> elastic model with (perturbed) routers; removed afterwards."""
    used = []

    def get(arch: str, mode: str, seed: int = 0, **kw):
        _, em = zoo_converted(arch)
        perturb_routers(inject_routers(em, mode, cost=width_share_costs(em), seed=seed, **kw), seed)
        used.append(em)
        return em

    yield get
    for em in used:
        remove_routers(em)
        em.set_full()


def _choices(em) -> dict:
    return {n: r.last_index for n, r in routers_of(em).items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_each_router_output_is_a_valid_candidate(routed, arch, mode):
    em = routed(arch, mode)
    assert set(routers_of(em)) == set(em.ops)
    text = str(em.graph_module.graph)
    assert "flextron_budget" in text and f"flextron_router_{len(em.ops) - 1}" in text
    assert "flextron_width_" not in text  # every width now comes from a router
    for budget in (0.5, 0.8, 1.0):
        set_budget(em, budget)
        output(em, _ids(1))
        for name, k in _choices(em).items():
            K = len(em.ops[name].candidates)
            whole_batch = mode == "capacity" and em.ops[name].kind == "attention"
            if mode == "static" or whole_batch:
                assert isinstance(k, int) and 0 <= k < K
            else:
                assert k.shape == (BATCH, SEQ) and k.dtype == torch.long
                assert int(k.min()) >= 0 and int(k.max()) < K


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_dynamic_routed_output_equals_the_same_per_token_widths_set_by_hand(
        zoo_converted, arch):
    _, em = zoo_converted(arch)
    ids = _ids(2)
    perturb_routers(inject_routers(em, "dynamic", seed=3))
    try:
        set_budget(em, 0.7)
        runs = [output(em, ids) for _ in range(3)]
        routed_out = runs[0]
        assert all(torch.equal(r, routed_out) for r in runs)
        chosen = {n: k.clone() for n, k in _choices(em).items()}
    finally:
        remove_routers(em)
    assert any(len(set(k.flatten().tolist())) > 1 for k in chosen.values())  # really per token
    with em.at(chosen):
        by_hand = output(em, ids)
    assert torch.equal(routed_out, by_hand)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_static_router_equals_its_fixed_widths_and_fix_budget_removes_it(zoo_converted, arch):
    _, em = zoo_converted(arch)
    ids = _ids(3)
    routers = inject_routers(em, "static", seed=1)
    perturb_routers(routers)
    try:
        set_budget(em, 0.6)
        first = [output(em, ids) for _ in range(3)]  # the 2nd and 3rd run a static program
        first_widths = static_choice(em, 0.6)
        assert all(torch.equal(h, first[0]) for h in first)
        name = next(n for n, w in first_widths.items() if w != em.ops[n].candidates[0])
        with torch.no_grad():  # a router that changes (as in training) changes the width
            routers[name].net[-1].bias[0] = 100.0
        routed_out = output(em, ids)
        widths = static_choice(em, 0.6)
        assert widths == dict(first_widths, **{name: em.ops[name].candidates[0]})
        assert fix_budget(em, 0.6) == widths
        assert not routers_of(em)
        assert em.widths == widths
        assert torch.equal(output(em, ids), routed_out)
        assert_close(routed_out, output(em.materialize(widths), ids))
        assert_close(first[0], output(em.materialize(first_widths), ids))
    finally:
        remove_routers(em)
        em.set_full()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_inject_then_remove_gives_back_the_original_outputs(routed, zoo_converted, arch, mode):
    _, em = zoo_converted(arch)
    ids = _ids(4)
    em.set_widths(0.5, kind="mlp")  # widths set before routing come back as they were
    before, widths = output(em, ids), em.widths
    nodes = sorted((n.op, str(n.target)) for n in em.graph_module.graph.nodes)
    inject_routers(em, mode, cost=width_share_costs(em))
    set_budget(em, 0.6)
    assert not torch.equal(output(em, ids), before) or mode == "static"
    remove_routers(em)
    assert em.widths == widths
    assert torch.equal(output(em, ids), before)
    assert em.graph_module.code.count("flextron_router") == 0
    assert sorted((n.op, str(n.target)) for n in em.graph_module.graph.nodes) == nodes
    em.set_full()


def test_router_injection_refuses_bad_use(zoo_converted):
    _, em = zoo_converted("llama")
    with pytest.raises(WidthError, match="router mode"):
        inject_routers(em, "banana")
    with pytest.raises(WidthError, match="capacity routers need"):
        inject_routers(em, "capacity")
    inject_routers(em, "static")
    try:
        with pytest.raises(WidthError, match="already has routers"):
            inject_routers(em, "static")
        with pytest.raises(WidthError, match=r"\(0, 1\]"):
            set_budget(em, 1.5)
        with pytest.raises(WidthError, match="no longer comes from a width node"):
            em.set_widths(0.5)
    finally:
        remove_routers(em)


# ---- costs and the latency loss (Eq. 8) -------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(costs=st.lists(st.lists(st.floats(0.01, 5.0), min_size=2, max_size=4), min_size=1,
                      max_size=4),
       fixed=st.floats(0.0, 3.0), seed=st.integers(0, 2**16), budget=st.floats(0.05, 1.0))
@example(costs=[[3.0, 3.0, 0.01]], fixed=0.0, seed=196, budget=1.0)  # CI, 2026-12-03
def test_latency_loss_is_zero_under_budget_and_grows_with_the_excess(costs, fixed, seed,
                                                                     budget):
    table = CostTable("latency", {f"op{i}": c for i, c in enumerate(costs)}, fixed)
    g = torch.Generator().manual_seed(seed)
    probs = [torch.softmax(torch.randn(2, len(c), generator=g) * 3, -1) for c in costs]
    names = list(table.costs)
    cost = expected_cost(probs, table, names)
    # the expected cost is sum_i softmax . cost_i (plus the fixed part), over the full cost
    want = (fixed + sum(p @ torch.tensor(c) for p, c in zip(probs, costs))) / table.full
    torch.testing.assert_close(cost, want.float())
    b = torch.full((2,), budget)
    loss = latency_loss(cost, b)
    excess = torch.clamp(cost - b, min=0)
    torch.testing.assert_close(loss, excess.mean())
    if bool((cost <= b).all()):
        assert float(loss) == 0.0
    # more excess, more loss; a lower budget never lowers it
    assert float(latency_loss(cost + 0.1, b)) >= float(loss)
    assert float(latency_loss(cost, b - 0.05)) >= float(loss)
    if bool((cost > b).all()):
        # float32: costs reach hundreds of times the full cost (a cheap widest candidate)
        assert float(latency_loss(cost + 0.1, b)) == pytest.approx(float(loss) + 0.1, rel=1e-6,
                                                                   abs=1e-5)
    # budget_loss="match": the distance from the budget either way, the hinge's excess plus
    # what is left unspent
    match = latency_loss(cost, b, match=True)
    torch.testing.assert_close(match, excess.mean() + torch.clamp(b - cost, min=0).mean())
    if bool((cost < b).all()):
        assert float(match) > 0 == float(loss)
    with pytest.raises(flextron_fx.FlextronError, match="budget_loss must be one of"):
        RouterConfig(steps=1, budget_loss="two-sided").validate()


@pytest.mark.parametrize("metric", ["params", "memory"])
def test_cost_table_from_the_profiler_adds_up_to_its_cost(zoo_converted, metric):
    _, em = zoo_converted("llama")
    cm = CostModel(em, context=64)
    table = CostTable.coerce(em, cm, metric)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        choice = {n: int(torch.randint(len(op.candidates), (1,), generator=g))
                  for n, op in em.ops.items()}
        widths = {n: em.ops[n].candidates[k] for n, k in choice.items()}
        assert table.total(choice) == pytest.approx(cm.cost(metric, widths), rel=1e-9)
    assert table.full == pytest.approx(cm.cost(metric, None), rel=1e-9)


def test_cost_table_refuses_a_table_that_does_not_fit(zoo_converted):
    _, em = zoo_converted("llama")
    costs = width_share_costs(em)
    name = next(iter(costs))
    with pytest.raises(ProfileError, match="one cost per candidate"):
        CostTable.coerce(em, dict(costs, **{name: [1.0]}))
    with pytest.raises(ProfileError, match="ops without costs"):
        CostTable.coerce(em, {name: costs[name]})
    with pytest.raises(ProfileError, match="finite"):
        CostTable("latency", {"a": [float("nan")]})


# ---- capacity mode -----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 5), n=st.integers(1, 50), seed=st.integers(0, 2**16),
       frac=st.floats(0.0, 1.0))
def test_capacity_counts_meet_the_limit_and_assignment_follows_them(k, n, seed, frac):
    g = torch.Generator().manual_seed(seed)
    costs = sorted(torch.rand(k, generator=g).tolist())
    probs = torch.softmax(torch.randn(n, k, generator=g) * 2, -1)
    limit = costs[0] + frac * (costs[-1] - costs[0])
    counts = capacity_counts(probs.mean(0), costs, n, limit)
    assert sum(counts) == n and min(counts) >= 0
    assert sum(c * m for c, m in zip(costs, counts)) <= limit * n * (1 + 1e-6) + 1e-9
    index = assign_by_preference(probs, counts)
    assert torch.bincount(index, minlength=k).tolist() == counts
    # the widest candidate takes the tokens that prefer it most
    top = counts[-1]
    if 0 < top < n:
        chosen = probs[index == k - 1, k - 1]
        others = probs[index != k - 1, k - 1]
        assert float(chosen.min()) >= float(others.max())


@settings(max_examples=80, deadline=None)
@given(ops=st.integers(1, 6), seed=st.integers(0, 2**16), frac=st.floats(0.0, 1.0),
       calibrated=st.booleans(), whole=st.integers(0, 6))
@example(ops=5, seed=0, frac=0.0, calibrated=False, whole=0)  # the cheapest, rounded
@example(ops=4, seed=3, frac=0.5, calibrated=True, whole=2)  # rounding frees room
def test_capacity_shares_add_up_to_the_budget_within_each_ops_range(ops, seed, frac,
                                                                   calibrated, whole):
    g = torch.Generator().manual_seed(seed)
    costs = {f"op{i}": sorted((1 + torch.rand(3, generator=g) * 4).tolist())
             for i in range(ops)}
    table = CostTable("params", costs, fixed=2.0)
    grid = [0.5, 0.75, 1.0]
    profile = {"grid": grid, "ops": {n: sorted((c[0] + torch.rand(3, generator=g)
                                                * (c[-1] - c[0])).tolist())
                                     for n, c in costs.items()}} if calibrated else None
    batch_ops = list(costs)[:whole]  # one candidate per batch (capacity attention)
    shares = capacity_shares(table, list(costs), profile, whole=batch_ops)
    budget = (table.minimum + frac * (table.full - table.minimum)) / table.full
    got = shares(budget)
    for n, c in costs.items():
        assert c[0] - 1e-9 <= got[n] <= c[-1] + 1e-9
    total = table.fixed + sum(got.values())
    assert total <= budget * table.full * (1 + 1e-9)
    unrounded = capacity_shares(table, list(costs), profile)(budget)
    for n in batch_ops:  # the widest candidate within the op's limit before rounding
        assert got[n] == max(c for c in costs[n] if c <= unrounded[n] * (1 + 1e-9) + 1e-12)
    if not batch_ops or not all(math.isclose(got[n], costs[n][-1], rel_tol=1e-9)
                                for n in costs if n not in batch_ops):
        # the whole budget is split; with rounded ops, while any other op can take room
        assert math.isclose(total, budget * table.full, rel_tol=1e-9)
    if not calibrated and not batch_ops:  # every op the same fraction of its range
        alphas = {round((got[n] - c[0]) / (c[-1] - c[0]), 9) for n, c in costs.items()
                  if c[-1] > c[0]}
        assert len(alphas) <= 1


def test_calibrated_capacity_spends_more_of_the_budget_and_is_saved(tmp_path, zoo_converted):
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    tokens = _ids(7, batch=8, seq=6)
    budget = 0.7

    def spent() -> list[float]:
        set_budget(em, budget)
        out = []
        for i in range(0, 8, 4):
            output(em, tokens[i:i + 4])
            out.append(chosen_cost(em, table) / table.full)
        return out

    perturb_routers(inject_routers(em, "capacity", cost=table, seed=3), 3)
    try:
        before = spent()
        profile = calibrate_capacity(em, table, tokens)
        after = spent()
        assert max(after) <= budget + 1e-6 and max(before) <= budget + 1e-6
        assert sum(after) > sum(before)  # the budget is split as the routers spend it
        assert set(profile["ops"]) == set(em.ops) and profile["grid"][0] >= 0.5
        save_routers(em, tmp_path / "r", table)
        with torch.no_grad():
            set_budget(em, budget)
            want = output(em, tokens)
    finally:
        remove_routers(em)
    load_routers(em, tmp_path / "r")
    try:
        set_budget(em, budget)
        with torch.no_grad():
            assert torch.equal(output(em, tokens), want)
    finally:
        remove_routers(em)


@pytest.mark.filterwarnings("ignore:capacity routing plans")  # budgets below the cheapest
@settings(max_examples=60, deadline=None)
@given(measured=st.lists(st.floats(0.3, 1.3), min_size=3, max_size=3),
       budget=st.floats(0.05, 1.0))
@example(measured=[0.6, 0.58, 0.9], budget=0.59)  # slower, then faster: the slower kept
def test_a_measured_capacity_profile_plans_the_budget_that_measured_t(measured, budget):
    grid = [0.5, 0.75, 1.0]
    planned = measured_budget(grid, measured)(budget)
    slowest = [max(measured[:i + 1]) for i in range(3)]  # what each grid budget may take
    if budget < slowest[0]:  # below the grid: T scaled by the first point's ratio
        assert math.isclose(planned, budget * grid[0] / measured[0], rel_tol=1e-9)
    elif budget >= slowest[-1]:
        assert planned == grid[-1]
    else:  # the grid's budget whose measured time is T, interpolated
        i = max(j for j in range(3) if slowest[j] <= budget)
        assert grid[i] - 1e-9 <= planned <= grid[i + 1] + 1e-9
        at = slowest[i] + (planned - grid[i]) / (grid[i + 1] - grid[i]) \
            * (slowest[i + 1] - slowest[i])
        assert at <= budget + 1e-9
    assert planned <= measured_budget(grid, measured)(min(1.0, budget + 0.05)) + 1e-12

    costs = {"a": [1.0, 2.0, 4.0], "b": [1.0, 3.0, 5.0]}
    table = CostTable("latency", costs, fixed=1.0)
    profile = {"grid": grid, "ops": {"a": [2.0, 3.0, 4.0], "b": [2.0, 4.0, 5.0]},
               "measured": measured}
    budget = max(budget, table.minimum / table.full)
    got = capacity_shares(table, list(costs), profile)(budget)
    room = measured_budget(grid, measured)(budget) * table.full
    assert table.fixed + sum(got.values()) <= max(room, table.minimum) * (1 + 1e-9)
    with pytest.raises(WidthError, match="one positive time ratio per budget"):
        measured_budget(grid, measured[:2])


def test_capacity_calibrated_on_measured_time_plans_below_t_and_is_saved(tmp_path,
                                                                        zoo_converted):
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    tokens = _ids(5, batch=4, seq=6)
    with pytest.raises(WidthError, match="no routers to time"):
        routed_time_ratios(em, tokens)
    routers = inject_routers(em, "capacity", cost=table, seed=2)
    perturb_routers(routers, 2)
    try:
        with pytest.raises(WidthError, match="at least 1"):
            routed_time_ratios(em, tokens, reps=0)
        set_budget(em, 0.8)
        ratios = routed_time_ratios(em, tokens, batch=2, reps=2, progress=False)
        assert len(ratios) == 2 and all(r > 0 for r in ratios)
        assert all(not r.full for r in routers.values())  # timing leaves the routers deciding
        params = CostTable("params", table.costs, table.fixed)
        with pytest.raises(WidthError, match="calibrates latency budgets"):
            calibrate_capacity(em, params, tokens, timing_reps=1)
        for mode, metric in [("capacity", "params"), ("dynamic", "latency")]:
            with pytest.raises(flextron_fx.FlextronError, match="latency budgets only"):
                RouterConfig(steps=1, mode=mode, metric=metric,
                             capacity_timing_reps=3).validate()
        RouterConfig(steps=1, mode="capacity", capacity_timing_reps=3).validate()
        profile = calibrate_capacity(em, table, tokens, timing_reps=1, progress=False)
        assert len(profile["measured"]) == len(profile["grid"])
        assert budget_source(em).value == 0.8  # the budget set before is kept
        plan = max(measured_budget(profile["grid"], profile["measured"])(0.8),
                   table.minimum / table.full)  # tiny models: routing dwarfs the matmuls
        # attention ops (one width per batch) get their limit rounded to a candidate cost
        unmeasured = capacity_shares(table, list(routers),
                                     {k: v for k, v in profile.items() if k != "measured"},
                                     whole=[n for n, r in routers.items() if r.whole_batch])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, r in routers.items():  # each op's share is that of the planned budget
                assert math.isclose(r.share(0.8), unmeasured(plan)[name], rel_tol=1e-9)
        if plan == table.minimum / table.full:
            assert "below the cheapest sub-network" in str(caught[0].message)
        save_routers(em, tmp_path / "r", table)
    finally:
        remove_routers(em)
    loaded = load_routers(em, tmp_path / "r")[0]
    try:
        assert next(iter(loaded.values())).profile["measured"] == profile["measured"]
    finally:
        remove_routers(em)


def test_capacity_plans_on_the_slowest_calibration_batch(zoo_converted, monkeypatch):
    """Every batch is to stay within T, so each grid budget is charged its slowest batch's
    time, not the median batch's (fake timings: batches at 0.9, 1.0 and 1.2 x g)."""
    import flextron_fx.passes.inject_routers as ir

    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    seen = {}

    def fake(em_, tokens, batch, reps, progress=True, *, precision=None, max_reps=None):
        g = budget_source(em_).value
        seen[g] = precision
        return [0.9 * g, 1.2 * g, 1.0 * g]

    monkeypatch.setattr(ir, "routed_time_ratios", fake)
    perturb_routers(inject_routers(em, "capacity", cost=table, seed=4), 4)
    try:
        profile = calibrate_capacity(em, table, _ids(5, batch=4, seq=6), timing_reps=2,
                                     precision=0.03, progress=False)
    finally:
        remove_routers(em)
    assert profile["measured"] == pytest.approx([1.2 * g for g in profile["grid"]])
    assert set(seen) == set(profile["grid"]) and set(seen.values()) == {0.03}


def test_a_batch_with_a_noisy_ratio_gets_more_timing_rounds(zoo_converted, monkeypatch):
    """A fake clock: a full forward takes 2 units and a routed one 1, except in the last
    batch, where routed forwards take 1 and 1.5 in turn. The exact batches stop at `reps`
    rounds with ratio 0.5 and no error; the noisy one runs to `max_reps`."""
    _, em = zoo_converted("llama")
    routers = inject_routers(em, "capacity", cost=CostTable.coerce(em, width_share_costs(em)))
    tokens = _ids(7, batch=6, seq=6)
    noisy = tokens[4:]
    clock, routed_runs = [0.0], [0]

    def advance(_m, args):
        if next(iter(routers.values())).full:
            clock[0] += 2.0
        else:
            slow = torch.equal(args[0], noisy) and routed_runs[0] % 2
            routed_runs[0] += torch.equal(args[0], noisy)
            clock[0] += 1.5 if slow else 1.0

    fake_time = type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])})
    monkeypatch.setattr(timing, "time", fake_time)
    hook = em.graph_module.register_forward_pre_hook(advance)
    try:
        set_budget(em, 0.8)
        out = timing.routed_timing(em, tokens, batch=2, reps=3, progress=False,
                                   precision=0.01, max_reps=8)
        assert [b["rounds"] for b in out] == [3, 3, 8]
        assert [b["ratio"] for b in out[:2]] == [0.5, 0.5] and out[0]["se"] == 0
        assert out[2]["se"] > 0.01 and 0.5 <= out[2]["ratio"] <= 0.75
        assert timing.routed_time_ratios(em, tokens[:2], batch=2, reps=2,
                                         progress=False) == [0.5]
        assert timing.routed_timing(em, tokens[:2], batch=2, reps=2,
                                    progress=False)[0]["se"] is None  # 2 rounds: unknown
        with pytest.raises(WidthError, match="max_reps >= reps"):
            timing.routed_timing(em, tokens, reps=3, precision=0.01, max_reps=2)
    finally:
        hook.remove()
        remove_routers(em)


def test_a_calibrated_budget_is_the_widest_input_that_spent_no_more():
    source = BudgetSource()
    assert source.router_input(0.55) == 0.55  # no calibration: T itself
    source.calibration = {"inputs": [0.8, 0.2, 0.4, 0.6, 1.0],
                          "costs": [0.7, 0.5, 0.45, 0.6, 0.9]}
    for budget, want in [(0.3, 0.2), (0.44, 0.2)]:  # below every calibrated cost
        with pytest.warns(UserWarning, match="spent at least 0.450 .* will spend more"):
            assert source.router_input(budget) == want
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the calibration: no warning
        for budget, want in [(0.47, 0.4), (0.5, 0.4), (0.6, 0.6), (0.65, 0.6), (0.75, 0.8),
                             (0.95, 1.0)]:
            assert source.router_input(budget) == want
        got = source.router_input(torch.tensor([0.55, 0.95]))
    assert torch.equal(got, torch.tensor([0.4, 1.0])) and got.dtype == torch.float32


def _spent_at(em, table, tokens, budget: float) -> float:
    """The token-mean cost fraction the routers spend on `tokens` (batches of 4) at
    `budget`, read through their calibration if they have one."""
    set_budget(em, budget)
    costs = []
    for i in range(0, tokens.shape[0], 4):
        output(em, tokens[i:i + 4])
        costs.append(chosen_cost(em, table) / table.full)
    return sum(costs) / len(costs)


def _budget_following_routers(em) -> None:
    """Dynamic routers on `em` whose ops widen each at its own budget, tokens a little
    apart, so that the cost they spend climbs with the budget in many small steps."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in inject_routers(em, "dynamic", seed=3).values():
            k = torch.arange(len(r.candidates), dtype=torch.float32)
            r.w_out.weight.copy_(k[:, None].expand_as(r.w_out.weight))
            r.w_out.bias.copy_(-k * r.w_budget.numel() * (0.3 + 0.6 * torch.rand((), generator=g)))
            r.w_hidden.weight.normal_(0, 2 / r.w_hidden.in_features ** 0.5, generator=g)


@pytest.mark.filterwarnings("ignore:these dynamic routers spent at least")  # T = 0.3
def test_a_budget_calibration_keeps_dynamic_routers_within_budget_and_is_saved(
        tmp_path, zoo_converted):
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    tokens = _ids(7, batch=8, seq=6)

    def spent(budget: float) -> float:
        return _spent_at(em, table, tokens, budget)

    _budget_following_routers(em)
    source = budget_source(em)
    try:
        grid = [g / 20 for g in range(4, 21)]
        cal = calibrate_budget(em, table, tokens, grid=grid, resolution=None)
        assert cal["inputs"] == grid and source.value == 1.0  # the budget is restored
        calibrated = source.calibration
        source.calibration = None
        raw = [spent(g) for g in grid]
        assert cal["costs"] == pytest.approx(raw, abs=1e-7)  # what the routers really spend
        assert len({round(c, 9) for c in raw}) > 5  # the routers follow the budget
        source.calibration = calibrated
        for budget in [0.3, 0.5, 0.55, 0.62, 0.7, 0.8, 0.9, 1.0]:
            got = spent(budget)
            # the widest input whose calibrated cost fits
            fits = [g for g, c in zip(grid, cal["costs"]) if c <= budget]
            if not fits:  # below what the smallest input spent: that input
                assert source.value == grid[0]
                continue
            assert got <= budget + 1e-7
            assert source.value == max(fits)
            assert got == pytest.approx(raw[grid.index(max(fits))], abs=1e-7)
        # refined where a step of 0.05 moved the cost by more than 0.01: halved down to finest
        fine = calibrate_budget(em, table, tokens, grid=grid, resolution=0.01)
        added = [x for x in fine["inputs"] if x not in grid]
        assert set(grid) < set(fine["inputs"]) and added
        source.calibration = None
        assert fine["costs"] == pytest.approx([spent(x) for x in fine["inputs"]], abs=1e-7)
        for a, b, ca, cb in zip(fine["inputs"], fine["inputs"][1:], fine["costs"],
                                fine["costs"][1:]):
            assert abs(cb - ca) <= 0.01 or b - a < 2 * 0.0025  # halved down to `finest`
        source.calibration = fine
        for budget in [0.5, 0.55, 0.62, 0.7, 0.8, 0.9]:  # within T, and no less than before
            coarse = max((c for c in cal["costs"] if c <= budget), default=None)
            if coarse is not None:
                assert coarse - 1e-7 <= spent(budget) <= budget + 1e-7
        source.calibration = calibrated
        save_routers(em, tmp_path / "r", table)
        with torch.no_grad():
            set_budget(em, 0.62)
            want = output(em, tokens)
    finally:
        remove_routers(em)
    load_routers(em, tmp_path / "r")
    try:
        assert budget_source(em).calibration == calibrated
        set_budget(em, 0.62)
        with torch.no_grad():
            assert torch.equal(output(em, tokens), want)
    finally:
        remove_routers(em)
    load_routers(em, tmp_path / "r", "capacity")  # capacity routers split budgets their way
    try:
        assert budget_source(em).calibration is None
    finally:
        remove_routers(em)


def test_a_calibration_for_given_budgets_runs_fewer_inputs_and_meets_each(zoo_converted):
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    tokens = _ids(7, batch=8, seq=6)
    _budget_following_routers(em)
    source = budget_source(em)
    budgets, resolution = [0.55, 0.7, 0.82], 0.004
    try:
        full = calibrate_budget(em, table, tokens, resolution=resolution)
        aimed = calibrate_budget(em, table, tokens, resolution=resolution, budgets=budgets)
        assert len(aimed["inputs"]) < len(full["inputs"]) / 2
        coarse = [g / 100 for g in range(28, 101, 4)]
        assert set(coarse) < set(aimed["inputs"])  # the coarse grid, refined
        costs = dict(zip(aimed["inputs"], aimed["costs"]))
        source.calibration = None
        assert aimed["costs"] == pytest.approx(  # what the routers really spend
            [_spent_at(em, table, tokens, x) for x in aimed["inputs"]], abs=1e-7)
        for t in budgets:
            # as close under T as the full grid gets, or as the finest step allows
            below = max(x for x in aimed["inputs"] if costs[x] <= t)
            above = min(x for x in aimed["inputs"] if x > below)
            assert costs[above] > t and (t - costs[below] <= resolution
                                         or above - below < 2 * 0.0025)
            fine = max(c for c in full["costs"] if c <= t)
            assert costs[below] >= fine - resolution
            source.calibration = aimed
            assert _spent_at(em, table, tokens, t) == pytest.approx(costs[below], abs=1e-7)
            source.calibration = None
        # away from the budgets the coarse grid is not refined: every added input lies in a
        # step of the coarse grid whose costs enclose one of them
        for x in set(aimed["inputs"]) - set(coarse):
            a, b = max(g for g in coarse if g < x), min(g for g in coarse if g > x)
            lo, hi = sorted((costs[a], costs[b]))
            assert any(lo <= t < hi for t in budgets)
        with pytest.raises(WidthError, match="budgets are fractions"):
            calibrate_budget(em, table, tokens, budgets=[0.5, 1.5])
    finally:
        remove_routers(em)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), budget=st.floats(0.45, 1.0))
def test_capacity_mode_keeps_every_batch_within_budget(zoo_converted, arch, seed, budget):
    _, em = zoo_converted(arch)
    table = CostTable.coerce(em, width_share_costs(em))
    perturb_routers(inject_routers(em, "capacity", cost=table, seed=seed % 7), seed)
    try:
        budget = max(budget, table.minimum / table.full)
        set_budget(em, budget)
        for b in range(3):
            output(em, _ids(seed + b, batch=2 + b, seq=5 + b))
            assert chosen_cost(em, table) <= budget * table.full * (1 + 1e-6)
    finally:
        remove_routers(em)


def test_capacity_within_its_share_keeps_the_dynamic_counts():
    torch.manual_seed(0)
    router = DynamicRouter("block", (1, 2, 3, 4), dim=8, capacity=True)
    perturb_routers({"block": router}, seed=2)
    router.costs = torch.tensor([1.0, 2.0, 3.0, 4.0])
    h, ids = torch.randn(2, 9, 8), torch.zeros(2, 9, dtype=torch.long)

    def run(capacity: bool, whole_batch: bool = False, share: float = 4.0):
        router.capacity, router.whole_batch = capacity, whole_batch
        router.share = lambda budget: share
        return router(1.0, h, ids), router.last_index

    _, dynamic = run(False)
    want = torch.bincount(dynamic.flatten(), minlength=4)
    assert int((want > 0).sum()) > 1  # the tokens really differ
    _, capacity = run(True)  # the share is the widest cost: nothing has to move
    assert torch.equal(torch.bincount(capacity.flatten(), minlength=4), want)
    # one width for the batch: the widest whose cost is within the tokens' mean cost
    mean = float(router.costs[dynamic].mean())
    width, k = run(True, whole_batch=True)
    assert isinstance(k, int) and width == router.candidates[k]
    assert router.costs[k] <= mean and (k == 3 or router.costs[k + 1] > mean)
    _, k = run(True, whole_batch=True, share=2.5)  # and within a tighter share
    assert router.costs[k] <= 2.5


def test_capacity_refuses_a_budget_below_the_cheapest(routed):
    em = routed("llama", "capacity")
    table = CostTable.coerce(em, width_share_costs(em))
    set_budget(em, table.minimum / table.full * 0.9)
    with pytest.raises(ProfileError, match=f"{table.minimum / table.full:.4g}"):
        output(em, _ids())


# ---- surrogate and training --------------------------------------------------------------

def _fresh(arch: str = "llama", head_scale: float = 1.0):
    torch.manual_seed(0)
    model = ZOO[arch]()
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    return flextron_fx.flextronize(model, sample_inputs(arch), calibration(), progress=False)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_the_surrogate_target_is_the_true_loss_of_the_sampled_sub_network(zoo_converted, mode):
    _, em = zoo_converted("llama")
    ids = _ids(5, batch=4, seq=8)
    table = CostTable.coerce(em, width_share_costs(em))
    routers = inject_routers(em, mode, seed=2)
    try:
        config = RouterConfig(steps=1, mode=mode, batch=4, budget_range=(0.5, 1.0))
        dim = sum(len(r.candidates) for r in routers.values())
        from flextron_fx.route.train import _hidden_dim

        hd = _hidden_dim(em) if mode != "static" else 0
        state = RouterTraining(routers, Surrogate(dim, 16, hd or None), dim, hd, 8)
        gen = torch.Generator().manual_seed(11)
        router_step(em, state, table, ids, config, gen)
        sampled = {n: k.clone() for n, k in _choices(em).items()}
        targets = state.mem_y[:4].clone()
    finally:
        remove_routers(em)
    # the same per-token widths set by hand give the same per-sequence losses
    with em.at(sampled):
        again = sequence_losses(output(em, ids), ids)
    assert torch.equal(targets, again)
    if mode == "static":  # each sequence equals the dense model at its widths
        for b in range(4):
            widths = {n: em.ops[n].candidates[int(k[b, 0])] for n, k in sampled.items()}
            dense = em.materialize(widths)
            loss = sequence_losses(output(dense, ids[b:b + 1]), ids[b:b + 1])
            torch.testing.assert_close(targets[b:b + 1], loss, atol=1e-4, rtol=0)
    # the surrogate input was the sampled sub-network: one-hot per op (static)
    r = state.mem_r[:4]
    if mode == "static":
        assert torch.equal(r.sum(-1), torch.full((4,), float(len(em.ops))))
    assert torch.allclose(r.sum(-1), torch.full((4,), float(len(em.ops))))


@pytest.mark.parametrize("context", [False, True])
def test_a_token_level_surrogate_learns_each_tokens_true_loss(zoo_converted, context):
    """surrogate_level="token": the memory holds tokens, each with its own sampled widths
    (one-hot per op) and the true next-token loss of the sampled sub-network there; with
    `surrogate_context`, also the mean one-hots of the token and the tokens before it."""
    _, em = zoo_converted("llama")
    ids = _ids(6, batch=3, seq=8)
    table = CostTable.coerce(em, width_share_costs(em))
    routers = inject_routers(em, "dynamic", seed=2)
    n = 3 * 7  # tokens with a next token
    try:
        config = RouterConfig(steps=1, mode="dynamic", batch=3, budget_range=(0.5, 1.0),
                              surrogate_level="token", memory=8 * n,  # keeps every token
                              surrogate_context=context)
        dim = sum(len(r.candidates) for r in routers.values()) * (2 if context else 1)
        from flextron_fx.route.train import _hidden_dim, token_losses

        hd = _hidden_dim(em)
        state = RouterTraining(routers, Surrogate(dim, 16, hd), dim, hd, config.memory)
        router_step(em, state, table, ids, config, torch.Generator().manual_seed(3))
        sampled = {name: k.clone() for name, k in _choices(em).items()}
    finally:
        remove_routers(em)
    assert int(state.mem_n) == n
    with em.at(sampled):
        expected = token_losses(output(em, ids), ids)
    got = state.mem_y[:n]
    torch.testing.assert_close(got.sort().values, expected.flatten().sort().values,
                               atol=1e-5, rtol=0)
    # each remembered row is one token's decisions: a one-hot per op, matching its loss
    r = state.mem_r[:n]  # straight-through values: one-hot up to rounding
    own = r[:, :dim // 2] if context else r
    torch.testing.assert_close(own, own.round(), atol=1e-6, rtol=0)
    assert torch.equal(own.round().sum(-1), torch.full((n,), float(len(em.ops))))
    onehots = torch.cat([F.one_hot(k, len(em.ops[name].candidates))
                         for name, k in sampled.items()], -1).float()  # [batch, seq, dim]
    if context:  # position t: the mean over positions 0..t of its sequence
        before = torch.stack([onehots[:, :t + 1].mean(1) for t in range(onehots.shape[1])], 1)
        onehots = torch.cat([onehots, before], -1)
    rows = onehots[:, :-1].flatten(0, 1)
    for row, y in zip(r, got):
        t = int(((rows - row).abs().amax(-1).lt(1e-5)
                 & ((expected.flatten() - y).abs() < 1e-5)).sum())
        assert t >= 1
    with pytest.raises(flextron_fx.FlextronError, match="per-token widths"):
        RouterConfig(steps=1, mode="static", surrogate_level="token").validate()
    with pytest.raises(flextron_fx.FlextronError, match="surrogate_level='token'"):
        RouterConfig(steps=1, mode="dynamic", surrogate_context=True).validate()


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_the_surrogate_warmup_counts_steps_at_either_level(zoo_converted, level):
    """For the first `surrogate_warmup` steps only the surrogate learns (no latency loss,
    no trust), whether the memory holds sequences or tokens (a step keeps many tokens)."""
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    routers = inject_routers(em, "dynamic", seed=2)
    try:
        config = RouterConfig(steps=6, mode="dynamic", batch=3, budget_range=(0.3, 0.35),
                              surrogate_level=level, surrogate_warmup=3, memory=64,
                              surrogate_threshold=1e9)
        dim = sum(len(r.candidates) for r in routers.values())
        from flextron_fx.route.train import _hidden_dim

        hd = _hidden_dim(em)
        state = RouterTraining(routers, Surrogate(dim, 16, hd), dim, hd, config.memory)
        g = torch.Generator().manual_seed(3)
        rows = [router_step(em, state, table, _ids(s, batch=3, seq=8), config, g)[0]
                for s in range(6)]
    finally:
        remove_routers(em)
    assert [r["router_loss"] for r in rows[:3]] == [0.0] * 3
    assert not any(r["trusted"] for r in rows[:3])
    assert all(r["router_loss"] > 0 and r["trusted"] for r in rows[3:])


@pytest.mark.parametrize("budget_loss", ["hinge", "match"])
def test_budget_loss_match_pushes_routers_that_spend_under_the_budget(zoo_converted,
                                                                       budget_loss):
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    routers = inject_routers(em, "static", seed=2)
    try:
        # the surrogate never trusted: the budget loss is all the routers learn from
        config = RouterConfig(steps=1, batch=4, budget_range=(1.0, 1.0), surrogate_warmup=0,
                              surrogate_threshold=1e-12, budget_loss=budget_loss)
        dim = sum(len(r.candidates) for r in routers.values())
        state = RouterTraining(routers, Surrogate(dim, 16), dim, 0, 8)
        metrics, grads = router_step(em, state, table, _ids(5, batch=4, seq=8), config,
                                     torch.Generator().manual_seed(11))
        router_grads = [grads[p] for p in state.routers.parameters()]
    finally:
        remove_routers(em)
    # routers start with every candidate equally likely: under a budget of the full cost
    assert metrics["expected_cost"] < 1.0 and metrics["trusted"] is False
    pushed = any(bool(g.abs().sum() > 0) for g in router_grads)
    if budget_loss == "hinge":  # Eq. 8: nothing to pay, nothing to learn
        assert metrics["latency_loss"] == 0.0 and not pushed
    else:  # |E[cost] - T|: the unspent budget is the loss, and routers learn from it
        assert metrics["latency_loss"] == pytest.approx(1.0 - metrics["expected_cost"],
                                                        rel=1e-5)
        assert pushed


def _config(**kw) -> RouterConfig:
    base = {"steps": 30, "mode": "static", "batch": 8, "budget_range": (0.5, 0.8),
            "target": "excess", "surrogate_warmup": 8, "surrogate_threshold": 0.1,
            "checkpoint_every": 30}
    return RouterConfig(**{**base, **kw})


def test_router_training_lowers_latency_loss_and_the_surrogate_learns(tmp_path):
    em = _fresh(head_scale=6.0)
    tokens = self_sampled_tokens(em)
    summary = train_routers(em, tokens, tmp_path / "run", _config(), width_share_costs(em),
                            progress=False, heldout=tokens[:8], eval_budgets=(0.5, 0.8))
    rows = read_metrics(tmp_path / "run")
    assert summary["status"] == "done" and len(rows) == 30
    warm = [r["latency_loss"] for r in rows[:8]]  # routers frozen: the initial proposals
    late = [r["latency_loss"] for r in rows[-5:]]
    assert sum(warm) / len(warm) > 0.02
    assert sum(late) / len(late) < 0.5 * sum(warm) / len(warm)
    assert rows[-1]["expected_cost"] < rows[0]["expected_cost"]
    # the surrogate predicts its samples better than their mean does, and better than at
    # its first fit
    assert rows[-1]["surrogate_explained"] > 0.05
    assert rows[-1]["surrogate_explained"] > rows[1]["surrogate_explained"]
    assert any(r["trusted"] for r in rows)
    assert (tmp_path / "run" / "curves.png").is_file()
    for b, res in summary["eval"].items():  # argmax sub-networks within the budget
        assert res["cost"] <= float(b) + 0.05 and math.isfinite(res["loss"])
        assert res["within_budget"] == (res["cost"] <= float(b))
    # a budget under anything the routers spend: its argmax cost is reported over it
    low = evaluate_routers(em, tokens[:8], CostTable.coerce(em, width_share_costs(em)),
                           [0.05])["0.05"]
    assert low["cost"] > 0.05 and low["within_budget"] is False


def test_the_surrogate_can_be_trusted_by_the_variance_it_explains(tmp_path):
    em = _fresh(head_scale=6.0)
    tokens = self_sampled_tokens(em)
    config = _config(surrogate_explained=0.03, surrogate_threshold=1e-9)  # MSE never counts
    train_routers(em, tokens, tmp_path / "run", config, width_share_costs(em), progress=False)
    rows = read_metrics(tmp_path / "run")
    assert any(r["trusted"] for r in rows)
    for r in rows:
        fresh = r["surrogate_fresh_explained"]
        if r["trusted"]:
            assert fresh is not None and fresh >= 0.03
        elif r["step"] > config.surrogate_warmup:
            assert fresh is None or fresh < 0.03
    with pytest.raises(flextron_fx.FlextronError, match="share of variance"):
        _config(surrogate_explained=1.5).validate()


@pytest.mark.parametrize("mode,level", [("static", "sequence"), ("dynamic", "sequence"),
                                        ("dynamic", "token")])
def test_resume_from_a_checkpoint_continues_bit_exactly(tmp_path, zoo_converted, mode, level):
    config = _config(steps=4, mode=mode, batch=3, checkpoint_every=2, surrogate_warmup=1,
                     surrogate_threshold=10.0, surrogate_level=level, memory=64)
    _, em = zoo_converted("llama")
    tokens = self_sampled_tokens(em, n=8, seq=6)
    cost = width_share_costs(em)

    def routers():
        return {k: v.clone() for k, v in em.graph_module.state_dict().items() if "router" in k}

    try:
        train_routers(em, tokens, tmp_path / "a", config, cost, progress=False)
        whole = routers()
        remove_routers(em)
        stopped = train_routers(em, tokens, tmp_path / "b", config, cost, progress=False,
                                max_seconds=0.0)  # stops (with a checkpoint) after one step
        assert stopped["status"] == "stopped" and stopped["step"] == 1
        remove_routers(em)  # a new process: routers injected afresh, then restored
        done = train_routers(em, tokens, tmp_path / "b", config, cost, progress=False,
                             resume=True)
        assert done["status"] == "done" and done["step"] == 4
        resumed = routers()
        assert whole.keys() == resumed.keys() and whole
        for k in whole:
            assert torch.equal(whole[k], resumed[k]), k
        a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
        drop = ("elapsed_s", "tok_per_s")
        assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
            [{k: v for k, v in r.items() if k not in drop} for r in b]
        remove_routers(em)
        other = _config(steps=4, mode=mode, batch=3, checkpoint_every=2, surrogate_warmup=1,
                        surrogate_threshold=10.0, surrogate_level=level, memory=64, lr=0.5)
        with pytest.raises(flextron_fx.FlextronError, match="different settings"):
            train_routers(em, tokens, tmp_path / "b", other, cost, progress=False, resume=True)
    finally:
        remove_routers(em)


# ---- select, budgets, saving --------------------------------------------------------------

def test_select_meets_the_budget_and_refuses_an_impossible_one(routed):
    em = routed("llama", "static", seed=4)
    table = CostTable.coerce(em, width_share_costs(em), "params")
    cm = CostModel(em)
    for b in (0.5, 0.7, 1.0):
        sel = select(em, b, table, cost_model=cm)
        assert sel.fraction <= b + 1e-9
        # and the budget is spent: no op can step up one candidate and still fit
        choice = {n: em.ops[n].candidates.index(w) for n, w in sel.widths.items()}
        for n, k in choice.items():
            if k + 1 < len(em.ops[n].candidates):
                assert table.fraction({**choice, n: k + 1}) > b + 1e-9, (b, n)
        assert all(w in em.ops[n].candidates for n, w in sel.widths.items())
        assert sel.predicted["params"] == em.num_params(sel.widths)
        assert f"{b:.4g}" in str(sel)
    low = table.minimum / table.full
    with pytest.raises(ProfileError, match=f"smallest achievable is {low:.4g}"):
        select(em, low * 0.9, table)
    with pytest.raises(ProfileError, match="latency budget cannot be met"):
        select(em, Budget.parse("latency=0.6"), table)
    sel = select(em, Budget.parse("params=0.7"), table)
    assert sel.budget == pytest.approx(0.7)


def test_training_refuses_an_impossible_budget_range(tmp_path, zoo_converted):
    _, em = zoo_converted("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    low = table.minimum / table.full
    with pytest.raises(ProfileError, match=f"smallest achievable is {low:.4g}"):
        train_routers(em, _ids(batch=8), tmp_path / "r", _config(budget_range=(low / 2, 0.9)),
                      table, progress=False)
    assert not routers_of(em)


@pytest.mark.parametrize("power, fixed_share, low", [(2, 0.0, 0.4), (1, 1.0, None)])
def test_training_without_a_budget_range_starts_at_0_4_or_the_cheapest_sub_network(
        tmp_path, zoo_converted, power, fixed_share, low):
    _, em = zoo_converted("llama")
    costs = {n: [c ** power for c in row] for n, row in width_share_costs(em).items()}
    # squared width shares: the cheapest sub-network costs under 0.4; a fixed part as large
    # as every op together: over half
    table = CostTable("latency", costs, fixed=fixed_share * len(costs))
    cheapest = table.minimum / table.full
    assert (cheapest > 0.4) == (low is None)
    low = low if low is not None else math.ceil(100 * cheapest) / 100
    assert cheapest <= low < max(cheapest + 0.01, 0.4 + 1e-9)
    config = _config(steps=3, budget_range=None, checkpoint_every=1)
    tokens = self_sampled_tokens(em, n=8, seq=6)
    try:
        stopped = train_routers(em, tokens, tmp_path / "r", config, table, progress=False,
                                max_seconds=0.0)
        assert stopped["status"] == "stopped" and stopped["budget_range"] == [low, 1.0]
        saved = json.loads((tmp_path / "r" / "config.json").read_text())
        assert saved["budget_range"] == [low, 1.0]
        remove_routers(em)  # resumed with the range left out again: the same one
        done = train_routers(em, tokens, tmp_path / "r", config, table, progress=False,
                             resume=True)
        assert done["status"] == "done" and done["budget_range"] == [low, 1.0]
        budgets = [row["budget"] for row in read_metrics(tmp_path / "r")]
        assert len(budgets) == 3 and all(low <= b <= 1.0 for b in budgets)
    finally:
        remove_routers(em)


@pytest.mark.parametrize("mode", ["static", "capacity"])
def test_saved_routers_load_with_the_same_outputs(tmp_path, zoo_converted, mode):
    _, em = zoo_converted("gpt2")
    ids = _ids(6)
    table = CostTable.coerce(em, width_share_costs(em))
    perturb_routers(inject_routers(em, mode, cost=table, seed=5))
    try:
        set_budget(em, 0.7)
        before = output(em, ids)
        save_routers(em, tmp_path / "routers", table, extra={"note": 1})
    finally:
        remove_routers(em)
    _, loaded_table, meta = load_routers(em, tmp_path / "routers")
    try:
        set_budget(em, 0.7)
        assert torch.equal(output(em, ids), before)
        assert loaded_table == table and meta["extra"] == {"note": 1}
    finally:
        remove_routers(em)
    _, other = zoo_converted("llama")
    with pytest.raises(flextron_fx.CheckpointError, match="other elastic ops"):
        load_routers(other, tmp_path / "routers")


def test_a_copy_of_a_routed_graph_routes_the_same(routed):
    em = routed("llama", "dynamic")
    set_budget(em, 0.6)
    ids = _ids(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = copy.deepcopy(em.graph_module)
    assert torch.equal(output(twin, ids), output(em, ids))


def test_cli_train_routers_then_select(tmp_path, capsys):
    """`flextron train-routers` on real text (SmolLM2's tokenizer, a tiny Llama with its
    vocabulary), then `flextron select` on the run."""
    from flextron_fx.cli import main

    em = saved_real_vocab_llama(tmp_path / "elastic")
    run = tmp_path / "routers"
    args = ["train-routers", str(run), "--elastic", str(tmp_path / "elastic"), "--mode",
            "static", "--metric", "params", "--steps", "3", "--batch", "2", "--seq", "16",
            "--eval-tokens", "32", "--budget-range", "0.6", "1.0", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and set(summary["eval"]) == {"0.5", "0.6", "0.7",
                                                                     "0.8"}
    assert (run / "final" / "routers.json").is_file() and (run / "curves.png").is_file()
    assert len(read_metrics(run)) == 3
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["select", str(run), "--budget", "params=0.8", "--json",
                     str(tmp_path / "sel.json")]) == 0
    sel = json.loads((tmp_path / "sel.json").read_text())
    assert sel["fraction"] <= 0.8 and set(sel["widths"]) == set(em.ops)
    out = capsys.readouterr().out
    assert "params <= 0.8 of full" in out and "memory_bytes" in out
    assert next(iter(em.ops)) in out  # the per-op widths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["select", str(run), "--budget", "params=0.01", "--json",
                     str(tmp_path / "no.json")]) == 2
    assert "smallest achievable" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()
    assert main(["select", str(tmp_path / "elastic"), "--budget", "params=0.7"]) == 2
    assert "no trained routers" in capsys.readouterr().err
    assert main(["train-routers", str(tmp_path / "r2"), "--elastic", str(tmp_path / "elastic"),
                 "--steps", "1"]) == 2
    assert "--lut" in capsys.readouterr().err
    # joint tuning of these routers with the backbone; its final/ serves select and load
    joint = tmp_path / "joint"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["joint-tune", str(joint), "--routers", str(run), "--steps", "2",
                     "--batch", "2", "--seq", "16", "--eval-tokens", "32", "--lr", "1e-3",
                     "--no-progress"]) == 0
        assert main(["select", str(joint), "--budget", "params=0.8"]) == 0
    summary = json.loads((joint / "summary.json").read_text())
    assert summary["status"] == "done" and len(read_metrics(joint)) == 2
    # the tuned backbone records the text it was fitted to (its conversion recorded none)
    assert flextron_fx.load(joint / "final").domains_seen == {"joint-tune": ["wikipedia"]}
    # without --budget-range, the range the routers were trained on (not the table's)
    assert summary["budget_range"] == [0.6, 1.0]
    saved = json.loads((joint / "final" / "routers.json").read_text())["extra"]
    assert saved["budget_range"] == [0.6, 1.0] and saved["joint"] == str(joint)
    tuned = flextron_fx.load(joint / "final")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), em.parameters()))
    # --freeze-backbone: only the routers are saved, against the routers' own elastic model
    frozen = tmp_path / "frozen"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["joint-tune", str(frozen), "--routers", str(run), "--steps", "2",
                     "--batch", "2", "--seq", "16", "--eval-tokens", "32",
                     "--freeze-backbone", "--no-progress"]) == 0
        assert main(["select", str(frozen), "--budget", "params=0.8"]) == 0
    assert sorted(p.name for p in (frozen / "final").iterdir()) == [
        "routers.json", "routers.safetensors"]
    saved = json.loads((frozen / "final" / "routers.json").read_text())["extra"]
    assert saved["elastic"] == str(tmp_path / "elastic") and saved["joint"] == str(frozen)
    assert main(["joint-tune", str(tmp_path / "j2"), "--routers", str(tmp_path / "elastic"),
                 "--steps", "1"]) == 2
    assert "no trained routers" in capsys.readouterr().err


def test_a_static_router_learns_a_different_choice_per_budget_range():
    # The budget enters as one scalar in (0, 1]; with PyTorch's default init the hidden
    # units hardly change over 0.5-1, and SmolLM2's trained routers ignored the budget.
    torch.manual_seed(0)
    router = StaticRouter("block", (1, 2, 3, 4))
    budgets = torch.linspace(0.52, 1.0, 64)
    want = torch.where(budgets > 0.76, 3, torch.where(budgets > 0.64, 1, 0))
    opt = torch.optim.Adam(router.parameters(), lr=1e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(router.logits(budgets), want)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (router.logits(budgets).argmax(-1) == want).float().mean() > 0.9


def test_a_dynamic_router_learns_a_different_choice_per_budget_range():
    # Eq. 11 as printed (T * W with W ~ N(0, 1/U), no bias) moves each hidden unit by
    # about 0.05 over budgets 0.5-1 while the token term moves it by about 0.6: the
    # budget was drowned. Same target as the static router's test, one token per budget.
    torch.manual_seed(0)
    router = DynamicRouter("block", (1, 2, 3, 4), dim=32)
    # Fresh tokens every step, so only the budget can predict the target.
    budgets = torch.linspace(0.52, 1.0, 64)
    want = torch.where(budgets > 0.76, 3, torch.where(budgets > 0.64, 1, 0))
    opt = torch.optim.Adam(router.parameters(), lr=1e-3)
    for _ in range(200):
        h = torch.randn(64, 1, 32)
        loss = torch.nn.functional.cross_entropy(router.logits(budgets, h)[:, 0], want)
        opt.zero_grad()
        loss.backward()
        opt.step()
    chosen = router.logits(budgets, torch.randn(64, 1, 32))[:, 0].argmax(-1)
    assert (chosen == want).float().mean() > 0.9


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), budget=st.floats(0.05, 1.0), batch=st.integers(1, 3),
       seq=st.integers(1, 5))
def test_a_dynamic_routers_inference_path_gives_the_same_logits(seed, budget, batch, seq):
    """Without autograd and with one budget, a router computes its logits in fewer
    operations (decoding calls one per block and token): the same logits bit for bit,
    also after its weights change in place."""
    from flextron_fx.route.routers import _budget_tensor

    torch.manual_seed(seed)
    router = DynamicRouter("block", (1, 2, 3, 4), dim=16, units=8)
    for _ in range(2):
        perturb_routers({"r": router}, seed=seed)
        h = torch.randn(batch, seq, 16)
        with torch.no_grad():
            slow = router.logits(_budget_tensor(budget, batch, h.device), h)
            assert torch.equal(router._logits_at(budget, h), slow)
            assert torch.equal(router(budget, h, h[..., 0]), slow.argmax(-1))


def test_a_dynamic_router_started_from_a_static_one_makes_its_choices_and_can_learn():
    torch.manual_seed(0)
    static = StaticRouter("block", (1, 2, 3, 4))
    perturb_routers({"block": static}, seed=2)
    dynamic = DynamicRouter("block", (1, 2, 3, 4), dim=32)
    perturb_routers({"block": dynamic}, seed=3)
    dynamic.start_from(static)
    budgets = torch.linspace(0.3, 1.0, 16)
    h = 10 * torch.randn(16, 5, 32)  # whatever the tokens, the static router's logits
    want = static.logits(budgets)[:, None, :].expand(16, 5, 4)
    torch.testing.assert_close(dynamic.logits(budgets, h), want, atol=1e-5, rtol=0)
    # and the token term learns: its gradient is not zero
    dynamic.logits(budgets, h)[..., 0].sum().backward()
    assert dynamic.w_hidden.weight.grad.abs().sum() > 0
    with pytest.raises(WidthError, match="chooses among"):
        DynamicRouter("block", (1, 2, 4), dim=32).start_from(static)
    with pytest.raises(WidthError, match="units >= 64"):
        DynamicRouter("block", (1, 2, 3, 4), dim=32, units=16).start_from(static)


def test_a_dynamic_run_starts_from_a_saved_static_run(tmp_path, zoo_converted):
    _, em = zoo_converted("llama")
    tokens = self_sampled_tokens(em, n=8, seq=6)
    table = CostTable.coerce(em, width_share_costs(em))
    perturb_routers(inject_routers(em, "static", cost=table, seed=5), seed=5)
    try:
        save_routers(em, tmp_path / "static" / "final", table)
        ids = _ids(3)
        wanted = {}
        for b in (0.5, 0.8):
            set_budget(em, b)
            output(em, ids)
            wanted[b] = _choices(em)
    finally:
        remove_routers(em)
    config = _config(steps=1, mode="dynamic", batch=3, lr=1e-12, surrogate_warmup=1,
                     init_from=str(tmp_path / "static"))
    try:
        train_routers(em, tokens, tmp_path / "dynamic", config, table, progress=False)
        assert budget_source(em).calibration is not None  # calibrated at the end
        budget_source(em).calibration = None  # the routers read T itself again
        for b in (0.5, 0.8):  # every token gets the static router's width
            set_budget(em, b)
            output(em, ids)
            for name, k in _choices(em).items():
                assert torch.equal(k, torch.full((BATCH, SEQ), wanted[b][name])), (b, name)
    finally:
        remove_routers(em)
    with pytest.raises(flextron_fx.CheckpointError, match="holds dynamic routers"):
        save_dir = tmp_path / "dynamic-saved"
        perturb_routers(inject_routers(em, "dynamic", seed=1))
        try:
            save_routers(em, save_dir, table)
        finally:
            remove_routers(em)
        bad = _config(steps=1, mode="dynamic", batch=3, init_from=str(save_dir))
        train_routers(em, tokens, tmp_path / "bad", bad, table, progress=False)
    assert not routers_of(em)
    with pytest.raises(flextron_fx.FlextronError, match="starts from scratch"):
        _config(init_from=str(tmp_path / "static")).validate()


@pytest.mark.parametrize("seen, warned", [({"calibration": ["html"]}, True),
                                          ({"calibration": ["html"],
                                            "train-elastic": ["wikipedia"]}, False),
                                          ({}, False)])
def test_train_routers_warns_of_text_the_widths_were_never_fitted_to(tmp_path, seen, warned):
    """Routers trained on a domain that neither the calibration nor the elastic training of
    the model saw get a warning naming it and the way out; a model whose record is empty
    (converted by the Python API) gets none."""
    from flextron_fx.cli import main

    em = saved_real_vocab_llama(tmp_path / "elastic")
    em.domains_seen = seen
    flextron_fx.save(em, tmp_path / "elastic")
    assert flextron_fx.load(tmp_path / "elastic").domains_seen == seen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train-routers", str(tmp_path / "run"), "--elastic",
                     str(tmp_path / "elastic"), "--metric", "params", "--steps", "1",
                     "--batch", "1", "--seq", "16", "--eval-tokens", "16", "--budget-range",
                     "0.6", "1.0", "--no-progress"]) == 0
    ours = [str(w.message) for w in caught if "was fitted to other text" in str(w.message)]
    assert len(ours) == warned
    if warned:
        assert "calibration: html" in ours[0] and "than wikipedia" in ours[0]
        assert "--calib-domains wikipedia" in ours[0]
