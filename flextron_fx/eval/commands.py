"""`flextron eval`: a model or saved elastic model over budgets, domains and tasks."""

from __future__ import annotations

import argparse
import functools
import shlex
import sys


def add_parser(sub) -> None:
    """Register ``flextron eval`` on the top-level subparsers ``sub``."""
    p = sub.add_parser(
        "eval", help="loss per domain and downstream accuracy, per budget; JSON, Markdown, PNG",
        description="Needs `flextron data fetch` first (the domains) and its evaluation sets "
                    "(the tasks). A budget f sets every elastic op to width fraction f.")
    p.add_argument("--model", default="smollm2-135m",
                   help="a bundled model name or a folder saved by `flextron convert`")
    p.add_argument("--tokenizer", default="smollm2-135m",
                   help="bundled model whose tokenizer to use (for a saved elastic model)")
    p.add_argument("--budgets", default="1.0",
                   help="comma list of width fractions, e.g. 1.0,0.75,0.5 (elastic models)")
    p.add_argument("--domains", default="all", help="comma list, 'all', 'small' or 'none'")
    p.add_argument("--tasks", default="all", help="comma list, 'all' or 'none'")
    p.add_argument("--limit", type=int, default=None,
                   help="documents per task, a deterministic subsample (MMLU: over all "
                        "subjects together)")
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="tokens of each domain's test text to score (0: all of it)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--split", default="test", help="which split of the domains to score")
    p.add_argument("--latency-reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--md", default=None, help="Markdown tables (default: JSON path, .md)")
    p.add_argument("--plots", default=None,
                   help="PNG path prefix (default: JSON path without .json)")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=eval_command)


def _save_partial(args: argparse.Namespace, result: dict) -> None:
    """The JSON so far (a stopped run keeps its finished domains and tasks)."""
    import json
    from pathlib import Path

    from flextron_fx.data._fetch import write_atomic

    write_atomic(Path(args.json), json.dumps({**result, "model": args.model,
                                              "command": _command(), "partial": True},
                                             indent=1))


def _command() -> str:
    return "flextron " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def eval_command(args: argparse.Namespace) -> int:
    import torch

    from flextron_fx.data.corpus import DataNotFetchedError
    from flextron_fx.data.domains import resolve_domains
    from flextron_fx.data.evalsets import EvalSetNotFetchedError
    from flextron_fx.eval.harness import evaluate, load_model, write_outputs
    from flextron_fx.eval.tasks import resolve_tasks
    from flextron_fx.models import load

    try:
        domains = [] if args.domains == "none" else resolve_domains(args.domains)
        tasks = resolve_tasks(args.tasks)
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        if args.threads:
            torch.set_num_threads(args.threads)
        model, elastic = load_model(args.model)
        _, tokenizer = load(args.tokenizer)
        result = evaluate(model, tokenizer, elastic=elastic, budgets=budgets, domains=domains,
                          tasks=tasks, limit=args.limit, max_tokens=args.max_tokens or None,
                          seq_len=args.seq_len, batch_size=args.batch_size, split=args.split,
                          latency_reps=args.latency_reps, cache_dir=args.cache_dir,
                          echo=functools.partial(print, flush=True),
                          on_progress=functools.partial(_save_partial, args))
    except (ValueError, DataNotFetchedError, EvalSetNotFetchedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["model"] = args.model
    result["command"] = _command()
    for path in write_outputs(result, args.json, args.md, args.plots):
        print(f"wrote {path}")
    return 0
