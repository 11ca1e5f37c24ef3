"""How well a latency table predicts whole sub-networks: measure some, compare.

`check(em, table)` draws N random sub-networks whose predicted latency spreads evenly over
`low`..100 % of the full model (each starts at full width and shrinks randomly chosen ops
one candidate at a time until it is under its target), adds the uniform-width ones (the
grid the table was measured on), measures all of them end to end on the table's backend,
dtype and shapes, and reports predicted against measured, per group: median and worst
error of the latency *ratio* to the full model, median and worst absolute error (ms), and
the Spearman rank correlation. The random group is the honest test: the uniform ones are
the table's own anchors.

Why ratios. Budgets are fractions of the full model, and a machine's speed drifts (load,
clocks, thermals): the full SmolLM2 once took 450 ms while a table was measured and 605 ms
minutes later. So every network is timed right between two forwards of the full model
(full, net a, full, net b, full, ... in rounds; warm-up forwards only the first time a
network runs), and its measured ratio is the median over rounds of its time over the mean
of those two. A change of speed slower than a few forwards cancels in that ratio; the
absolute error still shows it. (onnxruntime exports one network at a time, so there the
ratio is to the full model's median.)

Why more rounds for some networks. A shared machine also has fast noise: one forward of
SmolLM2 at 1x256 varied from 670 to 1210 ms within a minute, so the ratio of one pair is
off by 10-15 % and a median of 5 by up to 8 %. With `precision`, every network whose
ratio's standard error (from the spread of its pair ratios) is above it gets more rounds,
up to `max_repeats`; each point records its rounds and standard error.
"""

from __future__ import annotations

import random
import textwrap

import numpy as np
import torch

from .._atomic import savefig_atomic
from ..elastic.model import ElasticModel
from ..errors import ProfileError
from . import onnxrt
from .backends import get_backend
from .cost import CostModel
from .measure import (
    METHODS,
    _bar,
    _load_average,
    build_runtime,
    busy_warning,
    make_runner,
    method_for,
    programs_kept,
    quiet_gc,
    uniform_grid,
)
from .runtime import Runner
from .table import LatencyTable, describe_shape, model_signature, parse_shapes, shape_key


def sample_subnetworks(cost: CostModel, n: int, *, low: float = 0.4, seed: int = 0,
                       shape=None) -> list[dict[str, int]]:
    """`n` distinct random per-op widths with predicted latency spread over [low, 1] of full
    (or over what the smallest sub-network allows, when that is above `low`)."""
    rng = random.Random(seed)
    em = cost.em
    names = list(em.ops)
    full = cost.latency(None, shape)
    smallest = cost.latency({k: em.ops[k].candidates[0] for k in names}, shape) / full
    lo = max(low, smallest)
    out, seen = [], set()
    for j in range(n):
        target = lo + (1 - lo) * (j + 0.5) / n
        for _ in range(50):
            idx = {k: len(em.ops[k].candidates) - 1 for k in names}
            widths = em.full_widths()
            while cost.latency(widths, shape) / full > target:
                can = [k for k in names if idx[k] > 0]
                if not can:
                    break
                k = rng.choice(can)
                idx[k] -= 1
                widths[k] = em.ops[k].candidates[idx[k]]
            key = tuple(widths.values())
            if key not in seen:
                break
        seen.add(key)
        out.append(widths)
    return out


def spearman(a, b) -> float | None:
    """Rank correlation (tied values share their mean rank); None where it is undefined
    (all predictions or all times equal)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(a: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(a))
    ranks[np.argsort(a, kind="stable")] = np.arange(len(a), dtype=float)
    for v in np.unique(a):
        tied = a == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def metrics(points: list[dict]) -> dict:
    if not points:
        return {"n": 0}
    err = np.abs([p["rel_error"] for p in points])
    ratio = np.abs([p["ratio_error"] for p in points])
    pred = [p["predicted_ms"] for p in points]
    meas = [p["measured_ms"] for p in points]
    frac = [p["measured_fraction"] for p in points]
    return {"n": len(points), "median_abs_rel_error": float(np.median(err)),
            "worst_abs_rel_error": float(err.max()),
            "median_abs_ratio_error": float(np.median(ratio)),
            "worst_abs_ratio_error": float(ratio.max()),
            "spearman": spearman(pred, meas) if len(points) > 2 else None,
            "rounds": [min(p["rounds"] for p in points), max(p["rounds"] for p in points)],
            # None when some network ran fewer than 3 rounds: its spread is unknown
            "worst_ratio_se": (None if any(p["ratio_se"] is None for p in points)
                               else max(p["ratio_se"] for p in points)),
            "measured_fraction_range": [float(min(frac)), float(max(frac))]}


def check(em: ElasticModel, table: LatencyTable, *, n: int = 30, seed: int = 0,
          low: float = 0.4, repeats: int = 5, warmup: int = 2, shapes=None,
          precision: float | None = None, max_repeats: int | None = None,
          progress: bool = True, clock=None) -> dict:
    """Predicted vs measured latency of random and uniform sub-networks: absolute (ms) and
    as a ratio to the full model measured right beside each of them.

    Every network gets `repeats` rounds; with `precision` (a relative standard error,
    e.g. 0.02), those whose measured ratio is less certain get more, up to `max_repeats`
    rounds (default 4 x `repeats`; interleaved runtimes only: onnxruntime times each
    network in one block of `repeats`). The table must match this machine, the model and (if
    given) `shapes`. `clock` replaces the backend's clock (tests inject a fake one).

    Example:
        >>> r = check(em, LatencyTable.load("lut.json"), n=30)                # doctest: +SKIP
        >>> r["shapes"]["1x256"]["random"]["median_abs_ratio_error"]         # doctest: +SKIP
        0.021
    """
    max_repeats = max_repeats if max_repeats is not None else (
        4 * repeats if precision is not None else repeats)
    if repeats < 1 or max_repeats < repeats:
        raise ProfileError(f"repeats must be >= 1 and max_repeats >= repeats (--repeats, "
                           f"--max-repeats), got {repeats} and {max_repeats}")
    if precision is not None and not 0 < precision < 1:
        raise ProfileError(f"precision is a relative standard error such as 0.02, got "
                           f"{precision}")
    fp = table.fingerprint
    backend = get_backend(fp["backend"])
    clock = clock if clock is not None else backend.clock()
    threads = int(fp["machine"].get("threads") or torch.get_num_threads())
    keys = [shape_key(s) for s in (parse_shapes(shapes) if isinstance(shapes, str)
                                   else shapes or table.shapes)]
    table.require(machine=backend.machine(threads), model=model_signature(em), shapes=keys)
    busy_warning(print if progress else (lambda _msg: None))
    before = torch.get_num_threads()
    before_widths = em.widths
    torch.set_num_threads(threads)
    method = method_for(em, backend, table.mode, fp["dtype"])
    try:
        cost = CostModel(em, table)
        net = build_runtime(em, method, table.mode, fp["dtype"], backend.device)
        out = {"table": table.source, "fingerprint": fp, "n": n, "seed": seed, "low": low,
               "repeats": repeats, "max_repeats": max_repeats, "precision": precision,
               "method": METHODS[method],
               "interleaved": method != "onnxruntime", "shapes": {}}
        grid = uniform_grid(em)
        full_index = next(i for i, (_, w) in enumerate(grid) if w == em.full_widths())
        for key in keys:
            nets = [("uniform", label, w) for label, w in grid]
            nets += [("random", f"random {j}", w)
                     for j, w in enumerate(sample_subnetworks(cost, n, low=low, seed=seed,
                                                              shape=key))]
            shape = parse_shapes(key)[0]
            if method == "onnxruntime":
                runner = Runner(net, clock, table.mode, shape, seed=seed)
                bar = _bar(repeats * len(nets), 0, progress, f"check {key}")
                times = onnxrt.time_networks(net, nets, runner, threads=threads,
                                             repeats=repeats, warmup=warmup, bar=bar)
                full = float(np.median(times[full_index]))
                ratios = {i: [t / full for t in ts] for i, ts in times.items()}
            else:
                runner = make_runner(net, clock, table.mode, shape, seed)
                bar = _bar(repeats * len(nets), 0, progress, f"check {key}")
                with programs_kept(em, len(nets)):
                    times, ratios = time_beside_full(net, runner, nets, full_index,
                                                     repeats, warmup, bar,
                                                     precision=precision,
                                                     max_repeats=max_repeats)
            bar.close()
            if method != "graph":
                net.set(em.full_widths())
            out["shapes"][key] = _compare(em, table, cost, key, nets, times, ratios,
                                          full_index)
    finally:
        torch.set_num_threads(before)
        em.set_widths(before_widths)
    out["load_average"] = _load_average()
    return out


def _compare(em, table, cost, key, nets, times, ratios, full_index) -> dict:
    """Points and metrics of one shape from measured times and ratios."""
    full_ms = float(np.median(times[full_index]))
    floor = pooled_sigma(ratios)
    full_pred = cost.latency(None, key)
    points = []
    for i, (group, label, widths) in enumerate(nets):
        t = np.asarray(times[i])
        pred = cost.latency(widths, key)
        med = float(np.median(t))
        ratio = float(np.median(ratios[i]))
        points.append({
            "group": group, "label": label, "widths": list(widths.values()),
            "predicted_ms": pred, "measured_ms": med,
            "measured_p25_ms": float(np.percentile(t, 25)),
            "measured_p75_ms": float(np.percentile(t, 75)),
            "rel_error": pred / med - 1, "measured_fraction": med / full_ms,
            "predicted_ratio": pred / full_pred, "measured_ratio": ratio,
            "ratio_error": (pred / full_pred) / ratio - 1,
            "rounds": len(t), "ratio_se": _finite(ratio_se(ratios[i], floor)),
            "params_fraction": cost.fraction("params", widths)})
    anchor = next((a["measured"]["median_ms"] for a in table.data["anchors"].get(key, [])
                   if a["widths"] == list(em.full_widths().values())), None)
    return {"describe": describe_shape(table.mode, key), "full_measured_ms": full_ms,
            "full_measured_when_profiled_ms": anchor, "full_predicted_ms": full_pred,
            "points": points,
            **{g: metrics([p for p in points if p["group"] == g])
               for g in ("random", "uniform")},
            "all": metrics(points)}


def _finite(x: float) -> float | None:
    """None for an infinite value (JSON has no infinity)."""
    return x if np.isfinite(x) else None


def ratio_sigma(ratios) -> float:
    """Relative spread of one network's pair ratios: a normal's sigma from the interquartile
    range (IQR / 1.349) over the median; infinite below 3 values."""
    r = np.asarray(ratios, dtype=float)
    if len(r) < 3:
        return float("inf")
    q25, q50, q75 = np.percentile(r, [25, 50, 75])
    return float((q75 - q25) / 1.349 / q50)


def ratio_se(ratios, floor: float = 0.0) -> float:
    """Relative standard error of the median of `ratios` (1.2533 sigma / sqrt n), with
    sigma at least `floor`: the machine's noise, pooled over all networks, so that a few
    rounds that agree by luck do not pass for a precise ratio."""
    return float(1.2533 * max(ratio_sigma(ratios), floor) / np.sqrt(max(len(ratios), 1)))


def pooled_sigma(ratios: dict) -> float:
    """The median over networks of their ratios' relative spread (`ratio_sigma`)."""
    sigmas = [ratio_sigma(r) for r in ratios.values() if len(r) >= 3]
    return float(np.median(sigmas)) if sigmas else 0.0


def time_beside_full(net, runner, nets, full_index, repeats, warmup, bar, *,
                     precision=None, max_repeats=None):
    """Every network timed right after and before the full model, in rounds:
    full, net a, full, net b, full, ... (the order of the nets alternates between rounds).

    `warmup` warm-up forwards the first time each network runs (round one), none later:
    the first forward after a switch measured no slower than the second on SmolLM2
    (median 0.93 over 24 switches, prefill 1x256). After `repeats` rounds, with
    `precision`, further rounds (up to `max_repeats`) time only the networks whose ratio's
    standard error (`ratio_se`, its spread floored at the median spread over all
    networks) is still above it.

    Returns ({i: [ms per round]}, {i: [ms / mean of the two full forwards beside it]}):
    a drift of the machine's speed slower than one forward cancels in the ratio.
    """
    times: dict[int, list[float]] = {i: [] for i in range(len(nets))}
    ratios: dict[int, list[float]] = {i: [] for i in range(len(nets))}
    full_widths = nets[full_index][2]
    max_repeats = repeats if max_repeats is None else max_repeats

    def timed(i, widths, first):
        net.set(widths)
        runner.prepare(i)
        for _ in range(warmup if first else 0):
            runner.run(i)
        return runner.run(i)

    def unsettled():
        if precision is None:
            return []
        floor = pooled_sigma(ratios)
        return [i for i in range(len(nets)) if ratio_se(ratios[i], floor) > precision]

    for r in quiet_gc(range(max_repeats)):
        order = list(range(len(nets))) if r < repeats else unsettled()
        if not order:
            break
        if r >= repeats:
            bar.total += len(order)
            bar.refresh()
        if r % 2:
            order.reverse()
        before = timed(full_index, full_widths, r == 0)
        for i in order:
            t = timed(i, nets[i][2], r == 0)
            after = timed(full_index, full_widths, False)
            times[i].append(t)
            ratios[i].append(t / ((before + after) / 2))
            before = after
            bar.update(1)
    return times, ratios


def report(result: dict) -> str:
    """A few lines per shape: the numbers the acceptance criteria ask for."""
    fp = result["fingerprint"]
    lines = [(f"latency table {result['table']}: {fp['backend']}, {fp['dtype']}, "
              f"{fp['machine'].get('threads')} threads")]
    for r in result["shapes"].values():
        then = r.get("full_measured_when_profiled_ms")
        drift = (f" (when profiled: {then:.2f} ms, {r['full_measured_ms'] / then - 1:+.1%}: "
                 "a large change means the machine's load or clock changed)") if then else ""
        lines.append(f"{r['describe']}: full model {r['full_measured_ms']:.2f} ms measured, "
                     f"{r['full_predicted_ms']:.2f} ms predicted{drift}")
        if result.get("interleaved", True):
            lines.append("  each network measured between two forwards of the full model; "
                         "ratio error = predicted / measured fraction of full - 1")
        for g in ("random", "uniform", "all"):
            m = r[g]
            if not m.get("n"):
                continue
            lo, hi = m["measured_fraction_range"]
            rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.3f}"
            lines.append(f"  {g:<8} n={m['n']:<3} ratio to full: median |err| "
                         f"{m['median_abs_ratio_error']:6.1%}  worst "
                         f"{m['worst_abs_ratio_error']:6.1%};  absolute: median |err| "
                         f"{m['median_abs_rel_error']:6.1%}  worst "
                         f"{m['worst_abs_rel_error']:6.1%};  Spearman {rho}"
                         f"  (measured {lo:.0%}-{hi:.0%} of full)")
            if g != "all":
                lo_r, hi_r = m["rounds"]
                rounds = f"{lo_r}" if lo_r == hi_r else f"{lo_r}-{hi_r}"
                se = m["worst_ratio_se"]
                se = "unknown (fewer than 3 rounds)" if se is None else f"{se:.1%}"
                lines.append(f"  {'':<8} {rounds} rounds per network; worst standard error "
                             f"of a measured ratio {se}")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Scatter of predicted against measured latency, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["shapes"].items())
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 5), squeeze=False)
    fp = result["fingerprint"]
    for ax, (key, r) in zip(axes[0], shapes):
        for group, marker in (("random", "o"), ("uniform", "s")):
            pts = [p for p in r["points"] if p["group"] == group]
            if pts:
                m = r[group]
                ax.scatter([p["measured_ms"] for p in pts], [p["predicted_ms"] for p in pts],
                           marker=marker, alpha=0.75,
                           label=(f"{group} (n={m['n']}, median |err| "
                                  f"{m['median_abs_rel_error']:.1%})"))
        vals = [v for p in r["points"] for v in (p["measured_ms"], p["predicted_ms"])]
        lo, hi = min(vals) * 0.95, max(vals) * 1.05
        xs = np.linspace(lo, hi, 2)
        ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, label="±10 %")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured latency (ms)")
        ax.set_ylabel("predicted latency from the table (ms)")
        rho = r["random"].get("spearman")
        title = textwrap.fill(f"{fp['backend']} {fp['dtype']}, {r['describe']}", 56)
        if rho is not None:
            title += f"\nSpearman (random) {rho:.3f}"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=120)
    plt.close(fig)
