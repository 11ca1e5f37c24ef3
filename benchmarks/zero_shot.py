"""Zero-shot quality of SmolLM2's sub-networks: importance scores x compensation.

    python benchmarks/zero_shot.py [--json runs/zero_shot.json]           # small (default)
    python benchmarks/zero_shot.py --calib 512 --tokens 32768 --domains all --configs all \
        --pairs all --mix

Perplexity straight after conversion (no training) on the `test` split of each text
domain (`flextron data fetch`), for every score pair (MLP score / head score of
`flextron_fx/passes/scores.py`), without and with per-width compensation
(`passes/compensate.py`: the mean bias, or with `--rank R` the least-squares fit of rank
R), at the sub-networks MLP 25/50/75 %, heads 3/9 and 6/9 and the uniform budgets 0.75
and 0.5. Calibration: Wikipedia's `calibration` split; with
`--mix`, also a mix of the calibration splits of every evaluated domain, for the score
pairs of `--mix-pairs`. The model is calibrated once (all measures, Taylor included) and
each score pair re-sorts a fresh trace, so all rows see the same calibration tokens.
A sub-network that only cuts MLPs depends only on the MLP score (and heads only on the
head score): such rows are measured once and shared. Results decide FlextronConfig's
defaults; docs/RESULTS.md ("Zero-shot quality") has the latest table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flextron_fx import FlextronConfig
from flextron_fx.analyze import analyze
from flextron_fx.data import load_split, token_blocks
from flextron_fx.data.blocks import calibration_mix
from flextron_fx.data.domains import resolve_domains
from flextron_fx.elastic.model import ElasticModel
from flextron_fx.eval import perplexity
from flextron_fx.models import load
from flextron_fx.passes.compensate import compensate, compensation_tables
from flextron_fx.passes.elasticize import elasticize
from flextron_fx.passes.permute import permute, sort_order
from flextron_fx.passes.rank import measure, score_blocks
from flextron_fx.passes.scores import needs
from flextron_fx.trace import trace

# name -> (kinds it cuts, widths for ElasticModel.set_widths)
CONFIGS = {
    "mlp25": ({"mlp"}, (0.25, "mlp")), "mlp50": ({"mlp"}, (0.5, "mlp")),
    "mlp75": ({"mlp"}, (0.75, "mlp")), "heads3of9": ({"attention"}, (3 / 9, "attention")),
    "heads6of9": ({"attention"}, (6 / 9, "attention")),
    "uniform75": ({"mlp", "attention"}, (0.75, None)),
    "uniform50": ({"mlp", "attention"}, (0.5, None)),
}
SMALL_CONFIGS = "mlp50,heads3of9"
PAIRS = "activation/contribution,act_x_norm/contribution,wanda/contribution," \
        "fluctuation/fluctuation,taylor/taylor"
ALL_PAIRS = PAIRS + ",activation/output_l1"
SMALL_DOMAINS = "wikipedia,german,python"


def build(model, sample, stats, mlp: str, head: str, config: FlextronConfig,
          comp_stats=None):
    """(elastic model without compensation, its blocks, compensation tables) for one score
    pair; the tables come from `comp_stats` if given (default: `stats`)."""
    traced = trace(model, sample)
    gm = traced.graph_module
    analysis = analyze(gm, traced.sample_inputs)
    blocks = analysis.blocks
    scores = score_blocks(gm, blocks, stats, mlp_score=mlp, head_score=head)
    orders = {b.name: sort_order(b, scores[b.name]) for b in blocks}
    permute(gm, analysis, blocks, orders)
    tables = compensation_tables(gm, analysis, blocks, comp_stats or stats, orders, config)
    elasticize(gm, analysis, blocks, config)
    em = ElasticModel(gm, blocks, config, sample_shape=tuple(sample[0].shape),
                      param_prefix=traced.param_prefix)
    return em, blocks, tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences of --seq")
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="test tokens per domain")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--domains", default=SMALL_DOMAINS, help="comma list or 'all'")
    ap.add_argument("--configs", default=SMALL_CONFIGS, help=f"comma list of {list(CONFIGS)} "
                    "or 'all'")
    ap.add_argument("--pairs", default=PAIRS, help=f"MLP/head score pairs, or 'all' ({ALL_PAIRS})")
    ap.add_argument("--mix", action="store_true",
                    help="also calibrate on a mix of every evaluated domain's calibration split")
    ap.add_argument("--mix-pairs", default="activation/contribution,taylor/taylor")
    ap.add_argument("--rank", type=int, default=FlextronConfig().compensation_rank,
                    help="compensation_rank of the compensated rows (0: mean bias only; "
                         "default: FlextronConfig's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a bar chart (PNG) of the results here")
    ap.add_argument("--replot", default=None,
                    help="only print the table (and --plot) of a JSON written by --json")
    args = ap.parse_args()
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        print(table(res, list(res["test_tokens"])))
        if args.plot:
            print(f"wrote {plot(res, args.plot)}")
        return
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load("smollm2-135m")
    domains = resolve_domains(args.domains)
    configs = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    pairs = [tuple(p.split("/")) for p in (ALL_PAIRS if args.pairs == "all" else args.pairs)
             .split(",")]
    n_blocks = max(1, args.tokens // args.seq)
    tests = {d: token_blocks(tok, (t for _, t in load_split(d, "test")), args.seq,
                             max_blocks=n_blocks) for d in domains}
    wiki = token_blocks(tok, (t for _, t in load_split("wikipedia", "calibration")), args.seq,
                        max_blocks=args.calib)
    calibs = {"wikipedia": wiki}
    if args.mix:
        calibs["mix"] = calibration_mix(tok, domains, seq_len=args.seq, n_calib=args.calib)[0]
    sample = (wiki[:2, :16],)
    # each row turns compensation on or off itself
    config = FlextronConfig(compensate="all", compensation_rank=args.rank)
    comp_label = f"comp-r{args.rank}" if args.rank else "comp"
    res: dict = {"setup": {k: v for k, v in vars(args).items()},
                 "test_tokens": {d: int(b.shape[0] * (b.shape[1] - 1)) for d, b in tests.items()},
                 "calibration_tokens": {k: int(v.numel()) for k, v in calibs.items()},
                 "ppl": {}}
    ppl = res["ppl"]

    def run(em, label: str) -> dict:
        return {d: round(perplexity(em, b, batch_size=4, desc=f"{label} {d}")["ppl"], 3)
                for d, b in tests.items()}

    base = trace(model, sample)
    analysis = analyze(base.graph_module, base.sample_inputs)
    for calib_name, calib in calibs.items():
        t = time.perf_counter()
        todo = pairs if calib_name == "wikipedia" else \
            [tuple(p.split("/")) for p in args.mix_pairs.split(",")]
        stats = measure(base.graph_module, analysis, analysis.blocks, calib,
                        measures=needs(*(s for pair in todo for s in pair))
                        | ({"gram"} if args.rank else set()),
                        batch_size=args.calib_batch, sample_inputs=base.sample_inputs)
        print(f"calibrated on {calib_name} ({calib.shape[0]} x {calib.shape[1]}) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        for mlp, head in todo:
            keys = {}
            for comp in (False, True):
                for c in configs:
                    kinds = CONFIGS[c][0]
                    key = "|".join([calib_name, c, mlp if "mlp" in kinds else "-",
                                    head if "attention" in kinds else "-",
                                    comp_label if comp else "plain"])
                    if key not in ppl:
                        keys[(comp, c)] = key
            if not keys and "full" in ppl:
                continue
            em, blocks, tables = build(model, sample, stats, mlp, head, config)
            if "full" not in ppl:
                ppl["full"] = run(em, "full")
                print("full", ppl["full"], flush=True)
            for comp in (False, True):
                if comp:
                    compensate(em.graph_module, blocks, tables)
                for c in configs:
                    key = keys.get((comp, c))
                    if key is None:
                        continue
                    frac, kind = CONFIGS[c][1]
                    with em.at(frac, kind=kind):
                        ppl[key] = run(em, key)
                    print(key, ppl[key], flush=True)
            del em
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(res, domains))
    if args.json:
        from flextron_fx._atomic import write_atomic

        write_atomic(Path(args.json), json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(res, args.plot)}")


def table(res: dict, domains: list[str]) -> str:
    """A markdown table: one row per (config, scores, calibration, compensation)."""
    lines = ["| sub-network | MLP score | head score | calibration | compensation | "
             + " | ".join(domains) + " |",
             "|---|---|---|---|---|" + "---:|" * len(domains)]
    full = res["ppl"]["full"]
    lines.append("| full | | | | | " + " | ".join(f"{full[d]:.2f}" for d in domains) + " |")
    for key, v in sorted(res["ppl"].items()):
        if key == "full":
            continue
        calib, c, mlp, head, comp = key.split("|")
        shown = "no" if comp == "plain" else "yes" if comp == "comp" else f"rank {comp[6:]}"
        lines.append(f"| {c} | {mlp} | {head} | {calib} | {shown} | "
                     + " | ".join(f"{v[d]:.2f}" for d in domains) + " |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> Path:
    """Perplexity relative to the full model (log scale), one panel per sub-network, one
    group of bars per score, one bar per compensation (none, mean bias, least squares of
    a rank), geometric mean over the domains."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flextron_fx._atomic import savefig_atomic

    full = res["ppl"]["full"]
    rows: dict = {}
    for key, v in res["ppl"].items():
        if key == "full":
            continue
        calib, c, mlp, head, comp = key.split("|")
        label = "/".join(x for x in (mlp, head) if x != "-") + ("" if calib == "wikipedia"
                                                                 else f" ({calib})")
        ratio = math.exp(sum(math.log(v[d] / full[d]) for d in full) / len(full))
        rows.setdefault(c, {}).setdefault(label, {})[comp] = ratio
    kinds = sorted({k.split("|")[-1] for k in res["ppl"] if k != "full"},
                   key=lambda k: (k != "plain", len(k), k))  # plain, comp, comp-r<rank>
    names = {"plain": "without", "comp": "mean bias"}
    bar = 0.8 / len(kinds)
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, (c, by_score) in zip(axes[0], sorted(rows.items())):
        labels = sorted(by_score)
        for j, comp in enumerate(kinds):
            ax.bar([i + bar * j for i in range(len(labels))],
                   [by_score[k].get(comp, float("nan")) for k in labels], width=bar,
                   label=names.get(comp, f"least squares, rank {comp[6:]}"))
        ax.set_xticks([i + 0.4 - bar / 2 for i in range(len(labels))], labels, rotation=30,
                      ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{c}: perplexity / full model\n(geometric mean over domains)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return savefig_atomic(fig, path, dpi=90)


if __name__ == "__main__":
    main()
