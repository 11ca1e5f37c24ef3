"""Routers: a sub-network for a budget (static), per token (dynamic), then joint tuning.

    python examples/huggingface_model.py      # makes runs/example-elastic
    python examples/routers.py [runs/example-elastic]

Budgets here limit parameters (no latency table needed). For latency, profile first
(`flextron profile DIR --json lut.json`) and pass `CostModel(em, LatencyTable.load(...))`
with metric "latency". The model is random, so it predicts almost uniformly even on the
text it writes itself: no width is worth its cost and the routers learn to pick the
cheapest ones (`select` then fills up to the budget). This shows the calls and files;
on a real model use `flextron train-routers`, `flextron joint-tune` and docs/ROUTERS.md.
"""

import shutil
import sys

import torch

import flextron_fx
from flextron_fx.profiler import CostModel
from flextron_fx.route import (
    CostTable,
    JointConfig,
    RouterConfig,
    remove_routers,
    save_routers,
    select,
    set_budget,
    train_routers,
    tune_jointly,
)
from flextron_fx.route.train import chosen_cost
from flextron_fx.train.loop import read_metrics


def own_text(em, n: int, seq: int) -> torch.Tensor:
    """Text the full model writes itself, a stand-in for real text."""
    ids = torch.randint(0, 512, (n, 2))  # huggingface_model.py's vocabulary
    with torch.no_grad():
        while ids.shape[1] < seq:
            probs = torch.softmax(em(ids)[:, -1].float(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
    return ids


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/example-elastic"
    em = flextron_fx.load(folder)
    torch.manual_seed(0)
    tokens = own_text(em, 64, 32)
    table = CostTable.coerce(em, CostModel(em), "params")
    for run in ("runs/example-static", "runs/example-joint", "runs/example-dynamic"):
        shutil.rmtree(run, ignore_errors=True)  # the example starts afresh every time

    # static routers (paper Eq. 9): the budget T -> one width per op
    config = RouterConfig(steps=30, mode="static", metric="params", target="excess",
                          surrogate_warmup=5, surrogate_threshold=1.0, latency_weight=1.0)
    summary = train_routers(em, tokens, "runs/example-static", config, table, progress=False)
    save_routers(em, "runs/example-static/final", table)  # what `flextron select` reads
    print(f"static routers: {summary['step']} steps, budgets {summary['budget_range']}")
    for budget in (0.6, 0.8):
        sel = select(em, budget, table)
        print(f"params={budget}: {sel.fraction:.1%} of the full parameters, MLP widths "
              f"{sorted({w for n, w in sel.widths.items() if 'mlp' in n})}")

    # routers and backbone tuned together on the real loss (the surrogate is dropped)
    joint = tune_jointly(em, tokens, "runs/example-joint", JointConfig(steps=6, lr=1e-4),
                         table, progress=False)
    rows = read_metrics("runs/example-joint")
    print(f"joint tuning: {joint['step']} steps, LM loss of the sampled sub-networks "
          f"{rows[0]['lm_loss']:.3f} -> {rows[-1]['lm_loss']:.3f}")
    for budget in (0.6, 0.8):
        print(f"  then params={budget}: {select(em, budget, table).fraction:.1%}")
    remove_routers(em)

    # dynamic routers (Eq. 11): every token its own widths, routed execution
    config = RouterConfig(steps=20, mode="dynamic", metric="params", target="excess",
                          surrogate_warmup=5, surrogate_threshold=1.0, latency_weight=1.0,
                          init_from="runs/example-static")
    train_routers(em, tokens, "runs/example-dynamic", config, table, progress=False)
    set_budget(em, 0.7)
    with torch.no_grad():
        em(tokens[:4])
    spent = chosen_cost(em, table) / table.full
    print(f"dynamic routers at T=0.7: the tokens' widths cost {spent:.3f} of the full "
          "parameters on average (at most T on their calibration text)")


if __name__ == "__main__":
    main()
