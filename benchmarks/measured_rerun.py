"""Measuring excess: the whole model again per op and candidate, or only what the op reaches.

`train-routers --signal measured` measures every op at every narrower candidate
(route/measured.py). Until the twenty-eighth session each of those passes ran the whole
model (`em.at({op: width})`, then a forward, as a static program after the first batch);
now `Rerun` runs only the graph downstream of the op's width node, every other value taken
from one full-width pass per batch. This times both, interleaved, on a sample of ops
(evenly spaced through the model, at their narrowest candidate), and checks that they give
the same token losses.

    python benchmarks/measured_rerun.py runs/chain/train/final --ops 7 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flextron_fx import load
from flextron_fx.eval.loss import domain_tokens
from flextron_fx.models import tokenizer
from flextron_fx.route.measured import Rerun, token_nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elastic", help="an elastic model folder (convert or train-elastic)")
    ap.add_argument("--ops", type=int, default=7, help="ops timed, evenly spaced")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--domain", default="wikipedia")
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    em = load(args.elastic)
    ids = domain_tokens(tokenizer(args.model), args.domain, split="validation",
                        seq_len=args.seq, max_tokens=args.batch * args.seq)[:args.batch]
    names = list(em.ops)
    picked = [names[round(i * (len(names) - 1) / max(1, args.ops - 1))]
              for i in range(args.ops)]
    rerun = Rerun(em, names)
    rows = []
    with torch.inference_mode():
        start = time.perf_counter()
        full = rerun.full(ids)
        full_s = time.perf_counter() - start
        kept = sum(v.numel() * v.element_size() for n, v in rerun.values.items()
                   if isinstance(v, torch.Tensor) and n.op != "get_attr")  # not weights
        for name in picked:
            width = em.ops[name].candidates[0]
            whole, part = [], []
            with em.at({name: width}):
                token_nll(em, ids, args.batch)  # the static program is built on the second
                token_nll(em, ids, args.batch)
            for _ in range(args.rounds):
                with em.at({name: width}):
                    start = time.perf_counter()
                    old = token_nll(em, ids, args.batch)
                    whole.append(time.perf_counter() - start)
                start = time.perf_counter()
                new = rerun.nll(name, width)
                part.append(time.perf_counter() - start)
            diff = float((old - new).abs().max())
            row = {"op": name, "width": width, "whole_s": statistics.median(whole),
                   "rerun_s": statistics.median(part), "max_abs_diff": diff}
            row["ratio"] = row["rerun_s"] / row["whole_s"]
            rows.append(row)
            print(f"{name:32s} width {width:5d}  whole {row['whole_s']:.3f} s  rerun "
                  f"{row['rerun_s']:.3f} s  ratio {row['ratio']:.3f}  max |diff| {diff:.2e}")
    mean_ratio = statistics.fmean(r["ratio"] for r in rows)
    print(f"full-width pass with kept values {full_s:.3f} s; kept {kept / 2**20:.0f} MiB of "
          f"activations for {args.batch} x {args.seq} tokens; rerun / whole, mean over "
          f"{len(rows)} ops: {mean_ratio:.3f}; mean full-width loss {float(full.mean()):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "mean_ratio": mean_ratio, "full_pass_s": full_s,
                       "kept_mib": kept / 2**20, "batch": args.batch, "seq": args.seq,
                       "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
