"""What routers add to a forward pass at full width (issue: at most 5 %), side by side.

    python benchmarks/router_overhead.py [--model smollm2-135m] [--seq 256] [--reps 15]

One elastic model, forwards interleaved round by round: no routers (width nodes), static
routers, and dynamic routers, whose output layers are biased to the widest candidate (at
budget 1.0 every op and token gets full width, the routers still computing), so every setting
runs the same full-width backbone and the ratio is the routers' own cost: a small MLP per
op (static) or a D -> 128 projection per token and op (dynamic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flextron_fx import flextronize
from flextron_fx.models import load
from flextron_fx.passes.inject_routers import inject_routers, remove_routers, set_budget


def _widest(routers) -> None:
    with torch.no_grad():
        for r in routers.values():
            last = r.net[-1] if hasattr(r, "net") else r.w_out
            last.bias[-1] = 100.0  # argmax is the widest candidate for every budget / token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    em = flextronize(model, (ids.repeat(2, 1)[:, :16],), None, progress=False)

    def setting(mode):
        def run():
            # set up, two forwards untimed (the second builds the graph's static program,
            # elastic/static.py, in every setting), then one timed
            if mode is not None:
                _widest(inject_routers(em, mode))
                set_budget(em, 1.0)
            try:
                em(ids)
                em(ids)
                t0 = time.perf_counter()
                em(ids)
                return time.perf_counter() - t0
            finally:
                if mode is not None:
                    remove_routers(em)
        return run

    settings = {"no routers": setting(None), "static routers": setting("static"),
                "dynamic routers": setting("dynamic")}
    times = {k: [] for k in settings}
    with torch.no_grad():
        for fn in settings.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for k, fn in settings.items():
                times[k].append(fn())
    base = statistics.median(times["no routers"])
    rows = {k: {"median_ms": 1e3 * statistics.median(v),
                "ratio": statistics.median(v) / base} for k, v in times.items()}
    print(f"{'setting':<18}{'median ms':>12}{'ratio':>8}")
    for k, r in rows.items():
        print(f"{k:<18}{r['median_ms']:>12.2f}{r['ratio']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq": args.seq, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
