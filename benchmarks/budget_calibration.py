"""Budget calibration of dynamic routers: the whole curve against a calibration aimed at given budgets.

    python benchmarks/budget_calibration.py DYNAMIC [--budgets 0.55,0.6,0.7,0.8] \
        [--calib-blocks 8] [--batch 4] [--domains all] [--json runs/x.json]

DYNAMIC is a `flextron train-routers --mode dynamic` run (or its `final/`). On
`--calib-blocks` x 256 tokens of the calibration split (Wikipedia, or an equal number of
blocks of each of `--domains`), `calibrate_budget` runs three ways: aimed at `--budgets`
(the coarse grid refined only around them, what `dynamic_vs_static.py --recalibrate`
does), over the whole curve (the coarse grid refined wherever it is steep, what
`train-routers` saves), and over the dense grid used before the twenty-second session
(steps of 0.01, refined twice). Printed: router inputs run and seconds for each, and per
budget the cost the routers spend on this text at the input each calibration gives them
for T: aimed should give the same or a closer cost in a fraction of the time.
"""

from __future__ import annotations

import argparse
import json
import time

from dynamic_vs_static import mixed_blocks

from flextron_fx.data import calibration_and_heldout
from flextron_fx.models import tokenizer
from flextron_fx.passes.inject_routers import budget_source, calibrate_budget
from flextron_fx.route.commands import load_router_run
from flextron_fx.route.selection import router_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dynamic")
    ap.add_argument("--budgets", default="0.55,0.6,0.7,0.8")
    ap.add_argument("--calib-blocks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--domains", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.domains:
        calib, _, source = mixed_blocks(tokenizer(args.model), args.domains, 1,
                                        args.calib_blocks)
    else:
        calib, _, source = calibration_and_heldout(tokenizer(args.model),
                                                   n_calib=args.calib_blocks)
    em, table, _ = load_router_run(router_folder(args.dynamic), "dynamic")
    reader = budget_source(em)
    results = {}
    dense = [g / 100 for g in range(30, 101)]
    ways = [("aimed", None, budgets), ("whole curve", None, None), ("dense grid", dense, None)]
    for name, grid, aimed in ways:
        start = time.perf_counter()
        cal = calibrate_budget(em, table, calib, grid, batch=args.batch, progress=True,
                               budgets=aimed)
        seconds = time.perf_counter() - start
        cost = dict(zip(cal["inputs"], cal["costs"]))
        results[name] = {"inputs": len(cal["inputs"]), "seconds": seconds,
                         "cost_at": {t: cost[reader.router_input(t)] for t in budgets},
                         "calibration": cal}
        print(f"{name}: {len(cal['inputs'])} router inputs in {seconds:.0f} s", flush=True)
    print(f"calibration text: {calib.shape[0]} x {calib.shape[1]} tokens ({source})")
    print("| way | router inputs | seconds | " + " | ".join(f"T={t:.2f}" for t in budgets)
          + " |\n|---|---:|---:|" + "---:|" * len(budgets))
    for name, r in results.items():
        print(f"| {name} | {r['inputs']} | {r['seconds']:.0f} | "
              + " | ".join(f"{r['cost_at'][t]:.4f}" for t in budgets) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"budgets": budgets, "calib": list(calib.shape), "source": source,
                       "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
