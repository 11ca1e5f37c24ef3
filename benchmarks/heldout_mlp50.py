"""Held-out perplexity of saved elastic models at full width and with half of every MLP.

    python benchmarks/heldout_mlp50.py runs/convert-e3 runs/train-c/final [--json out.json]
    python benchmarks/heldout_mlp50.py runs/convert-r128 --cuts mlp50,heads3of9,uniform50

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

CUTS = {"mlp50": ("MLP 50 %", 0.5, "mlp"), "heads3of9": ("heads 3/9", 3 / 9, "attention"),
        "heads6of9": ("heads 6/9", 6 / 9, "attention"), "uniform50": ("uniform 0.5", 0.5, None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="folders written by flextron convert / train")
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (tokenizer)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cuts", default="mlp50", help=f"comma list of {list(CUTS)}")
    args = ap.parse_args()
    cuts = args.cuts.split(",")
    unknown = sorted(set(cuts) - set(CUTS))
    if unknown:
        ap.error(f"unknown cuts {unknown}; choose from {list(CUTS)}")
    _, held, source = calibration_and_heldout(tokenizer(args.model), n_calib=1)
    out = {"text": f"validation split of {source}, {held.shape[0]} x 256 tokens"}
    print(f"{'model':<40}{'full':>10}" + "".join(f"{CUTS[c][0]:>12}" for c in cuts))
    for path in args.models:
        em = flextron_fx.load(path)
        row = {"full_ppl": perplexity(em, held, desc="full")["ppl"]}
        for c in cuts:
            _, frac, kind = CUTS[c]
            with em.at(frac, kind=kind):
                got = perplexity(em, held, desc=c)
            row[f"{c}_ppl"], row["tokens"] = got["ppl"], got["tokens"]
        out[path] = row
        print(f"{path:<40}{row['full_ppl']:>10.2f}"
              + "".join(f"{row[f'{c}_ppl']:>12.2f}" for c in cuts), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
