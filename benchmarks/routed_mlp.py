"""Routed (per-token width) MLP against the dense full-width MLP and a masked one.

    python benchmarks/routed_mlp.py [--tokens 4096] [--reps 5] [--shapes smollm2,llama2-7b]
                                    [--json runs/routed_mlp.json]

One SwiGLU MLP layer is flextronized (one `elastic_mlp` node, candidates at 25/50/75/100 %)
and every token gets a candidate: 40 % of the tokens at 25 %, 30 % at 50 %, 20 % at 75 %,
10 % at 100 %, so the mean width is exactly 50 %. Timed side by side, rounds interleaved,
medians reported as ratios to the dense full-width layer:

- dense full width: the original nn.Module, every token at 100 %;
- routed: the elastic node with the per-token widths (tokens grouped by width, each group on
  its weight prefix, results put back in token order);
- masked: what the paper's reference code does, full matmuls times a 0/1 neuron mask;
- static 50 %: the elastic node at one width of 50 % for every token (the ideal the routed
  version approaches when grouping costs nothing).

Routed and masked outputs are checked against each other before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from flextron_fx import flextronize

SHAPES = {"smollm2": (576, 1536), "llama2-7b": (4096, 11008)}
SHARES = (0.4, 0.3, 0.2, 0.1)  # tokens per candidate, smallest first: mean width 50 %


class SwiGLU(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def masked(mlp: SwiGLU, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mlp.down(nn.functional.silu(mlp.gate(x)) * mlp.up(x) * mask)


def per_token_widths(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    counts = [round(s * tokens) for s in SHARES[:k - 1]]
    counts.append(tokens - sum(counts))
    index = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return index[torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))]


def bench_shape(name: str, tokens: int, reps: int) -> dict:
    d, h = SHAPES[name]
    torch.manual_seed(0)
    mlp = SwiGLU(d, h).eval()
    for p in mlp.parameters():
        p.requires_grad_(False)
    em = flextronize(mlp, (torch.randn(2, 16, d),), None, progress=False)
    (op,) = em.ops.values()
    cands = op.candidates
    index = per_token_widths(tokens, len(cands)).reshape(1, tokens)
    widths = torch.tensor(cands)[index]
    mean = widths.float().mean().item() / h
    mask = (torch.arange(h) < widths.reshape(-1, 1)).float().reshape(1, tokens, h)
    x = torch.randn(1, tokens, d)
    half = next(c for c in cands if c >= h / 2)
    with torch.inference_mode():
        with em.at({op.name: index}):
            routed_out = em(x)
        err = (routed_out - masked(mlp, x, mask)).abs().max().item()
    assert err < 1e-3 * max(1.0, routed_out.abs().max().item()), err

    def routed():
        with em.at({op.name: index}):
            return em(x)

    def static_half():
        with em.at({op.name: half}):
            return em(x)

    configs = {"dense full width": lambda: mlp(x), "routed (mean 50 %)": routed,
               "masked (mean 50 %)": lambda: masked(mlp, x, mask),
               "static 50 %": static_half}
    times = {k: [] for k in configs}
    with torch.inference_mode():
        for fn in configs.values():
            fn()  # warm-up
        for _ in range(reps):
            for k, fn in configs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["dense full width"]
    return {"shape": f"{d} -> {h}", "tokens": tokens, "mean_width": mean,
            "candidates": list(cands), "max_abs_diff_routed_vs_masked": err,
            "median_s": med, "ratio_to_dense": {k: v / base for k, v in med.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="smollm2,llama2-7b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "shapes": {}}
    for name in args.shapes.split(","):
        r = bench_shape(name, args.tokens, args.reps)
        results["shapes"][name] = r
        print(f"\n{name}: {r['shape']}, {r['tokens']} tokens, mean width "
              f"{100 * r['mean_width']:.1f} %, candidates {r['candidates']}")
        print(f"{'configuration':<22} {'median ms':>10} {'x dense':>8}")
        for k, v in r["median_s"].items():
            print(f"{k:<22} {1e3 * v:>10.1f} {r['ratio_to_dense'][k]:>8.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
