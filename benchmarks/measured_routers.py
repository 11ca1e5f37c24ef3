"""Routers taught by measured excess against one width per op chosen from the same measurements.

    python benchmarks/measured_routers.py RUN [--budgets 0.5,0.6,0.7,0.8] [--domains all] \
        [--tokens 1024] [--json runs/x.json]

RUN is a `flextron train-routers --signal measured` run (dynamic): its `final/` routers and
its `measured.pt`, every op's per-token excess at every candidate on its training text.
For each budget T, on every domain's `test` split (`--tokens` per domain, blocks of 256):

- dynamic: the routers (their saved calibration maps T to the input they read), a width
  per token; its cost is the token-mean predicted cost;
- static from the same measurements: one width per op, the cheapest sum of *mean* excesses
  (over the measured tokens) whose cost is the dynamic routers' own spent cost, so both
  spend the same (the same Lagrangian as the routers' targets, one decision per op
  instead of per token).

Printed: per budget, cost and mean loss of both over all domains, and per domain. The
difference is what deciding per token gains over deciding per op with the same knowledge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron_fx import load
from flextron_fx.data.domains import resolve_domains
from flextron_fx.eval.loss import domain_tokens
from flextron_fx.models import tokenizer
from flextron_fx.route.commands import load_router_run
from flextron_fx.route.measured import FILE, Teacher, token_nll
from flextron_fx.route.selection import router_folder
from flextron_fx.route.train import evaluate_routers


def static_widths(excess: dict, table, budget: float, em) -> dict[str, int]:
    """One width per op: the measured mean excesses' cheapest choice costing `budget`."""
    means = {n: e.mean(0, keepdim=True) for n, e in excess.items()}
    teacher = Teacher(means, {}, table, {}, (budget, budget), grid=1)
    return {n: em.ops[n].candidates[int(k)] for n, k in teacher.choice_at(budget).items()}


def static_loss(plain, widths: dict, blocks: torch.Tensor, batch: int) -> float:
    with plain.at(widths):
        return float(token_nll(plain, blocks, batch).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a train-routers --signal measured run (dynamic)")
    ap.add_argument("--budgets", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--domains", default="all")
    ap.add_argument("--tokens", type=int, default=1024, help="test tokens per domain")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / FILE).is_file():
        raise SystemExit(f"{run} holds no {FILE}: give the folder of a train-routers "
                         "--signal measured run (not its final/)")
    em, table, meta = load_router_run(router_folder(run))
    if meta["mode"] != "dynamic":
        raise SystemExit(f"{run} holds {meta['mode']} routers; this compares dynamic ones")
    excess = torch.load(run / FILE, weights_only=True)["excess"]
    plain = load(meta["extra"]["elastic"])
    tok = tokenizer(args.model)
    blocks = {d: domain_tokens(tok, d, split="test", seq_len=args.seq, max_tokens=args.tokens)
              for d in resolve_domains(args.domains)}
    rows = []
    for budget in tqdm([float(b) for b in args.budgets.split(",")], desc="budgets"):
        dyn = {d: evaluate_routers(em, b, table, [budget], args.batch)[str(budget)]
               for d, b in blocks.items()}
        spent = sum(r["cost"] for r in dyn.values()) / len(dyn)
        widths = static_widths(excess, table, spent, plain)
        static = {d: static_loss(plain, widths, b, args.batch) for d, b in blocks.items()}
        row = {"budget": budget, "dynamic_cost": spent,
               "static_cost": table.fraction({n: em.ops[n].candidates.index(w)
                                              for n, w in widths.items()}),
               "dynamic_loss": sum(r["loss"] for r in dyn.values()) / len(dyn),
               "static_loss": sum(static.values()) / len(static),
               "domains": {d: {"dynamic": dyn[d]["loss"], "dynamic_cost": dyn[d]["cost"],
                               "static": static[d]} for d in blocks},
               "static_widths": widths}
        rows.append(row)
        print(f"T {budget:.2f}: dynamic cost {spent:.3f} loss {row['dynamic_loss']:.4f} | "
              f"static cost {row['static_cost']:.3f} loss {row['static_loss']:.4f}", flush=True)
    print("| T | dynamic: cost | loss | static from the measurements: cost | loss |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget']:.2f} | {r['dynamic_cost']:.3f} | {r['dynamic_loss']:.4f} | "
              f"{r['static_cost']:.3f} | {r['static_loss']:.4f} |")
    domains = list(blocks)
    print("\nPer domain, loss dynamic / static:")
    print("| T | " + " | ".join(domains) + " |")
    print("|---|" + "---:|" * len(domains))
    for r in rows:
        print(f"| {r['budget']:.2f} | " + " | ".join(
            f"{r['domains'][d]['dynamic']:.3f} / {r['domains'][d]['static']:.3f}"
            for d in domains) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"run": str(run), "text": (
            f"test split, {args.tokens} tokens per domain, blocks of {args.seq}"),
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
