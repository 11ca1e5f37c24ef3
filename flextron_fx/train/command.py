"""`flextron train-elastic RUN_DIR ...`: elastic training of a saved elastic model, on one
process or under `torchrun` (DDP or FSDP2)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import TrainingError


def add_parser(sub) -> None:
    p = sub.add_parser("train-elastic", help="train every sub-network (paper Eq. 5)",
                       description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="checkpoints, metrics.jsonl, curves.png and final/ go here")
    p.add_argument("--elastic", default=None,
                   help="saved elastic model to train (flextron convert --out); on --resume "
                        "the run's own record is used when omitted")
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled model whose tokenizer reads the training text")
    p.add_argument("--domains", default="wikipedia",
                   help="comma-separated text domains (flextron data fetch) to train on: "
                        "their --train-splits; validation uses their validation splits")
    p.add_argument("--train-splits", default="train,calibration",
                   help="comma-separated splits to train on; never validation or test "
                        "(calibration is what convert sorted on, so it is fit data too)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=4, help="global batch, in sequences")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--samples", type=int, default=3, help="k sub-networks per step")
    p.add_argument("--sampler", choices=["uniform", "sandwich", "budget", "matformer"],
                   default="uniform", help="uniform: a random candidate per op (the paper's); "
                   "matformer: one granularity below full for every op, distinct within a step")
    p.add_argument("--budget-range", type=float, nargs=2, default=None,
                   metavar=("LOW", "HIGH"), help="non-embedding parameter fractions: the "
                   "range of --sampler budget (default 0.4 0.8); with --sampler matformer, "
                   "only granularities within it")
    p.add_argument("--vary", choices=["mlp", "attention"], default=None,
                   help="sample sub-networks of this kind of op only (the others stay full); "
                        "default: both")
    p.add_argument("--loss", choices=["lm", "kd", "lm+kd"], default="lm")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens for the periodic validation")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="checkpoint and stop after this much training time")
    p.add_argument("--parallel", choices=["auto", "ddp", "fsdp", "none"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="write into RUN_DIR (and RUN_DIR/final) even when it holds files "
                        "that are not a training run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train-compensation", action="store_true",
                   help="keep the per-width compensation biases as calibrated (default: "
                        "train them with the weights)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> dict:
    from .. import load, save
    from .._atomic import write_atomic
    from ..data.domains import resolve_domains
    from ..export.checkpoint import check_target
    from .loop import TrainConfig, check_run_folder, train_elastic
    from .state import full_model_state

    try:
        domains = resolve_domains(args.domains)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    splits = [x.strip() for x in args.train_splits.split(",") if x.strip()]
    if not splits or set(splits) - {"train", "calibration"}:
        raise TrainingError(f"--train-splits must name 'train' and/or 'calibration', got "
                            f"{args.train_splits!r}; validation and test text stay held out")
    rank, world, device = _init_distributed()
    run_dir = Path(args.run_dir)
    check_run_folder(run_dir, args.overwrite)  # before loading anything: fail fast
    check_target(run_dir / "final", args.overwrite)
    record = run_dir / "config.json"
    elastic = args.elastic
    if elastic is None and args.resume and record.is_file():
        elastic = json.loads(record.read_text()).get("extra", {}).get("elastic")
    if elastic is None:
        raise TrainingError("say which elastic model to train: --elastic DIR (a folder "
                            "written by `flextron convert --out DIR`)")
    em = load(elastic).to(device)
    tokens, heldout = training_text(args.model, domains, splits, args.seq, args.eval_tokens)
    if rank == 0:
        print(f"training on {tokens.numel():,} tokens of the {'+'.join(splits)} splits of "
              f"{domains}; "
              f"validating on {heldout.numel():,} tokens of their validation split")
    config = TrainConfig(
        steps=args.steps, batch=args.batch, samples=args.samples, sampler=args.sampler,
        budget_range=args.budget_range and tuple(args.budget_range), vary=args.vary,
        loss=args.loss, kd_temperature=args.kd_temperature, lr=args.lr, warmup=args.warmup,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, seed=args.seed,
        train_compensation=not args.no_train_compensation,
        extra={"elastic": str(elastic), "seq": args.seq, "domains": domains,
               "train_splits": splits})
    max_s = None if args.max_minutes is None else 60 * args.max_minutes
    summary = train_elastic(em, tokens, run_dir, config, heldout=heldout, resume=args.resume,
                            parallel=args.parallel, progress=not args.no_progress,
                            max_seconds=max_s, overwrite=args.overwrite)
    state = full_model_state(em.graph_module)  # every rank joins the gather under FSDP
    if rank == 0:
        if summary["status"] == "done":
            em.note_domains("train-elastic", domains)
            save(em, run_dir / "final", state=state, overwrite=args.overwrite)
            summary["final"] = str(run_dir / "final")
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return summary


def training_text(model: str, domains: list[str], splits: list[str], seq: int,
                  eval_tokens: int, per_domain: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks of `splits`, held-out blocks of the validation split, about
    `eval_tokens` tokens) of `domains`, read with bundled `model`'s tokenizer. With
    `per_domain`, that many training blocks of each domain, spread evenly over its text."""
    from ..data import token_blocks
    from ..models import tokenizer

    tok = tokenizer(model)
    parts = [torch.cat([token_blocks(tok, (t for _, t in _split(d, s)), seq) for s in splits])
             for d in domains]
    if per_domain is not None:
        from .loop import spread_rows

        parts = [spread_rows(p, per_domain) for p in parts]
    tokens = torch.cat(parts)
    per = max(1, eval_tokens // seq // len(domains))
    heldout = torch.cat([token_blocks(tok, (t for _, t in _split(d, "validation")), seq,
                                      max_blocks=per) for d in domains])
    return tokens, heldout


def _split(domain: str, split: str) -> list[tuple[str, str]]:
    """Documents of one split of a domain, as `flextron data fetch` splits it (train and
    validation never share a document with the test split that `flextron eval` reports).
    Wikipedia comes from the gensim wheel even when not fetched."""
    from ..data import load_split, split_corpus, wikipedia_articles
    from ..data.corpus import DataNotFetchedError
    from ..data.domains import DOMAINS

    try:
        return load_split(domain, split)
    except DataNotFetchedError as exc:
        if domain != "wikipedia":
            raise TrainingError(str(exc)) from exc
        wiki = DOMAINS["wikipedia"]  # the same split as the fetched one (seed 0)
        return split_corpus(wikipedia_articles(), wiki.splits, seed=0,
                            max_chars=wiki.max_chars)[split]


def _init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), world, device
