"""The graph-level profiler on every zoo architecture, and drift-robust validation.

A fake clock makes the arithmetic exact: time advances only when an elastic block's
region runs (by a known cost of its width) and when the whole graph is entered (a known
fixed cost), so the table must hold exactly those costs, and validation must report
exactly the errors a known change of machine speed causes. Real-clock runs check only
structure (timings of tiny models are noise)."""

from __future__ import annotations

import collections
import contextlib
import json
import random

import numpy as np
import pytest
import torch
from zoo import ZOO

import flextron_fx
from flextron_fx import cli
from flextron_fx.elastic.ops import ElasticRegion
from flextron_fx.errors import ProfileError, UnsupportedModelError
from flextron_fx.profiler import CostModel, LatencyTable, ProfileConfig, check, profile
from flextron_fx.profiler.commands import summary
from flextron_fx.profiler.graphrun import GraphModel, _first_tensor, block_extents
from flextron_fx.profiler.measure import fit_whole

NAMES = sorted(ZOO)
FIXED = 3.0  # ms the fake clock adds per whole-graph forward: embedding, norms, head, glue


def block_cost(kind: str, width: int) -> float:
    """Fake ms of a block at `width` heads or neurons: grows with width."""
    return 1.0 + 0.5 * width if kind == "attention" else 0.5 + 0.01 * width


class FakeClock:
    """Milliseconds that pass only through `advance`, scaled by `rate` (the machine's
    slowness); `per_forward` adds to `rate` at every whole-graph forward (drift)."""

    def __init__(self):
        self.now, self.rate, self.per_forward = 0.0, 1.0, 0.0

    def advance(self, ms: float) -> None:
        self.now += ms * self.rate

    def mark(self):
        return self.now

    def sync(self) -> None:
        pass

    @staticmethod
    def ms(start, end) -> float:
        return end - start


@contextlib.contextmanager
def fake_costs(em, clock: FakeClock):
    """Hooks that advance `clock` by the block costs and the fixed cost of a forward."""
    handles = []
    gm = em.graph_module
    for mod in gm.modules():
        if isinstance(mod, ElasticRegion):
            handles.append(mod.register_forward_hook(
                lambda m, args, out: clock.advance(block_cost(m.kind, args[1]))))

    def whole(_m, _args):
        clock.rate += clock.per_forward
        clock.advance(FIXED)

    handles.append(gm.register_forward_pre_hook(whole))
    try:
        yield clock
    finally:
        for h in handles:
            h.remove()


def predicted_by_hand(em, widths) -> float:
    return FIXED + sum(block_cost(op.kind, widths[n]) for n, op in em.ops.items())


CONFIG = ProfileConfig(shapes="1x8", threads=1, repeats=2, warmup=1)


@pytest.mark.parametrize("name", NAMES)
def test_the_graph_table_holds_each_blocks_cost_exactly(name, zoo_converted):
    """Fake clock: every op has an entry for every candidate, equal to its block's cost
    (so entries grow with width), the fixed part is the rest of a forward, and the cost
    model predicts any sub-network exactly."""
    _, em = zoo_converted(name)
    with fake_costs(em, FakeClock()) as clock:
        table = profile(em, CONFIG, progress=False, clock=clock)
    assert "split into one partition per block" in table.data["settings"]["method"]
    for n, op in em.ops.items():
        ent = table.data["entries"][table.row_of(n)]["1x8"]
        assert sorted(int(w) for w in ent) == sorted(op.candidates)
        for w in op.candidates:
            assert table.op_latency(n, w, "1x8") == pytest.approx(block_cost(op.kind, w))
        costs = [table.op_latency(n, w, "1x8") for w in sorted(op.candidates)]
        assert costs == sorted(costs) and costs[0] < costs[-1]
    assert table.fixed_ms("1x8") == pytest.approx({"other": FIXED})
    cost = CostModel(em, table)
    rng = random.Random(name)
    for _ in range(5):
        widths = {n: rng.choice(op.candidates) for n, op in em.ops.items()}
        assert cost.latency(widths) == pytest.approx(predicted_by_hand(em, widths))
    full = predicted_by_hand(em, em.full_widths())
    assert table.full_ms("1x8") == pytest.approx(full)
    assert table.data["full"]["1x8"]["measured_ms"] == pytest.approx(full)
    for a in table.data["anchors"]["1x8"]:
        assert a["predicted_fraction"] == pytest.approx(a["measured_fraction"])
    assert em.widths == em.full_widths()  # the profiler gives the widths back


def test_blocks_that_cost_more_in_the_whole_forward_are_scaled_to_it(zoo_converted):
    """Each forward costs 25 % of its blocks' hooked time more, outside the hooks (as a
    per-call overhead that grows with the work does). A constant "other" would then
    overprice small sub-networks next to the full one; the fitted scale is 1.25 and the
    table predicts every sub-network's whole forward exactly."""
    _, em = zoo_converted("llama")
    clock = FakeClock()
    with fake_costs(em, clock):
        hook = em.graph_module.register_forward_pre_hook(lambda _m, _a: clock.advance(
            0.25 * (predicted_by_hand(em, em.widths) - FIXED)))
        try:
            table = profile(em, CONFIG, progress=False, clock=clock)
        finally:
            hook.remove()
    assert table.data["block_scale"]["1x8"] == pytest.approx(1.25)
    assert table.fixed_ms("1x8") == pytest.approx({"other": FIXED})
    cost = CostModel(em, table)
    rng = random.Random(0)
    for _ in range(5):
        widths = {n: rng.choice(op.candidates) for n, op in em.ops.items()}
        whole = FIXED + 1.25 * (predicted_by_hand(em, widths) - FIXED)
        assert cost.latency(widths) == pytest.approx(whole)


def test_one_slow_anchor_does_not_swing_the_block_scale():
    """Twelve grid points on other 3 + 1.2 x blocks, one of them ten times slower (a
    noisy real clock on a tiny model): the scale stays 1.2 and "other" 3 (median of the
    residuals). Anchors that fit no plausible scale (slope 5) give scale 1."""
    ops = np.linspace(2.0, 6.0, 12)
    rest = 3.0 + 1.2 * ops
    rest[5] *= 10
    scale, other = fit_whole(ops, rest)
    assert scale == pytest.approx(1.2) and float(np.median(other)) == pytest.approx(3.0)
    assert fit_whole(ops, 5 * ops)[0] == 1.0
    assert fit_whole(ops[:2], rest[:2])[0] == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_a_real_graph_table_is_built_for_every_architecture(name, zoo_converted):
    """Real clock, structure only: every block is one partition, every op has an entry at
    every candidate, and the full model's prediction is near what was measured."""
    _, em = zoo_converted(name)
    extents = block_extents(em)
    assert set(extents) == set(em.ops)
    assert all(extents[a].isdisjoint(extents[b]) for a in extents for b in extents if a != b)
    gr = GraphModel(em)
    assert set(gr.blocks) == set(em.ops)
    smallest = {n: op.candidates[0] for n, op in em.ops.items()}
    gr.set(smallest)  # blocks run as static programs of these widths, computing the same
    assert all("forward" in mod.__dict__ for mod in gr.blocks.values())
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(_first_tensor(gr.split(ids)), _first_tensor(em(ids)),
                                   atol=1e-5, rtol=0)
    em.set_full()
    table = profile(em, ProfileConfig(shapes="1x8", threads=1, repeats=1, warmup=1),
                    progress=False)
    for n, op in em.ops.items():
        for w in op.candidates:
            e = table.data["entries"][table.row_of(n)]["1x8"][str(w)]
            assert e["median_ms"] > 0 and e["p25_ms"] <= e["median_ms"] <= e["p75_ms"]
    measured = [a["measured"]["median_ms"] for a in table.data["anchors"]["1x8"]]
    assert min(measured) / 3 < CostModel(em, table).latency(None) < 3 * max(measured)


def test_decode_is_refused_clearly_where_there_is_no_cache(zoo_converted, capsys):
    _, em = zoo_converted("bert")
    with pytest.raises(UnsupportedModelError, match="decode is unavailable.*Prefill"):
        profile(em, ProfileConfig(mode="decode", shapes="1x4", repeats=1), progress=False)
    with fake_costs(em, FakeClock()) as clock:
        table = profile(em, CONFIG, progress=False, clock=clock)
    assert table.data["settings"]["decode"].startswith("unavailable: ")
    assert "decode: unavailable" in summary(table)
    for name in ("llama", "gpt2", "opt"):  # source classes with a key/value cache
        _, decoder = zoo_converted(name)
        with fake_costs(decoder, FakeClock()) as clock:
            assert profile(decoder, CONFIG, progress=False,
                           clock=clock).data["settings"]["decode"] == "available"


def _fake_table(em):
    with fake_costs(em, FakeClock()) as clock:
        return profile(em, CONFIG, progress=False, clock=clock)


def test_a_uniformly_slower_machine_keeps_the_ratios_exact(zoo_converted):
    """Checked on a machine 1.5x slower than when profiled: every absolute error is
    1/1.5 - 1, every ratio error is zero."""
    _, em = zoo_converted("gpt_neox")
    table = _fake_table(em)
    clock = FakeClock()
    clock.rate = 1.5
    with fake_costs(em, clock):
        r = check(em, table, n=5, repeats=2, warmup=1, progress=False,
                  clock=clock)["shapes"]["1x8"]
    full = predicted_by_hand(em, em.full_widths())
    for p in r["points"]:
        widths = dict(zip(em.ops, p["widths"]))
        assert p["measured_ms"] == pytest.approx(1.5 * predicted_by_hand(em, widths))
        assert p["rel_error"] == pytest.approx(1 / 1.5 - 1)
        assert p["predicted_ratio"] == pytest.approx(predicted_by_hand(em, widths) / full)
        assert p["measured_ratio"] == pytest.approx(p["predicted_ratio"])
        assert p["ratio_error"] == pytest.approx(0, abs=1e-12)
    assert r["random"]["median_abs_ratio_error"] == pytest.approx(0, abs=1e-12)
    assert r["random"]["median_abs_rel_error"] == pytest.approx(1 - 1 / 1.5)


@pytest.mark.parametrize("warmup", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_drift_during_the_check_cancels_in_the_ratio(warmup, zoo_converted):
    """The machine slows by 1 % of its speed at every forward: absolute errors grow to
    tens of percent, but every network sits midway between the two full forwards beside
    it, so its ratio to them is exact."""
    _, em = zoo_converted("opt")
    table = _fake_table(em)
    clock = FakeClock()
    clock.per_forward = 0.01
    with fake_costs(em, clock):
        r = check(em, table, n=5, repeats=3, warmup=warmup, progress=False,
                  clock=clock)["shapes"]["1x8"]
    assert r["all"]["worst_abs_rel_error"] > 0.3
    assert r["all"]["worst_abs_ratio_error"] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("noisy_are", ["smallest", "all but the smallest"])
def test_networks_with_noisy_ratios_get_more_rounds(noisy_are, zoo_converted):
    """The forwards of noisy networks take 0 or 1 x FIXED ms longer (in turn, per network;
    the runner's untimed forwards count, three per round); the others' are exact.

    Only the smallest network noisy: it gets rounds beyond `repeats`, up to
    `max_repeats`; the others stop at `repeats`, their ratios exact. All but the smallest
    noisy: the machine is noisy, so the smallest, whose rounds agree, gets as many rounds
    as the rest (its spread is floored at the median spread of all networks)."""
    _, em = zoo_converted("llama")
    table = _fake_table(em)
    smallest = tuple(min(op.candidates) for op in em.ops.values())
    clock = FakeClock()
    forwards = collections.Counter()

    def noise(_m, _a):
        key = tuple(em.widths.values())
        if (key == smallest) == (noisy_are == "smallest"):
            clock.advance(FIXED * (forwards[key] % 2))
            forwards[key] += 1

    with fake_costs(em, clock):
        hook = em.graph_module.register_forward_pre_hook(noise)
        try:
            r = check(em, table, n=6, repeats=3, warmup=1, precision=0.01, max_repeats=7,
                      progress=False, clock=clock)
        finally:
            hook.remove()
    points = r["shapes"]["1x8"]["points"]
    small = [p for p in points if tuple(p["widths"]) == smallest]
    others = [p for p in points if tuple(p["widths"]) != smallest]
    assert small and others
    assert r["max_repeats"] == 7
    if noisy_are == "smallest":
        assert all(p["rounds"] == 7 and p["ratio_se"] > 0.01 for p in small)
        assert all(p["rounds"] == 3 and p["ratio_se"] < 1e-12 for p in others)
        assert all(p["ratio_error"] == pytest.approx(0, abs=1e-12) for p in others)
        assert r["shapes"]["1x8"]["all"]["rounds"] == [3, 7]
    else:
        assert all(p["measured_p75_ms"] - p["measured_p25_ms"] < 1e-9 for p in small)
        assert all(p["rounds"] == 7 for p in points)
    with pytest.raises(ProfileError, match="max_repeats >= repeats"):
        check(em, table, repeats=3, max_repeats=2, progress=False)


def test_profile_check_on_gpt2_reports_ratio_and_absolute_errors(zoo_converted, tmp_path,
                                                                 capsys):
    """The commands end to end on GPT-2: prefill measures the graph (no Llama-style class
    needed), and the table says that decode can be measured too (in the GPT-2 class)."""
    _, em = zoo_converted("gpt2")
    run = flextron_fx.save(em, tmp_path / "run")
    lut, out = tmp_path / "lut.json", tmp_path / "check.json"
    assert cli.main(["profile", str(run), "--shapes", "1x16", "--threads", "1", "--repeats",
                     "2", "--json", str(lut), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "decode: available" in printed and "mlp[" in printed
    assert "block entries = hooked times x" in printed
    assert cli.main(["profile-check", str(run), "--lut", str(lut), "--n", "4", "--repeats",
                     "2", "--precision", "0", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ratio to full: median |err|" in printed
    # two rounds leave a ratio's spread unknown: said so, and null in strict JSON
    assert "worst standard error of a measured ratio unknown" in printed

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    r = json.loads(out.read_text(), parse_constant=strict)["shapes"]["1x16"]
    assert all(p["ratio_se"] is None for p in r["points"])
    assert r["random"]["worst_ratio_se"] is None
    table = LatencyTable.load(lut)
    cost = CostModel(flextron_fx.load(run), table)
    for p in r["points"]:
        widths = dict(zip(em.ops, p["widths"]))
        assert p["predicted_ratio"] == pytest.approx(cost.fraction("latency", widths))
        assert p["ratio_error"] == pytest.approx(p["predicted_ratio"] / p["measured_ratio"] - 1)
    assert r["random"]["n"] == 4 and r["random"]["worst_abs_ratio_error"] >= 0
