"""Static routers against random and uniform sub-networks at latency budgets (Figure 13).

    python benchmarks/router_budgets.py ROUTERS [--budgets 0.5,0.6,0.7,0.8] [--random 100] \
        [--blocks 16] [--reps 10] [--json runs/router_budgets.json] [--plot docs/img/x.png]

ROUTERS is a `flextron train-routers` run (static mode) or its `final/` folder; the elastic
model and the cost table are the ones it was trained with. For each budget T (a fraction
of the full model's cost in that table):

- the routers' choice (`flextron select`): its predicted cost fraction, and its measured
  prefill latency as a ratio to the full model's (both materialized, timed interleaved);
- `--random` sub-networks whose predicted cost is within `--tol` (2 %) of T: a random
  candidate per op, then random ops stepped one candidate down or up until the cost is
  within the band;
- every uniform sub-network (one MLP fraction, one attention fraction) that meets T.

All are scored by next-token loss on the first `--blocks` x 256 tokens of the Wikipedia
domain's validation split (the text `train-elastic` validates on and never trains on). The
table says how many random sub-networks the router beats and whether it is at least as
good as the best uniform one. The plot has predicted cost on x and loss on y, one colour
per budget: random sub-networks as dots, uniform ones as squares, the router as a star.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron_fx.data import calibration_and_heldout
from flextron_fx.eval import perplexity
from flextron_fx.models import tokenizer
from flextron_fx.route import remove_routers, select
from flextron_fx.route.commands import load_router_run
from flextron_fx.route.selection import router_folder


def near_budget(table, ops: dict, target: float, tol: float, rng: random.Random,
                tries: int = 2000) -> dict[str, int] | None:
    """A random choice {op: candidate index} whose cost fraction is within tol * target."""
    choice = {n: rng.randrange(len(table.costs[n])) for n in ops}
    for _ in range(tries):
        frac = table.fraction(choice)
        if abs(frac - target) <= tol * target:
            return choice
        name = rng.choice(list(ops))
        k = choice[name] + (-1 if frac > target else 1)
        if 0 <= k < len(table.costs[name]):
            choice[name] = k
    return None


def uniform_choices(em, table) -> list[dict[str, int]]:
    """Every (MLP fraction, attention fraction) pair as a choice {op: candidate index}."""
    kinds = sorted({op.kind for op in em.ops.values()})
    levels = {k: sorted({len(op.candidates) for op in em.ops.values() if op.kind == k})
              for k in kinds}
    if any(len(v) != 1 for v in levels.values()):
        raise SystemExit("ops of one kind have different numbers of candidates; no uniform "
                         "grid to compare with")
    grids = [[]]
    for k in kinds:
        grids = [g + [(k, i)] for g in grids for i in range(levels[k][0])]
    out = []
    for g in grids:
        pick = dict(g)
        out.append({n: pick[op.kind] for n, op in em.ops.items()})
    return out


def time_ratio(em, widths: dict, ids: torch.Tensor, reps: int) -> float:
    """Median over rounds of (sub-network time / full time), the two timed back to back in
    an order that alternates, both materialized."""
    small, full = em.materialize(widths), em.materialize(em.static_widths(1.0))
    ratios = []
    with torch.inference_mode():
        small(ids), full(ids)
        for r in range(reps):
            t = {}
            for name, model in ((("s", small), ("f", full)) if r % 2 else
                                (("f", full), ("s", small))):
                t0 = time.perf_counter()
                model(ids)
                t[name] = time.perf_counter() - t0
            ratios.append(t["s"] / t["f"])
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("routers", help="flextron train-routers run (static) or its final/")
    ap.add_argument("--budgets", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--random", type=int, default=100)
    ap.add_argument("--tol", type=float, default=0.02)
    ap.add_argument("--blocks", type=int, default=16, help="held-out blocks of 256 tokens")
    ap.add_argument("--reps", type=int, default=10, help="timing rounds per budget")
    ap.add_argument("--seq", type=int, default=256, help="prefill length timed (batch 1)")
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    folder = router_folder(args.routers)
    em, table, meta = load_router_run(folder)
    elastic = meta.get("extra", {}).get("elastic")
    if meta["mode"] != "static" or table is None:
        raise SystemExit(f"{folder} holds {meta['mode']} routers without a cost table or not "
                         "static; train static routers (flextron train-routers --mode static)")
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen = {t: select(em, t, table) for t in budgets}
    remove_routers(em)

    _, held, source = calibration_and_heldout(tokenizer(args.model), n_calib=1)
    held = held[:args.blocks]
    losses: dict[tuple, float] = {}

    def loss(choice: dict[str, int]) -> float:
        key = tuple(choice[n] for n in em.ops)
        if key not in losses:
            widths = {n: em.ops[n].candidates[k] for n, k in choice.items()}
            with em.at(widths):
                losses[key] = perplexity(em, held, desc="loss")["loss"]
        return losses[key]

    rng = random.Random(args.seed)
    ids = torch.randint(0, 1000, (1, args.seq), generator=torch.Generator().manual_seed(0))
    uniform = [(c, table.fraction(c)) for c in uniform_choices(em, table)]
    rows = []
    for t in budgets:
        sel = chosen[t]
        router_choice = {n: em.ops[n].candidates.index(w) for n, w in sel.widths.items()}
        randoms = []
        for _ in tqdm(range(args.random), desc=f"random at {t}", leave=False):
            c = near_budget(table, em.ops, t, args.tol, rng)
            if c is not None:
                randoms.append((table.fraction(c), loss(c)))
        meets = [(f, loss(c)) for c, f in uniform if f <= t]
        router_loss = loss(router_choice)
        best_uniform = min(meets, key=lambda x: x[1]) if meets else None
        row = {
            "budget": t, "router_fraction": sel.fraction, "router_loss": router_loss,
            "router_widths": sel.widths,
            "measured_ratio": time_ratio(em, sel.widths, ids, args.reps),
            "random": randoms, "beats": sum(router_loss < r[1] for r in randoms),
            "uniform": meets, "best_uniform": best_uniform,
        }
        rows.append(row)
        bu = f"{best_uniform[1]:.4f} at {best_uniform[0]:.3f}" if best_uniform else "none"
        print(f"T={t:.2f}: router at {sel.fraction:.3f} predicted, "
              f"{row['measured_ratio']:.3f} measured, loss {router_loss:.4f}; beats "
              f"{row['beats']}/{len(randoms)} random; best uniform {bu}", flush=True)
    out = {"routers": str(folder), "elastic": elastic, "metric": table.metric,
           "text": f"validation split of {source}, {held.shape[0]} x {held.shape[1]} tokens",
           "timing": f"prefill 1x{args.seq}, {args.reps} rounds, materialized, interleaved",
           "rows": rows}
    print(_table(rows, table.metric))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(rows, table.metric, args.plot)


def _table(rows: list, metric: str) -> str:
    lines = [(f"| budget ({metric}) | router predicted | measured / full | router loss | "
             "beats random | best uniform loss (its cost) |"),
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bu = r["best_uniform"]
        lines.append(f"| {r['budget']:.2f} | {r['router_fraction']:.3f} | "
                     f"{r['measured_ratio']:.3f} | {r['router_loss']:.4f} | "
                     f"{r['beats']}/{len(r['random'])} | "
                     + (f"{bu[1]:.4f} ({bu[0]:.3f}) |" if bu else "none |"))
    return "\n".join(lines)


def _plot(rows: list, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        color = f"C{i}"
        if r["random"]:
            xs, ys = zip(*r["random"])
            ax.scatter(xs, ys, s=8, alpha=0.35, color=color)
        if r["uniform"]:
            xs, ys = zip(*r["uniform"])
            ax.scatter(xs, ys, marker="s", s=30, facecolors="none", edgecolors=color)
        ax.scatter([r["router_fraction"]], [r["router_loss"]], marker="*", s=220,
                   color=color, edgecolors="black", label=f"router, T={r['budget']:.2f}")
        ax.axvline(r["budget"], color=color, lw=0.6, ls=":")
    ax.set_xlabel(f"predicted {metric} (fraction of the full model)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Static routers vs random (dots) and uniform (squares) sub-networks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
