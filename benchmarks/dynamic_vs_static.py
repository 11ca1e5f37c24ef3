"""Dynamic (per-token) and capacity routers against static routers at the same budgets.

    python benchmarks/dynamic_vs_static.py STATIC DYNAMIC [--budgets 0.55,0.6,0.7,0.8] \
        [--blocks 16] [--batch 4] [--reps 5] [--json runs/x.json] [--plot docs/img/x.png]

STATIC and DYNAMIC are `flextron train-routers` runs (or their `final/` folders) on the same
elastic model and cost table. For each budget T, on the first `--blocks` x 256 tokens of the
Wikipedia domain's validation split (never trained on; with `--domains`, an equal number of
blocks of each named domain's validation split, and their calibration splits for the
calibrations), in batches of `--batch`:

- static: `flextron select`'s sub-network (argmax widths, then fitted to the budget);
- dynamic: the dynamic routers' argmax per token; its cost is the token mean; the
  budget goes through the routers' budget calibration (`calibrate_budget`, saved by
  `train-routers`, or measured here on `--calib-blocks` x 256 calibration tokens when the
  folder has none or with `--recalibrate`, refined only around the budgets evaluated;
  `--raw-budget`: the routers read T itself);
- capacity: the same routers in capacity mode (a number of tokens per candidate in every
  batch, so each batch's cost is within the budget), the budget split over the ops the way
  the routers spend it on `--calib-blocks` x 256 tokens of the calibration split
  (`calibrate_capacity`; `--uniform-shares`: every op the same fraction of its range),
  and, on the same tokens, planned at the budget whose measured time was T
  (`--capacity-timing-reps` rounds per batch, 0: plan on the table's prediction only).

Loss is the mean next-token loss; cost is the predicted fraction of the full model's cost
in the runs' table. For dynamic and capacity, every batch's forward is also timed against
the full model (the same graph with every router giving its widest width), interleaved,
`--reps` rounds, then more (up to 4 x `--reps`) for a batch whose ratio's relative standard
error is above `--precision` (default 0.02); the table gives the median ratio over batches
and the worst batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from flextron_fx.data import calibration_and_heldout
from flextron_fx.data.domains import resolve_domains
from flextron_fx.eval import perplexity
from flextron_fx.eval.loss import domain_tokens
from flextron_fx.models import tokenizer
from flextron_fx.passes.inject_routers import budget_source, calibrate_budget, calibrate_capacity
from flextron_fx.route import remove_routers, select, set_budget
from flextron_fx.route.commands import load_router_run
from flextron_fx.route.selection import load_routers, router_folder
from flextron_fx.route.timing import routed_timing
from flextron_fx.route.train import evaluate_routers


def per_token(em, table, held, budgets, batch: int, reps: int,
              precision: float | None = None) -> dict[float, dict]:
    res = evaluate_routers(em, held, table, budgets, batch)
    out = {}
    for t in budgets:
        set_budget(em, t)
        timed = routed_timing(em, held, batch, reps, precision=precision) if reps else []
        ratios = [b["ratio"] for b in timed]
        out[t] = {**res[str(t)], "ratios": ratios, "rounds": [b["rounds"] for b in timed],
                  "ratio_se": [b["se"] for b in timed]}
        print(f"  T={t:.2f}: loss {out[t]['loss']:.4f}, predicted {out[t]['cost']:.3f}"
              + (f", measured median {statistics.median(ratios):.3f} worst {max(ratios):.3f}"
                 if ratios else ""), flush=True)
    return out


def mixed_blocks(tok, domains: str, blocks: int, calib_blocks: int):
    """(calibration, held-out, description): blocks of 256 tokens from every domain's
    calibration and validation splits, as equal a number per domain as fits."""
    names = resolve_domains(domains)
    per, per_calib = -(-blocks // len(names)), -(-calib_blocks // len(names))
    held = torch.cat([domain_tokens(tok, d, "validation", 256, per * 256) for d in names])
    calib = torch.cat([domain_tokens(tok, d, "calibration", 256, per_calib * 256)
                       for d in names])
    return calib, held, f"{', '.join(names)} ({per} blocks each)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("static", help="flextron train-routers run (static) or its final/")
    ap.add_argument("dynamic", help="flextron train-routers run (dynamic) or its final/")
    ap.add_argument("--budgets", default="0.55,0.6,0.7,0.8")
    ap.add_argument("--blocks", type=int, default=16, help="held-out blocks of 256 tokens")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5, help="timing rounds per batch (0: none)")
    ap.add_argument("--precision", type=float, default=0.02,
                    help="then more rounds (up to 4 x --reps) for a batch whose measured ratio "
                         "has a relative standard error above this (0: none)")
    ap.add_argument("--calib-blocks", type=int, default=8)
    ap.add_argument("--uniform-shares", action="store_true")
    ap.add_argument("--capacity-timing-reps", type=int, default=3,
                    help="calibrate capacity routing on measured time too, this many "
                         "rounds per calibration batch (0: on the table's prediction only)")
    ap.add_argument("--raw-budget", action="store_true",
                    help="dynamic routers read T itself, not their calibrated input for T")
    ap.add_argument("--recalibrate", action="store_true",
                    help="calibrate the dynamic routers' budget on this run's calibration text "
                         "(the evaluated domains' calibration split), not with the calibration "
                         "saved by train-routers (made on its training text)")
    ap.add_argument("--kinds", default="static,dynamic,capacity",
                    help="which of static, dynamic, capacity to run")
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--domains", default=None,
                    help="comma-separated fetched domains (or 'all') to evaluate on, mixed; "
                         "default: Wikipedia")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.domains:
        calib, held, source = mixed_blocks(tokenizer(args.model), args.domains, args.blocks,
                                           args.calib_blocks)
    else:
        calib, held, source = calibration_and_heldout(tokenizer(args.model),
                                                      n_calib=args.calib_blocks)
        held = held[:args.blocks]

    kinds = args.kinds.split(",")
    static, dynamic, capacity, profile = {}, {}, {}, None
    calibration_used = None  # which budget calibration the dynamic routers read
    em, table, meta = load_router_run(args.static)
    if meta["mode"] != "static":
        raise SystemExit(f"{args.static} holds {meta['mode']} routers, not static ones")
    chosen = {t: select(em, t, table) for t in budgets} if "static" in kinds else {}
    remove_routers(em)
    print("static")
    for t, sel in chosen.items():
        with em.at(sel.widths):
            static[t] = {"loss": perplexity(em, held, args.batch, desc="static")["loss"],
                         "cost": sel.fraction}
        print(f"  T={t:.2f}: loss {static[t]['loss']:.4f}, predicted {sel.fraction:.3f}",
              flush=True)
    del em

    folder = router_folder(args.dynamic)
    em, table, meta = load_router_run(folder, "dynamic")
    if "dynamic" in kinds:
        reader = budget_source(em)
        calibration_used = "saved by train-routers"
        if args.raw_budget:
            reader.calibration, calibration_used = None, None
        elif reader.calibration is None or args.recalibrate:
            calibrate_budget(em, table, calib, batch=args.batch, progress=True,
                             budgets=budgets)
            calibration_used = (f"{calib.shape[0]} x {calib.shape[1]} tokens of the calibration "
                                f"split of {source}")
        print("dynamic" + ("" if args.raw_budget else " (calibrated budget)"))
        dynamic = per_token(em, table, held, budgets, args.batch, args.reps,
                            args.precision or None)
    if "capacity" in kinds:
        remove_routers(em)
        routers = load_routers(em, folder, "capacity")[0]
        if not args.uniform_shares and next(iter(routers.values())).profile is None:
            calibrate_capacity(em, table, calib, batch=args.batch,
                               timing_reps=args.capacity_timing_reps,
                               precision=args.precision or None)
        profile = next(iter(routers.values())).profile
        if profile and profile.get("measured"):
            print("capacity routing measured (grid budget: time / full): " + ", ".join(
                f"{g:.2f}: {m:.3f}" for g, m in zip(profile["grid"], profile["measured"])))
        print("capacity")
        capacity = per_token(em, table, held, budgets, args.batch, args.reps,
                             args.precision or None)

    rows = [{"budget": t, "static": static.get(t), "dynamic": dynamic.get(t),
             "capacity": capacity.get(t)} for t in budgets]
    print(_table(rows))
    if static and dynamic:
        wins = sum(r["dynamic"]["loss"] <= r["static"]["loss"]
                   and r["dynamic"]["cost"] <= r["budget"] for r in rows)
        print(f"dynamic at most static's loss and within budget at {wins} of {len(rows)} "
              "budgets")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "static": str(args.static), "dynamic": str(folder), "metric": table.metric,
            "text": f"validation split of {source}, {held.shape[0]} x {held.shape[1]} tokens",
            "timing": f"batches of {args.batch}, {args.reps} interleaved rounds vs the full "
                      "width through the same graph, more (up to 4x) where a ratio's standard "
                      f"error is above {args.precision}", "budget_calibration": calibration_used,
            "capacity_profile": profile, "rows": rows}, indent=1))
    if args.plot:
        _plot(rows, table.metric, args.plot)


def _measured(r: dict | None) -> str:
    ratios = r["ratios"] if r else None
    return f"{statistics.median(ratios):.3f} / {max(ratios):.3f}" if ratios else "-"


def _scored(r: dict | None) -> str:
    return f"{r['loss']:.4f} ({r['cost']:.3f})" if r else "-"


def _table(rows: list) -> str:
    lines = [("| T | static loss (cost) | dynamic loss (cost) | dynamic measured, median / "
              "worst batch | capacity loss (cost) | capacity measured, median / worst batch |"),
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, d, c = r["static"], r["dynamic"], r["capacity"]
        lines.append(f"| {r['budget']:.2f} | {_scored(s)} | {_scored(d)} | {_measured(d)} | "
                     f"{_scored(c)} | {_measured(c)} |")
    return "\n".join(lines)


def _plot(rows: list, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("static", "*"), ("dynamic", "o"), ("capacity", "^")):
        xs = [r[kind]["cost"] for r in rows if r[kind]]
        ys = [r[kind]["loss"] for r in rows if r[kind]]
        ax.plot(xs, ys, marker=marker, ms=10 if marker == "*" else 7, label=kind)
    for r in rows:
        ax.axvline(r["budget"], color="gray", lw=0.6, ls=":")
    ax.set_xlabel(f"predicted {metric} (fraction of the full model; dotted: the budgets)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Routers at the same budgets: static, per token, per token with capacity")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
