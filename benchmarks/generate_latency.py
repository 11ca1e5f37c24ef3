"""Generation latency in the paper's Table 2 protocol, PyTorch and onnxruntime on the CPU.

    python benchmarks/generate_latency.py [--new-tokens 512] [--rounds 3] [--json out.json]

Protocol (Flextron, Table 2): batch 1, a prompt of 8 tokens, 512 tokens generated greedily
(no stop at end-of-text, so every setting makes the same number), for the full model and
the largest uniform widths within params=0.7, 0.6 and 0.5 (`uniform_for_budget`, the rule
of `flextron export --budget`: non-embedding parameters as a fraction of the full model's).
Plus prefill: one forward pass over 1 x 256 tokens with an empty cache. Each sub-network
runs as its Hugging Face class with a DynamicCache (`sliced_hf`) in PyTorch and as an ONNX
decoder with past keys and values (`to_onnx_decoder`) in onnxruntime. Every setting runs
once per round, rounds interleaved (the order of budgets rotates), and each ratio to the
full model is taken within a round, then the median over rounds is reported. Weights keep
their trained order (no calibration): speed does not depend on the order.
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
from flextron_fx.export.commands import _describe, uniform_for_budget
from flextron_fx.export.decoder_onnx import to_onnx_decoder
from flextron_fx.export.generate import OrtDecoder, TorchDecoder, generate
from flextron_fx.export.sliced import sliced_hf
from flextron_fx.models import load

BUDGETS = ("full", "params=0.7", "params=0.6", "params=0.5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=512, help="tokens generated")
    ap.add_argument("--prefill", type=int, default=256, help="prefill length (batch 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", default="torch,onnxruntime")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load(args.model)
    vocab = model.config.vocab_size
    em = flextronize(model, (torch.randint(0, vocab, (2, 16)),), None, progress=False)
    prompt = torch.randint(0, vocab, (1, args.prompt))
    long = torch.randint(0, vocab, (1, args.prefill))
    widths = {b: em.static_widths(1.0) if b == "full" else uniform_for_budget(em, b)
              for b in BUDGETS}
    models = {b: sliced_hf(em, w) for b, w in widths.items()}
    runtimes = args.runtimes.split(",")
    decoders: dict[tuple[str, str], object] = {}
    folder = Path(tempfile.mkdtemp(prefix="generate-latency-"))
    for b, m in models.items():
        if "torch" in runtimes:
            decoders["torch", b] = TorchDecoder(m)
        if "onnxruntime" in runtimes:
            t0 = time.perf_counter()
            path = to_onnx_decoder(m, folder / f"{b.replace('=', '')}.onnx")
            print(f"exported {b} in {time.perf_counter() - t0:.0f} s", flush=True)
            decoders["onnxruntime", b] = OrtDecoder(path, threads=args.threads)
    for dec in decoders.values():  # warm-up: first-call costs out of the timings
        generate(dec, prompt, 4)
    gen: dict[tuple[str, str], list[float]] = {k: [] for k in decoders}
    pre: dict[tuple[str, str], list[float]] = {k: [] for k in decoders}
    for r in range(args.rounds):
        order = BUDGETS[r % len(BUDGETS):] + BUDGETS[:r % len(BUDGETS)]
        for rt in runtimes:
            for b in order:
                dec = decoders[rt, b]
                out = generate(dec, prompt, args.new_tokens)
                assert out.tokens.shape[1] == args.new_tokens
                gen[rt, b].append(out.prefill_s + out.decode_s)
                dec.reset()
                t0 = time.perf_counter()
                dec.step(long)
                pre[rt, b].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for rt in runtimes:
        for b in BUDGETS:
            g_ratio = [x / f for x, f in zip(gen[rt, b], gen[rt, "full"])]
            p_ratio = [x / f for x, f in zip(pre[rt, b], pre[rt, "full"])]
            rows.append({
                "runtime": rt, "budget": b, "widths": _describe(em, widths[b]),
                "params_M": em.num_params(widths[b]) / 1e6,
                "generate_s": statistics.median(gen[rt, b]),
                "tokens_per_s": args.new_tokens / statistics.median(gen[rt, b]),
                "generate_ratio": statistics.median(g_ratio),
                "prefill_ms": 1e3 * statistics.median(pre[rt, b]),
                "prefill_ratio": statistics.median(p_ratio)})
    print(f"\nprompt {args.prompt}, {args.new_tokens} new tokens greedy, batch 1; prefill "
          f"1x{args.prefill}; {args.rounds} rounds, {args.threads} threads; medians")
    print(f"{'runtime':<12} {'budget':<11} {'params':>8} {'gen s':>8} {'tok/s':>7} "
          f"{'ratio':>6} {'prefill ms':>11} {'ratio':>6}  widths")
    for row in rows:
        print(f"{row['runtime']:<12} {row['budget']:<11} {row['params_M']:>7.1f}M "
              f"{row['generate_s']:>8.2f} {row['tokens_per_s']:>7.1f} "
              f"{row['generate_ratio']:>6.2f} {row['prefill_ms']:>11.1f} "
              f"{row['prefill_ratio']:>6.2f}  {row['widths']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
