"""Our ARC-Easy (or other task) numbers against lm-eval's own HFLM on the same documents.

    python benchmarks/lm_eval_compare.py --task arc_easy --limit 500 --json runs/lm-eval-compare.json
"""

import argparse
import json

import torch

from flextron_fx.eval.reference import compare_with_hflm

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    row = compare_with_hflm(args.model, args.task, args.limit)
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
