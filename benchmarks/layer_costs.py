"""Per-layer cost of attention against the MLP (paper section 5.1), from latency tables.

    python benchmarks/layer_costs.py runs/profile/lut-*.json

prints one Markdown row per table and shape: per layer, the ms of attention and of the
MLP at full width and at their smallest width, with attention's share of the layer, and
the share of the full model that does not shrink (embedding, norms, output head, glue).
"""

from __future__ import annotations

import sys

from flextron_fx.profiler.commands import layer_costs
from flextron_fx.profiler.table import LatencyTable, describe_shape


def main(paths: list[str]) -> None:
    print("| backend | shape | attention, full | MLP, full | attention share | "
          "attention, smallest | MLP, smallest | attention share | fixed share of full |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in paths:
        table = LatencyTable.load(path)
        for key in table.shapes:
            c = layer_costs(table, key)
            if c is None:
                continue
            cells = []
            for at in ("full", "smallest"):
                a, m = c[at].get("attention", 0.0), c[at].get("mlp", 0.0)
                cells += [f"{a:.3f} ms", f"{m:.3f} ms", f"{a / (a + m):.0%}"]
            print(f"| {table.fingerprint['backend']} | {describe_shape(table.mode, key)} | "
                  + " | ".join(cells) + f" | {c['fixed_ms'] / c['full_ms']:.0%} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
