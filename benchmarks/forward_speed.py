"""Forward latency of flextronized SmolLM2 against the original, side by side in one run.

    python benchmarks/forward_speed.py [--batch 1] [--seq 256] [--reps 15] [--calib N]
                                       [--json out.json]

Every configuration runs once per round, in a new random order each round, so drift in
the machine's speed hits all of them alike; the table reports each one's median, and its
ratios to the original Hugging Face model and to the elastic model at full width as the
median over rounds of the ratio within a round (with the interquartile range of those
ratios), which a slow minute cannot bias.
At repeated widths the elastic model runs its static program (elastic/static.py). Slices are views of the shared weights (a gather only for
query heads kept inside KV groups, head mode "query"), so nothing is cached between
forwards. Weights are random-order (no calibration): speed does not depend on the order.
With `--calib N` the model is calibrated on N random sequences first, so it carries the
default conversion's per-width compensation (a bias row, and at a static width a corrected
down weight built once and cached).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calib", type=int, default=0,
                    help="calibrate on N random sequences of 64 tokens, which gives the "
                         "default conversion's per-width compensation (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _ = load(args.model)
    calib = torch.randint(0, model.config.vocab_size, (args.calib, 64)) if args.calib else None
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    em = flextronize(model, (ids[:1].repeat(2, 1)[:, :16],), calib, progress=False)

    def setting(fraction: float, kind: str | None):
        def run():
            return em(ids)
        def prepare():
            em.set_full()
            if fraction < 1.0:
                em.set_widths(fraction, kind=kind)
        return prepare, run

    full_dense = em.materialize()
    em.set_widths(0.5, kind="mlp")
    mlp50_dense = em.materialize()
    em.set_full()
    configs = {
        "original (HF eager)": (lambda: None, lambda: model(ids, use_cache=False).logits),
        "flextron full width": setting(1.0, None),
        "flextron MLP 50%": setting(0.5, "mlp"),
        "flextron heads 67%": setting(0.6, "attention"),
        "flextron heads 33%": setting(0.3, "attention"),
        "flextron MLP 50% + heads 67%": setting(0.5, None),
        "materialized full width": (lambda: None, lambda: full_dense(ids)),
        "materialized MLP 50%": (lambda: None, lambda: mlp50_dense(ids)),
    }
    order = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for _ in range(2):  # warm-up; the second call at new widths builds the program
            for prepare, run in configs.values():
                prepare()
                run()
                run()
        for _ in range(args.reps):
            names = list(configs)
            order.shuffle(names)
            for name in names:
                prepare, run = configs[name]
                prepare()
                run()  # one untimed call at the new widths
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    full = statistics.median(times["flextron full width"])
    rows = []
    print(f"{args.model}, batch {args.batch} x seq {args.seq}, {args.reps} interleaved rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'configuration':<32}{'median ms':>10}{'vs original':>13}{'(IQR)':>15}"
          f"{'vs full width':>15}{'(IQR)':>15}")

    def quartiles(ratios):
        return statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3

    for name, ts in times.items():
        med = statistics.median(ts)
        q1, ratio, q3 = quartiles([t / b for t, b in zip(ts, times["original (HF eager)"])])
        # the same within-round ratio against the elastic model at full width
        f1, to_full, f3 = quartiles([t / b for t, b in zip(ts, times["flextron full width"])])
        rows.append({"config": name, "median_ms": med * 1e3, "ratio_to_original": ratio,
                     "ratio_iqr": [q1, q3], "ratio_to_full_width": to_full,
                     "ratio_to_full_width_iqr": [f1, f3], "speedup_vs_full": full / med})
        print(f"{name:<32}{med * 1e3:>10.1f}{ratio:>13.3f}{f'{q1:.3f}-{q3:.3f}':>15}"
              f"{to_full:>15.3f}{f'{f1:.3f}-{f3:.3f}':>15}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "seq": args.seq,
                       "reps": args.reps, "threads": torch.get_num_threads(), "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
