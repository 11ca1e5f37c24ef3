"""Input adaptivity (paper Figure 9): which candidates dynamic routers give each domain's tokens.

    python benchmarks/token_shares.py ROUTERS [--budget 0.7] [--domains all] \
        [--tokens 4096] [--narrow 0.5] [--json runs/token_shares.json] \
        [--plot docs/img/token-shares.png]
    python benchmarks/token_shares.py --elastic DIR --narrow 0.5 [--seq 256] ...

ROUTERS is a `flextron train-routers` run in dynamic or capacity mode (or its `final/`);
the elastic model and cost table are the ones it was trained with. At one budget T, every
domain's `test` split (`flextron data fetch`) is run through the routed model in blocks
of 256 tokens, and for every op the share of tokens that chose each candidate is counted.
Printed per domain: the token-averaged width fraction of MLP and attention ops, the
token-averaged predicted cost (fraction of the full model's) and the held-out loss; the
JSON holds every op's shares. The plot is one heatmap per kind of op: domains by layer,
colour the mean width fraction its tokens got.

`--narrow F`: also, per domain, how much each kind of op's width matters on that text:
the loss of the same tokens through the elastic model without routers at full width, with
every MLP at F (all heads), and with every attention op at F (full MLPs), and the excess
of each over full width. Routers trained to lower the loss give width where narrowing
costs most, so this says which direction of Figure 9 the backbone itself supports.
`--elastic DIR` instead of ROUTERS: only that, on any saved elastic model (a `flextron
convert` output, before any elastic training, or a training run's `final/`).
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
from flextron_fx.route import routers_of, set_budget
from flextron_fx.route.commands import load_router_run
from flextron_fx.route.selection import router_folder


def _summed_nll(model, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of `ids` [b, seq] under `model`."""
    logits = model(ids)
    logits = getattr(logits, "logits", logits)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()


def shares_of(em, routers, table, blocks: torch.Tensor, batch: int) -> dict:
    """Run `blocks` ([n, seq] ids) through the routed model; per op the share of tokens per
    candidate, plus the token-averaged cost fraction and the next-token loss."""
    counts = {n: torch.zeros(len(r.candidates), dtype=torch.float64)
              for n, r in routers.items()}
    nll, predicted = 0.0, 0
    with torch.inference_mode():
        for i in range(0, blocks.shape[0], batch):
            ids = blocks[i:i + batch]
            nll += _summed_nll(em, ids)
            predicted += ids[:, 1:].numel()
            for n, r in routers.items():
                index = r.last_index
                if isinstance(index, int):  # a router that gave one width to every token
                    counts[n][index] += ids.numel()
                else:
                    counts[n] += torch.bincount(index.flatten().cpu(),
                                                minlength=len(r.candidates)).double()
    share = {n: (c / c.sum()).tolist() for n, c in counts.items()}
    cost = table.fixed + sum(sum(s * c for s, c in zip(share[n], table.costs[n]))
                             for n in share)
    return {"share": share, "cost_fraction": cost / table.full, "loss": nll / predicted}


def narrowed_losses(plain, blocks: torch.Tensor, batch: int, frac: float) -> dict:
    """Next-token loss of `blocks` through `plain` (an elastic model without routers) at
    full width, every MLP at `frac` and every attention op at `frac`, and the excesses."""
    def loss() -> float:
        with torch.inference_mode():
            nll = sum(_summed_nll(plain, blocks[i:i + batch])
                      for i in range(0, blocks.shape[0], batch))
        return nll / blocks[:, 1:].numel()

    with plain.at(1.0):
        full = loss()
        out = {"full": full}
        for kind in ("mlp", "attention"):
            if any(op.kind == kind for op in plain.ops.values()):
                with plain.at(frac, kind=kind):
                    out[kind] = loss()
                out[f"{kind}_excess"] = out[kind] - full
    return out


def width_fraction(em, name: str, share: list[float]) -> float:
    cands = em.ops[name].candidates
    return sum(s * c for s, c in zip(share, cands)) / cands[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("routers", nargs="?",
                    help="flextron train-routers run (dynamic or capacity) or its final/")
    ap.add_argument("--elastic", default=None,
                    help="a saved elastic model instead of ROUTERS: only the --narrow table")
    ap.add_argument("--budget", type=float, default=0.7)
    ap.add_argument("--domains", default="all", help="comma-separated, or 'all' fetched")
    ap.add_argument("--tokens", type=int, default=4096, help="test tokens per domain")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--narrow", type=float, default=None, metavar="F",
                    help="also each domain's loss with every MLP, then every attention op, "
                         "at width fraction F, against full width (no routers)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.elastic:
        if args.narrow is None or args.routers:
            ap.error("--elastic measures --narrow only, without ROUTERS")
        narrow_only(args)
        return
    if not args.routers:
        ap.error("give ROUTERS (or --elastic DIR --narrow F)")

    folder = router_folder(args.routers)
    em, table, meta = load_router_run(folder)
    elastic = meta.get("extra", {}).get("elastic")
    if meta["mode"] not in ("dynamic", "capacity") or table is None:
        raise SystemExit(f"{folder} holds {meta['mode']} routers; per-token shares need "
                         "dynamic or capacity routers trained with a cost table")
    routers = routers_of(em)
    set_budget(em, args.budget)
    tok = tokenizer(args.model)
    plain = None
    if args.narrow is not None:
        plain = load(elastic)
    rows = {}
    for d in tqdm(resolve_domains(args.domains), desc="domains"):
        blocks = domain_tokens(tok, d, split="test", seq_len=args.seq, max_tokens=args.tokens)
        rows[d] = shares_of(em, routers, table, blocks, args.batch)
        kinds = {k: [width_fraction(em, n, s) for n, s in rows[d]["share"].items()
                     if em.ops[n].kind == k] for k in ("mlp", "attention")}
        rows[d]["width_fraction"] = {k: sum(v) / len(v) for k, v in kinds.items() if v}
        w = rows[d]["width_fraction"]
        print(f"{d:10s} tokens {blocks.numel():6d}  mlp {w.get('mlp', float('nan')):.3f}  "
              f"attention {w.get('attention', float('nan')):.3f}  predicted cost "
              f"{rows[d]['cost_fraction']:.3f}  loss {rows[d]['loss']:.4f}", flush=True)
        if plain is not None:
            rows[d]["narrowed"] = narrowed_losses(plain, blocks, args.batch, args.narrow)
    out = {"routers": str(folder), "elastic": elastic, "mode": meta["mode"],
           "budget": args.budget, "metric": table.metric,
           "text": f"test split, {args.tokens} tokens per domain, blocks of {args.seq}",
           "narrow": args.narrow,
           "ops": {n: {"kind": op.kind, "candidates": list(op.candidates)}
                   for n, op in em.ops.items()},
           "domains": rows}
    print(_table(rows))
    if plain is not None:
        print(_narrow_table(rows, args.narrow))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(em, rows, args.budget, args.plot)


def narrow_only(args) -> None:
    """`--elastic`: per domain, the --narrow losses of a saved elastic model."""
    plain, tok, rows = load(args.elastic), tokenizer(args.model), {}
    for d in tqdm(resolve_domains(args.domains), desc="domains"):
        blocks = domain_tokens(tok, d, split="test", seq_len=args.seq, max_tokens=args.tokens)
        rows[d] = {"narrowed": narrowed_losses(plain, blocks, args.batch, args.narrow)}
    print(_narrow_table(rows, args.narrow))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"elastic": args.elastic, "narrow": args.narrow, "text": f"test split, "
             f"{args.tokens} tokens per domain, blocks of {args.seq}", "domains": rows},
            indent=1))


def _table(rows: dict) -> str:
    lines = ["| domain | MLP width (token mean) | attention width | predicted cost | loss |",
             "|---|---:|---:|---:|---:|"]
    for d, r in rows.items():
        w = r["width_fraction"]
        lines.append(f"| {d} | {w.get('mlp', float('nan')):.3f} | "
                     f"{w.get('attention', float('nan')):.3f} | {r['cost_fraction']:.3f} | "
                     f"{r['loss']:.4f} |")
    return "\n".join(lines)


def _narrow_table(rows: dict, frac: float) -> str:
    head = (f"| domain | loss, full width | MLP at {frac:g}: loss (excess) | "
            f"attention at {frac:g}: loss (excess) |")
    lines = [head, "|---|---:|---:|---:|"]
    for d, r in rows.items():
        n = r["narrowed"]
        cells = [f"{n[k]:.4f} (+{n[k + '_excess']:.4f})" if k in n else "-"
                 for k in ("mlp", "attention")]
        lines.append(f"| {d} | {n['full']:.4f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _plot(em, rows: dict, budget: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("mlp", "attention") if any(op.kind == k for op in em.ops.values())]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 2.2 + 1.6 * len(kinds)), squeeze=False)
    domains = list(rows)
    for ax, kind in zip(axes[:, 0], kinds):
        names = [n for n, op in em.ops.items() if op.kind == kind]
        grid = [[width_fraction(em, n, rows[d]["share"][n]) for n in names] for d in domains]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xticks(range(len(names)), [str(i) for i in range(len(names))], fontsize=7)
        ax.set_xlabel(f"{kind} op (layer order)")
        fig.colorbar(im, ax=ax, label="mean width fraction")
    axes[0, 0].set_title(f"Width the dynamic routers give each domain's tokens, budget {budget:g}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
