"""Does attention over a prefix of heads need its own kernel? SDPA on sliced tensors vs dense.

    python benchmarks/sliced_sdpa.py [--seq 256] [--reps 30]

SmolLM2's attention (9 query heads over 3 KV heads, head dim 64), prefill [1, seq]. For
each kept head count (whole KV groups: 9, 6, 3 query heads) it times PyTorch's
scaled-dot-product attention three ways, interleaved, medians:

- narrowed: q, k, v are views keeping the first heads of full-width tensors (what slicing
  without copying gives);
- dense: q, k, v are contiguous tensors of the kept shape (what a materialized model of
  that width computes: the lower bound a specialised kernel could reach with SDPA's
  algorithm);
- full: all heads (the cost without elasticity).

If narrowed ~= dense, a prefix-of-heads attention kernel has nothing to win over SDPA.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, KV, DIM = 9, 3, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, args.seq, DIM, generator=g)
    k = torch.randn(1, KV, args.seq, DIM, generator=g)
    v = torch.randn(1, KV, args.seq, DIM, generator=g)
    configs = {}
    for kept_kv in (3, 2, 1):
        kept = kept_kv * HEADS // KV
        qn, kn, vn = q[:, :kept], k[:, :kept_kv], v[:, :kept_kv]
        qd, kd, vd = qn.contiguous(), kn.contiguous(), vn.contiguous()
        configs[(kept, "narrowed")] = lambda a=(qn, kn, vn): F.scaled_dot_product_attention(
            *a, is_causal=True, enable_gqa=True)
        configs[(kept, "dense")] = lambda a=(qd, kd, vd): F.scaled_dot_product_attention(
            *a, is_causal=True, enable_gqa=True)
    with torch.inference_mode():
        for fn in configs.values():
            fn()
        times = {k: [] for k in configs}
        order = random.Random(0)
        for _ in range(args.reps):
            keys = list(configs)
            order.shuffle(keys)
            for key in keys:
                t0 = time.perf_counter()
                configs[key]()
                times[key].append(time.perf_counter() - t0)
    print(f"SDPA, SmolLM2 heads ({HEADS} q / {KV} kv, dim {DIM}), 1x{args.seq}, "
          f"{args.reps} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'query heads':>12}{'narrowed ms':>13}{'dense ms':>10}{'narrowed/dense':>16}"
          f"{'vs full heads':>15}")
    full = statistics.median(times[(HEADS, "dense")])
    for kept in (9, 6, 3):
        ratios = [a / b for a, b in zip(times[(kept, "narrowed")], times[(kept, "dense")])]
        n, d = statistics.median(times[(kept, "narrowed")]), statistics.median(times[(kept,
                                                                                      "dense")])
        print(f"{kept:>12}{n * 1e3:>13.3f}{d * 1e3:>10.3f}{statistics.median(ratios):>16.3f}"
              f"{n / full:>15.3f}")


if __name__ == "__main__":
    main()
