"""Pick the sub-network for a budget: parameters or memory here, latency with a table.

    python examples/huggingface_model.py            # makes runs/example-elastic
    python examples/pick_for_budget.py [runs/example-elastic]

A latency budget needs a latency table: `flextron profile DIR --json lut.json`, then
`uniform_for_budget(em, "latency=0.6", "lut.json")`.
"""

import sys

import flextron_fx
from flextron_fx.export.commands import uniform_for_budget


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/example-elastic"
    em = flextron_fx.load(folder)
    full = em.num_params(1.0, non_embedding=True)
    for budget in ("params=0.8", "params=0.6", "memory=0.7"):
        widths = uniform_for_budget(em, budget)
        share = em.num_params(widths, non_embedding=True) / full
        print(f"{budget:<12} -> {share:.0%} of the non-embedding parameters, widths "
              f"{sorted(set(widths.values()))}")
    try:
        uniform_for_budget(em, "params=0.01")
    except flextron_fx.ProfileError as exc:
        print(f"params=0.01 refused: {exc}")


if __name__ == "__main__":
    main()
