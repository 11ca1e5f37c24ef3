"""`flextron train-routers RUN --elastic DIR --lut LUT --mode static|dynamic|capacity` trains
routers on a saved elastic model (backbone frozen); `flextron select DIR --budget
latency=0.6` turns a budget into per-op widths with trained static routers; `flextron
joint-tune RUN --routers ROUTER_RUN` fine-tunes trained routers and the backbone together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import CheckpointError, TrainingError


def add_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train-routers", formatter_class=fmt, description=__doc__,
                       help="train routers for budgets (paper Figure 3)")
    p.add_argument("run_dir", help="checkpoints, metrics.jsonl, curves.png and final/ "
                                   "(the routers) go here")
    p.add_argument("--elastic", required=True,
                   help="saved elastic model (flextron convert --out, or a train-elastic "
                        "run's final/)")
    p.add_argument("--mode", choices=["static", "dynamic", "capacity"], default="static")
    p.add_argument("--metric", choices=["latency", "params", "memory"], default="latency",
                   help="what the budget limits")
    p.add_argument("--lut", default=None,
                   help="latency table (flextron profile --json); needed for --metric latency")
    _training_args(p)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--surrogate-threshold", type=float, default=0.05,
                   help="routers follow the surrogate once its MSE is below this")
    p.add_argument("--surrogate-explained", type=float, default=None, metavar="SHARE",
                   help="routers follow the surrogate once it explains this share of the "
                        "variance of fresh samples' targets (e.g. 0.5), instead of "
                        "--surrogate-threshold; carries over between models and text")
    p.add_argument("--surrogate-warmup", type=int, default=20)
    p.add_argument("--budget-loss", choices=["hinge", "match"], default="hinge",
                   help="hinge: Eq. 8, only an expected cost over the budget is penalised; "
                        "match: its distance from the budget either way, so routers spend "
                        "the budget they are given")
    p.add_argument("--target", choices=["loss", "excess"], default="loss",
                   help="what the surrogate predicts: the loss, or the loss above the full "
                        "model's on the same sequence (less noisy, one more forward)")
    p.add_argument("--surrogate-level", choices=["sequence", "token"], default="sequence",
                   help="dynamic/capacity: the surrogate predicts each sequence's loss from "
                        "its token shares (Eq. 10), or each token's loss from its own widths "
                        "and hidden state, so routers learn which tokens need width")
    p.add_argument("--surrogate-context", action="store_true",
                   help="token level: the surrogate also reads the mean widths of the "
                        "token's context (itself and the tokens before it)")
    p.add_argument("--surrogate-memory", type=int, default=512,
                   help="samples (sequences, or tokens with --surrogate-level token) the "
                        "surrogate refits on every step")
    p.add_argument("--init-from", default=None, metavar="STATIC_RUN",
                   help="dynamic/capacity: start every router as this static router run's "
                        "(a train-routers run or its final/), trained on the same elastic "
                        "model")
    p.add_argument("--capacity-timing-reps", type=int, default=None, metavar="N",
                   help="capacity, latency: after training, time capacity routing against "
                        "the full width on this machine, N rounds per batch, and plan each "
                        "budget so the measured time stays within it (default 3; 0: plan on "
                        "the table's prediction only)")
    p.add_argument("--signal", choices=["surrogate", "measured"], default="surrogate",
                   help="surrogate (Figure 3), or measured: each op's per-token loss excess "
                        "measured at every candidate on --measure-blocks blocks per domain, "
                        "routers fitted to the cheapest choices each budget allows, per token "
                        "(dynamic, capacity) or per op (static); first one pass per op "
                        "and candidate over the graph downstream of the op")
    p.add_argument("--measure", default="mlp,attention",
                   help="measured: kinds of ops measured (comma-separated); the others keep "
                        "--init-from's static routers")
    p.add_argument("--measure-blocks", type=int, default=4, metavar="N",
                   help="measured: training blocks per domain, spread over its text")
    p.add_argument("--shrink-toward", choices=["hidden", "mean"], default=None,
                   help="measured, per-token routers: what each token's measured excess is "
                        "shrunk toward: what the router's input (the hidden state) predicts "
                        "of it (a ridge regression per op, cross-fitted over the measured "
                        "blocks; the default), or its op's mean. Static routers learn each "
                        "op's mean")
    p.add_argument("--token-weight", type=float, default=None, metavar="W",
                   help="measured: the share of each token's own deviation from that which "
                        "its target keeps (1: as measured; 0 toward the mean: one width per "
                        "op); default 0 toward hidden, 0.3 toward the mean")
    _run_args(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("joint-tune", formatter_class=fmt, description=__doc__,
                       help="fine-tune trained routers and the backbone together (paper "
                            "section 3.2, after router training)")
    p.add_argument("run_dir", help="checkpoints, metrics.jsonl, curves.png and final/ (the "
                                   "tuned elastic model and its routers) go here")
    p.add_argument("--routers", required=True, metavar="ROUTER_RUN",
                   help="a train-routers run (static or dynamic) or its final/; its elastic "
                        "model and cost table are used")
    _training_args(p)
    p.add_argument("--lr", type=float, default=1e-5, help="backbone's peak learning rate")
    p.add_argument("--router-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--freeze-backbone", action="store_true",
                   help="tune only the routers, on the real loss's gradient (no surrogate); "
                        "the backbone's weights stay as they are")
    _run_args(p)
    p.set_defaults(func=run_joint)

    p = sub.add_parser("select", formatter_class=fmt, description=__doc__,
                       help="per-op widths for a budget from trained static routers")
    p.add_argument("run_dir", help="a train-routers run (its final/) or a router folder")
    p.add_argument("--budget", required=True,
                   help="METRIC=AMOUNT: latency=0.6, latency=60%%, latency=12ms, params=50M, "
                        "memory=300MB")
    p.add_argument("--lut", default=None,
                   help="latency table for the predicted latency (default: the run's own)")
    p.add_argument("--json", default=None, help="also write the selection here")
    p.set_defaults(func=run_select)


def _cost(em, metric: str, lut: str | None):
    from ..profiler import CostModel, LatencyTable

    if metric == "latency" and lut is None:
        raise TrainingError("a latency budget needs a latency table: --lut TABLE (written "
                            "by flextron profile --json), or choose --metric params/memory")
    return CostModel(em, LatencyTable.load(lut) if lut else None)


def warn_unseen_domains(em, domains: list[str], elastic) -> list[str]:
    """Warn when routers are to be trained on text domains that the elastic model's widths
    were never fitted to (neither its calibration nor its elastic training saw them); returns
    those domains. A model sorted and compensated on one domain loses far more at narrow
    widths on the others (docs/ROUTERS.md, "Which text the widths were fitted to"), so
    routers taught on its losses narrow its own domain's tokens most."""
    import warnings

    if not em.domains_seen:  # converted by the Python API or before this was recorded
        return []
    seen = {d for ds in em.domains_seen.values() for d in ds}
    unseen = [d for d in domains if d not in seen]
    if unseen:
        stages = "; ".join(f"{k}: {', '.join(v)}" for k, v in em.domains_seen.items())
        warnings.warn(
            f"{elastic} was fitted to other text ({stages}) than {', '.join(unseen)}: its "
            "narrow widths lose far more on text it did not see, and routers trained on "
            "those losses will narrow the seen domains' tokens most. To route across "
            f"domains, convert with --calib-domains {','.join(domains)} (or train-elastic "
            "on them) first", stacklevel=2)
    return unseen


def run_train(args) -> dict:
    from .. import load
    from .._atomic import write_atomic
    from ..data.domains import resolve_domains
    from ..train.command import training_text
    from .selection import save_routers
    from .train import RouterConfig, train_routers

    try:
        domains = resolve_domains(args.domains)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    config = RouterConfig(
        steps=args.steps, mode=args.mode, metric=args.metric, batch=args.batch,
        budget_range=args.budget_range and tuple(args.budget_range), lr=args.lr,
        latency_weight=args.latency_weight, budget_loss=args.budget_loss,
        surrogate_threshold=args.surrogate_threshold, surrogate_warmup=args.surrogate_warmup,
        surrogate_explained=args.surrogate_explained,
        target=args.target, surrogate_level=args.surrogate_level, memory=args.surrogate_memory,
        surrogate_context=args.surrogate_context,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
        init_from=args.init_from, signal=args.signal, token_weight=args.token_weight,
        shrink_toward=args.shrink_toward,
        measure=tuple(k.strip() for k in args.measure.split(",") if k.strip()),
        capacity_timing_reps=(args.capacity_timing_reps if args.capacity_timing_reps is not None
                              else 3 if args.mode == "capacity" and args.metric == "latency"
                              else 0),
        extra={"elastic": str(args.elastic), "lut": args.lut, "seq": args.seq,
               "domains": domains,
               **({"measure_blocks": args.measure_blocks} if args.signal == "measured"
                  else {})})
    config.validate()
    em = load(args.elastic)
    warn_unseen_domains(em, domains, args.elastic)
    cost = _cost(em, args.metric, args.lut)
    if args.measure_blocks < 1:
        raise TrainingError(f"--measure-blocks is a number of blocks per domain >= 1, got "
                            f"{args.measure_blocks}")
    tokens, heldout = training_text(
        args.model, domains, ["train", "calibration"], args.seq, args.eval_tokens,
        per_domain=args.measure_blocks if args.signal == "measured" else None)
    max_s = None if args.max_minutes is None else 60 * args.max_minutes
    summary = train_routers(em, tokens, args.run_dir, config, cost, heldout=heldout,
                            resume=args.resume, progress=not args.no_progress,
                            max_seconds=max_s, overwrite=args.overwrite)
    run = Path(args.run_dir)
    if summary["status"] == "done":
        from .costs import CostTable

        table = CostTable.coerce(em, cost, args.metric)
        save_routers(em, run / "final", table,
                     extra={**config.extra, "budget_range": summary["budget_range"]})
        summary["final"] = str(run / "final")
    write_atomic(run / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def _training_args(p) -> None:
    """Text, steps and budgets: what train-routers and joint-tune share."""
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled model whose tokenizer reads the training text")
    p.add_argument("--domains", default="wikipedia")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--budget-range", type=float, nargs=2, default=None,
                   metavar=("LOW", "HIGH"), help="budgets sampled per sequence, fractions "
                   "of the full model's cost (default: train-routers 0.4 to 1, or from "
                   "the cheapest sub-network's cost where that is more than 0.4; "
                   "joint-tune the range its routers were trained on)")
    p.add_argument("--latency-weight", type=float, default=10.0, help="lambda of Eq. 7")


def _run_args(p) -> None:
    """Checkpoints, evaluation, stopping and resuming of a training run."""
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run_joint(args) -> dict:
    from .._atomic import write_atomic
    from ..data.domains import resolve_domains
    from ..export.checkpoint import check_target
    from ..train.command import training_text
    from .joint import JointConfig, save_tuned, tune_jointly
    from .selection import save_routers

    try:
        domains = resolve_domains(args.domains)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    run = Path(args.run_dir)
    check_target(run / "final", args.overwrite)
    mode = "dynamic" if read_mode(args.routers) == "capacity" else None
    em, table, meta = load_router_run(args.routers, mode)
    warn_unseen_domains(em, domains, meta.get("extra", {}).get("elastic", args.routers))
    # default: the range the routers were trained on (older router files: the table's)
    budget_range = args.budget_range or meta.get("extra", {}).get("budget_range")
    config = JointConfig(
        steps=args.steps, batch=args.batch,
        budget_range=budget_range and tuple(budget_range), lr=args.lr,
        router_lr=args.router_lr, latency_weight=args.latency_weight, warmup=args.warmup,
        freeze_backbone=args.freeze_backbone, checkpoint_every=args.checkpoint_every, seed=args.seed,
        extra={"routers": str(args.routers), "seq": args.seq, "domains": domains})
    config.validate()
    tokens, heldout = training_text(args.model, domains, ["train", "calibration"], args.seq,
                                    args.eval_tokens)
    max_s = None if args.max_minutes is None else 60 * args.max_minutes
    summary = tune_jointly(em, tokens, run, config, table, heldout=heldout,
                           resume=args.resume, progress=not args.no_progress,
                           max_seconds=max_s, overwrite=args.overwrite)
    if summary["status"] == "done":
        extra = {**meta.get("extra", {}), "joint": str(run),
                 "budget_range": summary["budget_range"]}
        if config.freeze_backbone:  # the routers' own elastic model: only they are saved
            save_routers(em, run / "final", table, extra=extra)
        else:
            em.note_domains("joint-tune", domains)
            save_tuned(em, run / "final", table, extra=extra, overwrite=args.overwrite)
        summary["final"] = str(run / "final")
    write_atomic(run / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


def read_mode(path: str | Path) -> str:
    """The mode of the routers saved at `path` (a run, its final/, or a router folder)."""
    from .selection import read_router_meta, router_folder

    return read_router_meta(router_folder(path))["mode"]


def load_router_run(path: str | Path, mode: str | None = None):
    """(elastic model with the routers of `path` injected, their cost table, their saved
    metadata) for a `train-routers` run, its `final/`, or a router folder; `mode` as in
    `load_routers`."""
    from .. import load
    from .selection import load_routers, read_router_meta, router_folder

    folder = router_folder(path)
    meta = read_router_meta(folder)
    elastic = meta.get("extra", {}).get("elastic")
    if not elastic:
        raise CheckpointError(f"{folder} does not say which elastic model its routers belong "
                              "to (extra.elastic in routers.json)")
    em = load(elastic)
    _, table, meta = load_routers(em, folder, mode)
    if table is None:
        raise CheckpointError(f"{folder} holds no cost table; retrain the routers")
    return em, table, meta


def run_select(args) -> dict:
    from ..profiler import Budget
    from .selection import select

    budget = Budget.parse(args.budget)
    em, table, meta = load_router_run(args.run_dir)
    lut = args.lut or meta.get("extra", {}).get("lut")
    from ..profiler import CostModel, LatencyTable

    cost_model = CostModel(em, LatencyTable.load(lut) if lut else None)
    sel = select(em, budget, table, cost_model=cost_model)
    print(sel)
    if args.json:
        from .._atomic import write_atomic

        write_atomic(Path(args.json), json.dumps(sel.to_dict(), indent=1))
    return sel.to_dict()
