"""Input adaptivity (paper Figure 9): which candidates dynamic routers give each domain's tokens.

    python benchmarks/token_shares.py ROUTERS [--budget 0.7] [--domains all] \
        [--tokens 4096] [--narrow 0.5] [--json runs/token_shares.json] \
        [--plot docs/img/token-shares.png]
    python benchmarks/token_shares.py --elastic DIR [--narrow 0.5] [--per-op 2] \
        [--oracle-share 0.5] [--seq 256] [--plot runs/oracle.png] ...

ROUTERS is a `flextron train-routers` run in dynamic or capacity mode (or its `final/`);
the elastic model and cost table are the ones it was trained with. At one budget T, every
domain's `test` split (`flextron data fetch`) is run through the routed model in blocks
of 256 tokens, and for every op the share of tokens that chose each candidate is counted.
Printed per domain: the token-averaged width fraction of MLP and attention ops, the
token-averaged predicted cost (fraction of the full model's) and the held-out loss; the
JSON holds every op's shares. Then Figure 9's claim layer by layer (`versus_prose` in the
JSON): for every domain that is not English prose (Wikipedia, arXiv, books), at how many
layers of each kind its tokens got a narrower mean width than every prose domain's. The
plot is one heatmap per kind of op: domains by layer, colour the mean width fraction its
tokens got.

`--narrow F`: also, per domain, how much each kind of op's width matters on that text:
the loss of the same tokens through the elastic model without routers at full width, with
every MLP at F (all heads), and with every attention op at F (full MLPs), and the excess
of each over full width. Routers trained to lower the loss give width where narrowing
costs most, so this says which direction of Figure 9 the backbone itself supports.
Per token as well: every token's own excess is pooled over the domains, an oracle
narrows the `--oracle-share` of all tokens whose excess is smallest, and the table gives
each domain's median token excess and the share of its tokens the oracle narrowed (a
domain of many easy tokens can lose most on average and still hold most narrowable ones).
`--per-op K` (with `--elastic`): the same oracle one op at a time, each narrowed alone to
its smallest candidate (every K-th layer of each kind, and the last), as a table and a
plot of domains by layer: at which layers the backbone lets a per-token router narrow a
domain's tokens more often than others'.
`--elastic DIR` instead of ROUTERS: only these, on any saved elastic model (a `flextron
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
from flextron_fx.route.measured import token_nll
from flextron_fx.route.selection import router_folder
from flextron_fx.route.sensitivity import token_excess
from flextron_fx.route.train import token_losses


def _token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of every predicted token of `ids` [b, seq]."""
    logits = model(ids)
    return token_losses(getattr(logits, "logits", logits), ids).flatten()


def shares_of(em, routers, table, blocks: torch.Tensor, batch: int) -> dict:
    """Run `blocks` ([n, seq] ids) through the routed model; per op the share of tokens per
    candidate, plus the token-averaged cost fraction and the next-token loss."""
    counts = {n: torch.zeros(len(r.candidates), dtype=torch.float64)
              for n, r in routers.items()}
    nll, predicted = 0.0, 0
    with torch.inference_mode():
        for i in range(0, blocks.shape[0], batch):
            ids = blocks[i:i + batch]
            nll += _token_nll(em, ids).sum().item()
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


def narrowed_losses(plain, blocks: torch.Tensor, batch: int, frac: float):
    """Next-token loss of `blocks` through `plain` (an elastic model without routers) at
    full width, every MLP at `frac` and every attention op at `frac`, and the excesses;
    also, per kind, every token's own excess (narrowed minus full-width NLL)."""
    with plain.at(1.0):
        full = token_nll(plain, blocks, batch)
        out, per_token = {"full": full.mean().item()}, {}
        for kind in ("mlp", "attention"):
            if any(op.kind == kind for op in plain.ops.values()):
                with plain.at(frac, kind=kind):
                    narrowed = token_nll(plain, blocks, batch)
                out[kind] = narrowed.mean().item()
                out[f"{kind}_excess"] = out[kind] - out["full"]
                per_token[kind] = narrowed - full
    return out, per_token


def per_op_oracle(plain, blocks: dict, batch: int, every: int, share: float,
                  first_order: bool = False) -> dict:
    """One op at a time at its smallest candidate, the rest at full width (every `every`-th
    op of each kind in layer order, and the last): per op and domain, the share of the
    domain's tokens among the `share` of all tokens an oracle narrows, and the median and
    mean token excess. Figure 9 shows one layer; this says at which layers the backbone
    lets a per-token router narrow code and HTML more often than prose.

    A token's excess is its own loss's change with the op narrowed for every token, or
    with `first_order` the first-order change of the whole block's loss with the op
    narrowed for that token alone (`route.sensitivity.token_excess`: every op from one
    forward and backward pass, the per-token routing question itself)."""
    chosen = []
    for kind in ("mlp", "attention"):
        names = [n for n, op in plain.ops.items() if op.kind == kind]
        chosen += [(kind, i, n) for i, n in enumerate(names)
                   if i % every == 0 or i == len(names) - 1]
    if first_order:
        per_op = {d: _first_order(plain, b, batch) for d, b in tqdm(blocks.items(),
                                                                   desc="domains")}
    else:
        with plain.at(1.0):
            full = {d: token_nll(plain, b, batch) for d, b in blocks.items()}
    out = {}
    for kind, layer, name in (chosen if first_order else tqdm(chosen, desc="ops")):
        width = plain.ops[name].candidates[0]
        if first_order:
            excess = {d: {kind: per_op[d][name]} for d in blocks}
        else:  # this op narrowed, every other at full width
            with plain.at(1.0), plain.at({name: width}):
                excess = {d: {kind: token_nll(plain, b, batch) - full[d]}
                          for d, b in blocks.items()}
        shares = oracle_shares(excess, share)
        out[name] = {"kind": kind, "layer": layer, "width": width,
                     "full": plain.ops[name].full,
                     "domains": {d: {**shares[d][kind],
                                     "mean_excess": excess[d][kind].mean().item()}
                                 for d in blocks}}
    return out


def _first_order(plain, blocks: torch.Tensor, batch: int) -> dict:
    """{op: first-order excess of each predicted position at the op's smallest candidate}
    (the last position predicts nothing, so it is left out, as in the measured excess)."""
    parts = [token_excess(plain, blocks[i:i + batch]) for i in range(0, blocks.shape[0], batch)]
    return {op: torch.cat([p[op][:, :-1, 0].flatten() for p in parts]) for op in parts[0]}


def oracle_shares(per_token: dict, share: float) -> dict:
    """Which domains' tokens an oracle would narrow: pool every domain's per-token excesses
    (one kind at a time), take the `share` of all tokens with the smallest, and count per
    domain the fraction of its tokens among them, with its median token excess. A router
    that lowers the loss narrows where narrowing costs least, so these shares are the
    per-token direction of Figure 9 that the backbone allows."""
    out = {d: {} for d in per_token}
    for kind in {k for v in per_token.values() for k in v}:
        pooled = torch.cat([v[kind] for v in per_token.values()])
        cut = pooled.kthvalue(max(1, round(share * pooled.numel()))).values
        for d, v in per_token.items():
            out[d][kind] = {"narrowed_share": (v[kind] <= cut).float().mean().item(),
                            "median_excess": v[kind].median().item()}
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
    ap.add_argument("--per-op", type=int, default=None, metavar="K",
                    help="with --elastic: narrow one op at a time to its smallest candidate "
                         "(every K-th layer of each kind, and the last) and give the oracle's "
                         "per-domain shares per op (--plot draws them)")
    ap.add_argument("--first-order", action="store_true",
                    help="with --per-op: each token's first-order excess with the op narrowed "
                         "for it alone (one pass for every op) instead of narrowing the op "
                         "for all tokens, one op per pass")
    ap.add_argument("--oracle-share", type=float, default=0.5, metavar="Q",
                    help="with --narrow or --per-op: the share of all tokens the oracle "
                         "narrows, in (0, 1)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None,
                    help="the routers' widths per domain and op; with --elastic, the "
                         "--per-op oracle's shares")
    args = ap.parse_args()
    if not 0.0 < args.oracle_share < 1.0:
        ap.error(f"--oracle-share is a fraction in (0, 1), got {args.oracle_share}")
    if args.per_op is not None and args.per_op < 1:
        ap.error(f"--per-op K takes every K-th layer, K >= 1; got {args.per_op}")
    if args.first_order and not args.per_op:
        ap.error("--first-order is a way of measuring --per-op K; give --per-op")
    if args.per_op and not args.elastic:
        ap.error("--per-op measures an elastic model without routers: give --elastic DIR "
                 "(a router run's elastic model is in its config.json, extra.elastic)")
    if args.elastic:
        if (args.narrow is None and not args.per_op) or args.routers:
            ap.error("--elastic measures --narrow and/or --per-op, without ROUTERS")
        narrow_only(args)
        return
    if not args.routers:
        ap.error("give ROUTERS (or --elastic DIR with --narrow F and/or --per-op K)")

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
    rows, per_token = {}, {}
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
            rows[d]["narrowed"], per_token[d] = narrowed_losses(plain, blocks, args.batch,
                                                                args.narrow)
    out = {"routers": str(folder), "elastic": elastic, "mode": meta["mode"],
           "budget": args.budget, "metric": table.metric,
           "text": f"test split, {args.tokens} tokens per domain, blocks of {args.seq}",
           "narrow": args.narrow, "oracle_share": args.oracle_share,
           "ops": {n: {"kind": op.kind, "candidates": list(op.candidates)}
                   for n, op in em.ops.items()},
           "domains": rows}
    print(_table(rows))
    out["versus_prose"] = versus_prose(em, rows)
    if out["versus_prose"]:
        print(_versus_prose_table(out["versus_prose"]))
    if plain is not None:
        _add_oracle(rows, per_token, args.oracle_share)
        print(_narrow_table(rows, args.narrow))
        print(_oracle_table(rows, args.narrow, args.oracle_share))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(em, rows, args.budget, args.plot)


def narrow_only(args) -> None:
    """`--elastic`: per domain, the --narrow losses and/or the --per-op oracle of a saved
    elastic model."""
    plain, tok = load(args.elastic), tokenizer(args.model)
    blocks = {d: domain_tokens(tok, d, split="test", seq_len=args.seq, max_tokens=args.tokens)
              for d in resolve_domains(args.domains)}
    out = {"elastic": args.elastic, "oracle_share": args.oracle_share,
           "text": f"test split, {args.tokens} tokens per domain, blocks of {args.seq}"}
    if args.narrow is not None:
        rows, per_token = {}, {}
        for d in tqdm(blocks, desc="domains"):
            narrowed, per_token[d] = narrowed_losses(plain, blocks[d], args.batch, args.narrow)
            rows[d] = {"narrowed": narrowed}
        _add_oracle(rows, per_token, args.oracle_share)
        print(_narrow_table(rows, args.narrow))
        print(_oracle_table(rows, args.narrow, args.oracle_share))
        out.update(narrow=args.narrow, domains=rows)
    if args.per_op:
        out["per_op"] = per_op_oracle(plain, blocks, args.batch, args.per_op, args.oracle_share,
                                      args.first_order)
        out["first_order"] = args.first_order
        print(_per_op_table(out["per_op"], args.oracle_share))
        if args.plot:
            _plot_per_op(out["per_op"], args.oracle_share, args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


PROSE = ("wikipedia", "arxiv", "books")  # English prose: Figure 9's reference


def versus_prose(em, rows: dict) -> dict:
    """Figure 9's claim layer by layer: for each kind of op and each domain that is not
    English prose, at how many layers its tokens got a narrower mean width than every
    English prose domain's (and than the widest). Empty without a prose domain."""
    prose = [d for d in PROSE if d in rows]
    if not prose:
        return {}
    out = {}
    for kind in ("mlp", "attention"):
        names = [n for n, op in em.ops.items() if op.kind == kind]
        if not names:
            continue
        width = {d: [width_fraction(em, n, r["share"][n]) for n in names]
                 for d, r in rows.items()}
        out[kind] = {d: {"layers": len(names),
                         "narrower_than_all_prose": sum(
                             w < min(width[p][i] for p in prose) for i, w in enumerate(ws)),
                         "narrower_than_some_prose": sum(
                             w < max(width[p][i] for p in prose) for i, w in enumerate(ws))}
                     for d, ws in width.items() if d not in prose}
    return out


def _versus_prose_table(vs: dict) -> str:
    lines = ["| domain | " + " | ".join(f"{k} layers narrower than all prose (than some)"
                                        for k in vs) + " |",
             "|---|" + "---:|" * len(vs)]
    for d in next(iter(vs.values())):
        lines.append(f"| {d} | " + " | ".join(
            f"{v[d]['narrower_than_all_prose']} ({v[d]['narrower_than_some_prose']}) "
            f"of {v[d]['layers']}" for v in vs.values()) + " |")
    return "\n".join(lines)


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


def _add_oracle(rows: dict, per_token: dict, share: float) -> None:
    for d, o in oracle_shares(per_token, share).items():
        rows[d]["oracle"] = o


def _oracle_table(rows: dict, frac: float, share: float) -> str:
    kinds = [k for k in ("mlp", "attention") if any(k in r["oracle"] for r in rows.values())]
    head = "| domain | " + " | ".join(
        f"{k} at {frac:g}: median token excess | share of its tokens among the "
        f"{share:.0%} an oracle narrows" for k in kinds) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(kinds)]
    for d, r in rows.items():
        o = r["oracle"]
        lines.append(f"| {d} | " + " | ".join(
            f"{o[k]['median_excess']:+.4f} | {o[k]['narrowed_share']:.3f}" for k in kinds)
            + " |")
    return "\n".join(lines)


def _per_op_table(per_op: dict, share: float) -> str:
    domains = list(next(iter(per_op.values()))["domains"])
    lines = [(f"Share of each domain's tokens among the {share:.0%} of all an oracle "
              "narrows, one op at its smallest candidate:"),
             "| op | layer | width | " + " | ".join(domains) + " |",
             "|---|---:|---:|" + "---:|" * len(domains)]
    for r in per_op.values():
        lines.append(f"| {r['kind']} | {r['layer']} | {r['width']}/{r['full']} | " + " | ".join(
            f"{r['domains'][d]['narrowed_share']:.3f}" for d in domains) + " |")
    return "\n".join(lines)


def _plot_per_op(per_op: dict, share: float, path: str) -> None:
    domains = list(next(iter(per_op.values()))["domains"])
    panels = []
    for kind in ("mlp", "attention"):
        rows = [r for r in per_op.values() if r["kind"] == kind]
        if rows:
            panels.append(([[r["domains"][d]["narrowed_share"] for r in rows] for d in domains],
                           [str(r["layer"]) for r in rows],
                           f"{kind} op narrowed alone to its smallest candidate (layer)",
                           "share of tokens narrowed",
                           {"cmap": "coolwarm_r", "vmin": share - 0.3, "vmax": share + 0.3}))
    _heatmaps(domains, panels,
              f"Which domains' tokens an oracle narrows ({share:.0%} of all tokens)", path)


def _plot(em, rows: dict, budget: float, path: str) -> None:
    domains, panels = list(rows), []
    for kind in ("mlp", "attention"):
        names = [n for n, op in em.ops.items() if op.kind == kind]
        if names:
            panels.append(([[width_fraction(em, n, rows[d]["share"][n]) for n in names]
                            for d in domains],
                           [str(i) for i in range(len(names))], f"{kind} op (layer order)",
                           "mean width fraction", {"cmap": "viridis", "vmin": 0, "vmax": 1}))
    _heatmaps(domains, panels,
              f"Width the dynamic routers give each domain's tokens, budget {budget:g}", path)


def _heatmaps(domains: list, panels: list, title: str, path: str) -> None:
    """One heatmap per panel, domains by op; a panel is (grid, x tick labels, x label,
    colour bar label, imshow keywords)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 + 1.6 * len(panels)),
                             squeeze=False)
    for ax, (grid, ticks, xlabel, label, style) in zip(axes[:, 0], panels):
        im = ax.imshow(grid, aspect="auto", **style)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel(xlabel)
        fig.colorbar(im, ax=ax, label=label)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
