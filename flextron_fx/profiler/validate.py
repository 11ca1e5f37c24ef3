"""How well a latency table predicts whole sub-networks: measure some, compare.

`check(em, table)` draws N random sub-networks whose predicted latency spreads evenly over
`low`..100 % of the full model (each starts at full width and shrinks randomly chosen ops
one candidate at a time until it is under its target), adds the uniform-width ones (the
grid the table was measured on), measures all of them end to end on the table's backend,
dtype and shapes in interleaved rounds (one warm-up forward after every switch), and
reports predicted against measured: median and worst absolute relative error and the
Spearman rank correlation, per group. The random group is the honest test: the uniform
ones are the table's own anchors.
"""

from __future__ import annotations

import random
import textwrap

import numpy as np
import torch

from .._atomic import savefig_atomic
from ..elastic.model import ElasticModel
from . import onnxrt
from .backends import get_backend
from .cost import CostModel
from .measure import DTYPES, Runner, _bar, _load_average, busy_warning, quiet_gc, uniform_grid
from .runtime import LayerwiseModel
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
    pred = [p["predicted_ms"] for p in points]
    meas = [p["measured_ms"] for p in points]
    frac = [p["measured_fraction"] for p in points]
    return {"n": len(points), "median_abs_rel_error": float(np.median(err)),
            "worst_abs_rel_error": float(err.max()),
            "spearman": spearman(pred, meas) if len(points) > 2 else None,
            "measured_fraction_range": [float(min(frac)), float(max(frac))]}


def check(em: ElasticModel, table: LatencyTable, *, n: int = 30, seed: int = 0,
          low: float = 0.4, repeats: int = 5, warmup: int = 2, shapes=None,
          progress: bool = True) -> dict:
    """Predicted vs measured end-to-end latency of random and uniform sub-networks.

    The table must match this machine, the model and (if given) `shapes`.

    Example:
        >>> r = check(em, LatencyTable.load("lut.json"), n=30)                # doctest: +SKIP
        >>> r["shapes"]["1x256"]["random"]["median_abs_rel_error"]           # doctest: +SKIP
        0.031
    """
    fp = table.fingerprint
    backend = get_backend(fp["backend"])
    threads = int(fp["machine"].get("threads") or torch.get_num_threads())
    keys = [shape_key(s) for s in (parse_shapes(shapes) if isinstance(shapes, str)
                                   else shapes or table.shapes)]
    table.require(machine=backend.machine(threads), model=model_signature(em), shapes=keys)
    busy_warning(print if progress else (lambda _msg: None))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cost = CostModel(em, table)
        rt = LayerwiseModel(em, dtype=DTYPES[fp["dtype"]], device=backend.device)
        out = {"table": table.source, "fingerprint": fp, "n": n, "seed": seed, "low": low,
               "repeats": repeats, "shapes": {}}
        grid = uniform_grid(em)
        full_index = next(i for i, (_, w) in enumerate(grid) if w == em.full_widths())
        for key in keys:
            nets = [("uniform", label, w) for label, w in grid]
            nets += [("random", f"random {j}", w)
                     for j, w in enumerate(sample_subnetworks(cost, n, low=low, seed=seed,
                                                              shape=key))]
            runner = Runner(rt, backend, table.mode, parse_shapes(key)[0], seed=seed)
            bar = _bar(repeats * len(nets), 0, progress, f"check {key}")
            if backend.runtime == "onnxruntime":
                times = onnxrt.time_networks(rt, nets, runner, threads=threads, repeats=repeats,
                                      warmup=warmup, bar=bar)
            else:
                times = _time_torch(rt, nets, runner, repeats, warmup, bar)
            bar.close()
            rt.set(em.full_widths())
            full_ms = float(np.median(times[full_index]))
            points = []
            for i, (group, label, widths) in enumerate(nets):
                t = np.asarray(times[i])
                pred = cost.latency(widths, key)
                med = float(np.median(t))
                points.append({
                    "group": group, "label": label, "widths": list(widths.values()),
                    "predicted_ms": pred, "measured_ms": med,
                    "measured_p25_ms": float(np.percentile(t, 25)),
                    "measured_p75_ms": float(np.percentile(t, 75)),
                    "rel_error": pred / med - 1, "measured_fraction": med / full_ms,
                    "params_fraction": cost.fraction("params", widths)})
            anchor = next((a["measured"]["median_ms"] for a in table.data["anchors"].get(key, [])
                           if a["widths"] == list(em.full_widths().values())), None)
            out["shapes"][key] = {
                "describe": describe_shape(table.mode, key), "full_measured_ms": full_ms,
                "full_measured_when_profiled_ms": anchor,
                "full_predicted_ms": cost.latency(None, key), "points": points,
                **{g: metrics([p for p in points if p["group"] == g])
                   for g in ("random", "uniform")},
                "all": metrics(points)}
    finally:
        torch.set_num_threads(before)
    out["load_average"] = _load_average()
    return out


def _time_torch(rt, nets, runner, repeats, warmup, bar) -> dict[int, list[float]]:
    """End-to-end ms of every network, in interleaved rounds (the order alternates)."""
    times: dict[int, list[float]] = {i: [] for i in range(len(nets))}
    for r in quiet_gc(range(repeats)):
        order = list(range(len(nets)))
        if r % 2:
            order.reverse()
        for i in order:
            rt.set(nets[i][2])
            runner.prepare(i)
            for _ in range(warmup if r == 0 else 1):
                runner.run(i)
            times[i].append(runner.run(i))
            bar.update(1)
    return times


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
        for g in ("random", "uniform", "all"):
            m = r[g]
            if not m.get("n"):
                continue
            lo, hi = m["measured_fraction_range"]
            rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.3f}"
            lines.append(f"  {g:<8} n={m['n']:<3} median |err| {m['median_abs_rel_error']:6.1%}"
                         f"  worst {m['worst_abs_rel_error']:6.1%}  Spearman {rho}"
                         f"  (measured {lo:.0%}-{hi:.0%} of full)")
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
