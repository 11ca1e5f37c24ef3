"""Cost of one elastic training pass (forward + backward) per sub-network, against the full
network, side by side in one run.

    python benchmarks/train_step.py [--batch 4] [--seq 256] [--reps 5] [--json out.json]

Each pass is exactly what `flextron train-elastic` runs for one sampled sub-network
(`flextron_fx.train.loop.accumulate`: set the widths, forward on sliced weights, LM loss,
backward into the full-size gradients). Settings are timed in interleaved rounds so drift
in the machine's speed hits all of them alike; the table shows each median and its ratio
to the full network. Weights are in original order (speed does not depend on the order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flextron_fx import flextronize
from flextron_fx.models import load
from flextron_fx.train import TrainConfig
from flextron_fx.train.loop import accumulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _ = load(args.model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    em = flextronize(model, (ids[:2, :16],), None, progress=False)
    del model
    for p in em.parameters():
        p.requires_grad_(True)
    config = TrainConfig(steps=1, loss="lm")

    def widths(mlp: float, heads: float) -> dict:
        em.set_full()
        em.set_widths(mlp, kind="mlp")
        em.set_widths(heads, kind="attention")
        w = em.widths
        em.set_full()
        return w

    settings = {
        "full": widths(1.0, 1.0),
        "MLP 50%": widths(0.5, 1.0),
        "MLP 50% + heads 6/9 (the smallest GQA size >= 50%)": widths(0.5, 0.5),
        "MLP 50% + heads 3/9": widths(0.5, 0.3),
    }
    times: dict[str, list[float]] = {k: [] for k in settings}
    for rnd in range(args.reps + 1):  # round 0 warms up every setting
        for name, w in settings.items():
            em.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            accumulate(em, em, ids, [w], config)
            dt = time.perf_counter() - t0
            if rnd:
                times[name].append(dt)
        print(f"round {rnd}/{args.reps}", flush=True)
    full = statistics.median(times["full"])
    rows = {}
    print(f"\none training pass (forward + backward), batch {args.batch} x {args.seq}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'setting':<52}{'ms':>9}{'x full':>9}{'params':>8}")
    for name, w in settings.items():
        med = statistics.median(times[name])
        frac = em.num_params(w, non_embedding=True) / em.num_params(settings["full"],
                                                                     non_embedding=True)
        rows[name] = {"median_ms": 1000 * med, "ratio_to_full": med / full,
                      "non_embedding_params_fraction": frac,
                      "all_ms": [1000 * t for t in times[name]]}
        print(f"{name:<52}{1000 * med:>9.0f}{med / full:>9.2f}{frac:>8.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "seq": args.seq, "reps": args.reps,
                       "threads": torch.get_num_threads(), "settings": rows}, f, indent=1)


if __name__ == "__main__":
    main()
