"""Dynamic routers that want more width than any budget gives, for timing capacity mode.

    python benchmarks/wide_routers.py DYNAMIC_RUN OUT [--seed 0]

Capacity routing caps the tokens per candidate at the routers' own preference, so its
time guarantee is only exercised by routers that prefer more width than the budget (as
trained routers do before `calibrate_capacity`). Routers trained for a few steps on an
untrained conversion pick the cheapest width everywhere; this perturbs them (token term
+ 0.05 N(0, 1), output layer + 0.2 N(0, 1), + 1.5 on the widest candidate's logit),
prints what they spend in dynamic mode on held-out Wikipedia, and saves them to OUT
(a router folder `dynamic_vs_static.py --kinds capacity` reads). Their loss means
nothing; their timing is what capacity mode does with any routers that hit the cap.
"""

from __future__ import annotations

import argparse

import torch

from flextron_fx.data import calibration_and_heldout
from flextron_fx.models import tokenizer
from flextron_fx.passes.inject_routers import budget_source, routers_of, set_budget
from flextron_fx.route.commands import load_router_run
from flextron_fx.route.selection import read_router_meta, router_folder, save_routers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dynamic", help="flextron train-routers run (dynamic) or its final/")
    ap.add_argument("out", help="router folder to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    em, table, _ = load_router_run(args.dynamic, "dynamic")
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for r in routers_of(em).values():
            r.w_hidden.weight.add_(0.05 * torch.randn(r.w_hidden.weight.shape, generator=g))
            r.w_out.weight.add_(0.2 * torch.randn(r.w_out.weight.shape, generator=g))
            r.w_out.bias[-1] += 1.5
    budget_source(em).calibration = None  # it was fitted to the routers before
    _, held, _ = calibration_and_heldout(tokenizer("smollm2-135m"))
    with torch.inference_mode():
        for t in (0.55, 0.8):
            set_budget(em, t)
            em(held[:4])
            spent = sum(float(table.tensor(n)[r.last_index].float().mean())
                        for n, r in routers_of(em).items())
            print(f"T={t}: dynamic mode spends {(spent + table.fixed) / table.full:.3f}")
    save_routers(em, args.out, table,
                 extra=read_router_meta(router_folder(args.dynamic))["extra"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
