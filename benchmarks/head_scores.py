"""Which head importance sorts SmolLM2's heads best? Perplexity with 6 of 9 heads kept.

    python benchmarks/head_scores.py [--calib 64] [--blocks 24]

For both head modes ("query": 2 of 3 query heads in every KV group; "group": 2 of 3 KV
groups with their query heads) and both scores ("contribution": ||W_o[:, h] a_h||_2,
"output_l1": Eq. 3), against the unsorted order, on held-out Wikipedia text. The
results decide FlextronConfig's defaults; docs/RESULTS.md has the latest numbers.
"""

from __future__ import annotations

import argparse
import json

from flextron_fx import FlextronConfig, flextronize
from flextron_fx.data import calibration_and_heldout
from flextron_fx.eval import perplexity
from flextron_fx.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences of 256")
    ap.add_argument("--blocks", type=int, default=24, help="held-out blocks of 256 tokens")
    args = ap.parse_args()
    model, tok = load("smollm2-135m")
    calib, held, source = calibration_and_heldout(tok)
    calib, held = calib[: args.calib], held[: args.blocks]
    sample = (calib[:2, :16],)
    res = {"eval_tokens": int(held.shape[0] * (held.shape[1] - 1)), "eval_source": source,
           "calibration_sequences": int(calib.shape[0])}
    for mode in ("query", "group"):
        for score in (None, "contribution", "output_l1"):
            cfg = FlextronConfig(head_mode=mode, head_score=score or "contribution")
            em = flextronize(model, sample, calib if score else None, config=cfg,
                             progress=False)
            em.set_widths(6 / 9, kind="attention")
            assert sum(em.widths.values()) > 0
            key = f"{mode}_{score or 'unsorted'}_6of9_ppl"
            res[key] = perplexity(em, held, batch_size=4, desc=key)["ppl"]
            print(key, round(res[key], 2), flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
