"""Lowered MLPs (inductor, torch backends) against the eager elastic and materialized models.

    python benchmarks/codegen_cpu.py [--reps 7] [--budgets 1.0,0.75,0.5] [--threads N]
                                     [--shapes "prefill 1x256,decode-sized 1x2"] [--calib N]
                                     [--json out.json]

SmolLM2-135M, flextronized (with `--calib N`: calibrated on N random sequences, so every
width below the full one carries the default conversion's compensation and each lowered MLP
runs on its width's corrected down weight), at each budget (every op at that fraction of
its width):

- eager elastic: the ElasticModel itself (its static program at repeated widths);
- eager materialized: `em.materialize(budget)`, a plain dense graph with sliced weights;
- torch-lowered: `lower(em, "torch", widths=budget)`, each MLP one custom op running the
  torch reference (narrowed weight views);
- inductor-lowered: `lower(em, "inductor", widths=budget)`: the whole specialised
  sub-network compiled by torch.compile (inductor's generated C++ for the CPU);
- inductor MLP ops: `lower(em, "inductor")` set to the budget: only each MLP is compiled
  (one function per width), attention runs as in the eager elastic model.

Shapes: prefill 1x256 tokens and a decode-sized step, 1x2 tokens (the traced graph takes
sequences of at least 2 tokens and has no KV cache, so this measures the per-token work of
decoding: GEMV-shaped MLPs, not attention over a cache). Every configuration of one shape
runs once per round, in a new random order each round; the table gives each median and its
ratio to the materialized dense model of the same budget as the median over rounds of the
ratio within a round. Outputs are checked against the eager elastic model before timing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from flextron_fx import flextronize
from flextron_fx.models import load
from flextron_fx.passes.lower import lower

SHAPES = {"prefill 1x256": (1, 256), "decode-sized 1x2": (1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budgets", default="1.0,0.75,0.5")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 gives steadier numbers on a busy machine)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"some of {list(SHAPES)}")
    ap.add_argument("--calib", type=int, default=0,
                    help="calibrate on N random sequences of 64 tokens, which gives the "
                         "default conversion's per-width compensation (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    budgets = [float(b) for b in args.budgets.split(",")]

    torch.manual_seed(0)
    model, _ = load(args.model)
    calib = torch.randint(0, model.config.vocab_size, (args.calib, 64)) if args.calib else None
    sample = torch.randint(0, model.config.vocab_size, (2, 16))
    em = flextronize(model, (sample,), calib, progress=False)
    configs = {}
    for b in budgets:
        dense = em.materialize(b)
        lowered = {be: lower(em, be, widths=b) for be in ("torch", "inductor")}
        mlp_ops = lower(em, "inductor")
        configs[b] = {
            "eager elastic": (lambda b=b: em.set_widths(b), em),
            "eager materialized": (lambda: None, dense),
            "torch-lowered": (lambda: None, lowered["torch"]),
            "inductor-lowered": (lambda: None, lowered["inductor"]),
            "inductor MLP ops": (lambda m=mlp_ops, b=b: m.set_widths(b), mlp_ops),
        }
    rows = []
    print(f"{args.model}, {args.reps} interleaved rounds, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for shape, (batch, seq) in shapes.items():
            ids = torch.randint(0, model.config.vocab_size, (batch, seq))
            flat = {(b, name): cfg for b, cs in configs.items() for name, cfg in cs.items()}
            for b in budgets:  # compile, build programs, and check outputs
                em.set_widths(b)
                expected = em(ids)
                em(ids)
                for name, (prepare, m) in configs[b].items():
                    prepare()
                    out = m(ids)
                    err = float((out - expected).abs().max())
                    assert err < 1e-3, f"{name} at {b}: max |diff| {err}"
            times = {k: [] for k in flat}
            order = random.Random(0)
            for _ in range(args.reps):
                keys = list(flat)
                order.shuffle(keys)
                for key in keys:
                    prepare, m = flat[key]
                    prepare()
                    m(ids)  # one untimed call at these widths (the elastic program)
                    t0 = time.perf_counter()
                    m(ids)
                    times[key].append(time.perf_counter() - t0)
            print(f"\n{shape}")
            print(f"{'budget':>7}  {'configuration':<22}{'median ms':>10}{'vs materialized':>17}"
                  f"{'(IQR)':>15}")
            for (b, name), ts in times.items():
                base = times[(b, "eager materialized")]
                ratios = [t / d for t, d in zip(ts, base)]
                q1, ratio, q3 = statistics.quantiles(ratios, n=4)
                med = statistics.median(ts)
                rows.append({"shape": shape, "budget": b, "config": name, "median_ms": med * 1e3,
                             "ratio_to_materialized": ratio, "ratio_iqr": [q1, q3]})
                print(f"{b:>7.2f}  {name:<22}{med * 1e3:>10.2f}{ratio:>17.3f}"
                      f"{f'{q1:.3f}-{q3:.3f}':>15}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "reps": args.reps,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
