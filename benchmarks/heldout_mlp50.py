"""Held-out perplexity of saved elastic models at full width and with half of every MLP.

    python benchmarks/heldout_mlp50.py runs/convert-e3 runs/train-c/final [--json out.json]

The text is the same 32,768 tokens as `flextron ablate-sorting` (the first 128 blocks of
256 tokens of the Wikipedia domain's validation split, `calibration_and_heldout`), which
`flextron train-elastic --domains wikipedia` validates on (its first `--eval-tokens`) and
never trains on; `convert` calibrates on the calibration split.
"""

from __future__ import annotations

import argparse
import json

import flextron_fx
from flextron_fx.data import calibration_and_heldout
from flextron_fx.eval import perplexity
from flextron_fx.models import tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="folders written by flextron convert / train")
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    _, held, source = calibration_and_heldout(tokenizer(args.model), n_calib=1)
    out = {"text": f"validation split of {source}, {held.shape[0]} x 256 tokens"}
    print(f"{'model':<40}{'full':>10}{'MLP 50 %':>10}")
    for path in args.models:
        em = flextron_fx.load(path)
        full = perplexity(em, held, desc="full")
        em.set_widths(0.5, kind="mlp")
        half = perplexity(em, held, desc="mlp50")
        out[path] = {"full_ppl": full["ppl"], "mlp50_ppl": half["ppl"], "tokens": half["tokens"]}
        print(f"{path:<40}{full['ppl']:>10.2f}{half['ppl']:>10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
