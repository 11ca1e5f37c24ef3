"""Generation with dynamic routers: key/value cache against recomputing the sequence.

    python benchmarks/routed_generate.py [--new-tokens 64] [--rounds 3] [--budget 0.6]
                                         [--routers RUN --elastic DIR] [--onnx] [--json out.json]

Batch 1, a prompt of 8 tokens, greedy tokens without a stop. Three decoders, interleaved
in every round (the order rotates), ratios taken within a round, medians reported:

- `full`: the full model as its Hugging Face class with a `DynamicCache` (TorchDecoder);
- `static`: the largest uniform widths within params=BUDGET (`uniform_for_budget`), the
  same way: what one width for every token costs at about the same budget;
- `routed, cache`: `RoutedDecoder` on `routed_hf`: every token at the widths its dynamic
  router chooses, keys and values of every head cached;
- `routed, recompute`: `RoutedDecoder(cache=False)`: the routed elastic graph over the whole
  sequence at every step (what `flextron generate --routers` did before the cache).

With `--onnx`, the same three ways in onnxruntime: the full and static decoders of
`to_onnx_decoder`, and `to_routed_onnx`'s decoder with the routers inside (the prompt fed
one token at a time).

The routed decoders must all produce the same tokens (checked). Without `--routers`, the
SmolLM2 model is converted without calibration and given dynamic routers with random
weights (`perturb` scale below): speed does not depend on what the routers learned, only
on the widths they pick, whose mean cost (parameters, as a fraction of the full model's)
is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flextron_fx import flextronize
from flextron_fx import load as load_elastic
from flextron_fx.export.commands import uniform_for_budget
from flextron_fx.export.decoder_onnx import to_onnx_decoder
from flextron_fx.export.generate import (
    OrtDecoder,
    OrtRoutedDecoder,
    RoutedDecoder,
    TorchDecoder,
    generate,
)
from flextron_fx.export.routed_onnx import to_routed_onnx
from flextron_fx.export.sliced import full_hf, sliced_hf
from flextron_fx.models import load
from flextron_fx.profiler.cost import CostModel
from flextron_fx.route import CostTable, inject_routers, load_routers


def _random_routers(em, scale: float, seed: int = 1) -> CostTable:
    """Dynamic routers with random weights, and a parameter cost table."""
    table = CostTable.from_cost_model(CostModel(em), "params")
    routers = inject_routers(em, "dynamic", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers.values():
            for p in r.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--elastic", default=None, help="a saved elastic model (with --routers)")
    ap.add_argument("--routers", default=None, help="a `flextron train-routers` run (dynamic)")
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--scale", type=float, default=0.05, help="random router weights' scale")
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--onnx", action="store_true", help="also in onnxruntime")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="routed-generate-"))
    torch.manual_seed(0)
    if args.routers:
        em = load_elastic(args.elastic)
    else:
        model, _ = load(args.model)
        em = flextronize(model, (torch.randint(0, model.config.vocab_size, (2, 16)),), None,
                         progress=False)
    static = uniform_for_budget(em, f"params={args.budget}")
    dense = {"full": full_hf(em), "static": sliced_hf(em, static)}
    decoders = {n: TorchDecoder(m) for n, m in dense.items()}
    if args.onnx:
        for n, m in dense.items():
            t0 = time.perf_counter()
            path = to_onnx_decoder(m, folder / f"{n}.onnx")
            print(f"exported {n} in {time.perf_counter() - t0:.0f} s", flush=True)
            decoders[f"onnxruntime {n}"] = OrtDecoder(path, threads=torch.get_num_threads())
    if args.routers:
        _, table, _ = load_routers(em, args.routers, "dynamic")
    else:
        table = _random_routers(em, args.scale)
    static_cost = table.fraction({n: em.ops[n].candidates.index(w) for n, w in static.items()})
    vocab = int(em.source["config"]["vocab_size"])
    prompt = torch.randint(0, vocab, (1, args.prompt))
    decoders["routed, cache"] = RoutedDecoder(em, table, args.budget)
    decoders["routed, recompute"] = RoutedDecoder(em, table, args.budget, cache=False)
    if args.onnx:
        t0 = time.perf_counter()
        path = to_routed_onnx(em, folder / "routed.onnx")
        print(f"exported the routed decoder in {time.perf_counter() - t0:.0f} s", flush=True)
        decoders["onnxruntime routed"] = OrtRoutedDecoder(path, table, args.budget,
                                                          threads=torch.get_num_threads())
    assert decoders["routed, cache"].cached is not None, decoders["routed, cache"].why
    for dec in decoders.values():
        generate(dec, prompt, 4)  # warm-up
    names = list(decoders)
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens, costs = {}, []
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out = generate(decoders[n], prompt, args.new_tokens)
            times[n].append(out.prefill_s + out.decode_s)
            tokens[n] = out.tokens
            if n == "routed, cache":
                costs = decoders[n].costs
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    routed = [n for n in names if "routed" in n]
    same = all(torch.equal(tokens[n], tokens["routed, cache"]) for n in routed)
    rows = []
    for n in names:
        ref = "onnxruntime full" if n.startswith("onnxruntime") else "full"
        ratio = [t / f for t, f in zip(times[n], times[ref])]
        rows.append({"decoder": n, "seconds": statistics.median(times[n]),
                     "tokens_per_s": args.new_tokens / statistics.median(times[n]),
                     "vs_full": statistics.median(ratio)})
    mean_cost = sum(costs) / len(costs)
    source = f"from {args.routers}" if args.routers else f"random (scale {args.scale:g})"
    print(f"\nbatch 1, prompt {args.prompt}, {args.new_tokens} greedy tokens, budget "
          f"{args.budget}; {args.rounds} interleaved rounds, medians; routers {source}")
    print(f"routed tokens cost {mean_cost:.3f} of the full model's {table.metric} on average "
          f"({min(costs):.3f} to {max(costs):.3f}); every routed decoder gives the same tokens: "
          f"{same}; static widths cost {static_cost:.3f}")
    print(f"{'decoder':<22} {'seconds':>8} {'tok/s':>7} {'vs full':>8}  (same runtime's full)")
    for row in rows:
        print(f"{row['decoder']:<22} {row['seconds']:>8.2f} {row['tokens_per_s']:>7.1f} "
              f"{row['vs_full']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "rows": rows, "mean_cost": mean_cost, "same_tokens": same,
             "static_cost": static_cost,
             "when": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    if not same:
        raise SystemExit("the routed decoders gave different tokens")


if __name__ == "__main__":
    main()
