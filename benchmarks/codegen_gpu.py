"""Triton MLP kernels against cuBLAS GEMMs of the same sliced shapes and the torch paths (GPU).

    python benchmarks/codegen_gpu.py [--tokens 1024,4096,8192,16384] [--dtypes fp16,bf16]
                                     [--shapes smollm2,llama2-7b] [--reps 20]
                                     [--json runs/codegen_gpu.json]

One SwiGLU MLP (random weights: speed does not depend on their order) per shape, D -> F:
SmolLM2 (576 -> 1536) and Llama-2-7B (4096 -> 11008). For every token count and dtype:

fixed width (25/50/75/100 % of F), forward:
- triton fused: `elastic_mlp_triton` (gate/up GEMM + SiLU x up fused, then the down GEMM),
- cuBLAS sliced: torch.mm on contiguous copies of the sliced weights (gate, up, down) plus
  the pointwise SiLU x up: the dense model of that width, what a materialized export runs,
- torch path: `elastic_mlp_ref` on narrowed views of the shared weights (the `torch`
  lowering backend);
routed, mean width 50 % (40 % of the tokens at 25 %, 30 % at 50 %, 20 % at 75 %, 10 % at
100 %, shuffled), forward:
- triton routed: `routed_mlp_triton` (one grouped launch per GEMM over all width groups),
- torch routed: `routed_mlp_ref` (one group after the other),
- dense full: cuBLAS, every token at 100 %;
routed forward + backward (a training step of the op): Triton backward against the
recomputed torch reference's.

Targets (issue 15): triton routed >= 1.6x faster than dense full at 8192 tokens on the
4096 -> 11008 shape; triton fused within 10 % of cuBLAS sliced. Timing: CUDA events, the
configurations of one case interleaved, `--reps` rounds, medians. Every kernel output is
checked against its reference before timing. Writes a JSON and prints a table.
Needs a CUDA GPU (exits with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"smollm2": (576, 1536), "llama2-7b": (4096, 11008)}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SHARES = (0.4, 0.3, 0.2, 0.1)  # tokens per candidate (25/50/75/100 %): mean width 50 %
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = torch.device("cuda")


def _time(fns: dict, reps: int) -> dict[str, float]:
    """Median ms of each callable, rounds interleaved in a random order."""
    for fn in fns.values():  # warm-up (and Triton's compile per width)
        fn()
        fn()
    if DEVICE.type == "cpu":  # --interpret: a check of this script, not a measurement
        return {k: _cpu_ms(fn) for k, fn in fns.items()}
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    order = random.Random(0)
    for _ in range(reps):
        keys = list(fns)
        order.shuffle(keys)
        for k in keys:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[k]()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def _cpu_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _check(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(expected.float().abs().max()))
    err = float((got.float() - expected.float()).abs().max())
    if err > 2e-2 * scale:
        raise SystemExit(f"{what}: kernel differs from its reference (max |diff| {err:.3g} "
                         f"at scale {scale:.3g}); not timing a wrong kernel")


def per_token(tokens: int, k: int, device) -> torch.Tensor:
    counts = [round(s * tokens) for s in SHARES[:k - 1]]
    counts.append(tokens - sum(counts))
    index = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return index[torch.randperm(tokens, generator=torch.Generator().manual_seed(0))].to(device)


def bench(shape: str, tokens: int, dtype_name: str, reps: int) -> list[dict]:
    from flextron_fx.codegen.mlp import elastic_mlp_ref, routed_mlp_ref
    from flextron_fx.codegen.mlp_triton import elastic_mlp_triton, routed_mlp_triton

    d, f = SHAPES[shape]
    dt, dev = DTYPES[dtype_name], DEVICE
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, d, device=dev, generator=g).to(dt)
    gate = (torch.randn(f, d, device=dev, generator=g) * d ** -0.5).to(dt)
    up = (torch.randn(f, d, device=dev, generator=g) * d ** -0.5).to(dt)
    down = (torch.randn(d, f, device=dev, generator=g) * f ** -0.5).to(dt)
    rows = []
    base = {"shape": shape, "d": d, "f": f, "tokens": tokens, "dtype": dtype_name}
    with torch.inference_mode():
        for frac in FRACTIONS:
            w = round(frac * f)
            gs, us, ds = gate[:w].contiguous(), up[:w].contiguous(), down[:, :w].contiguous()
            ref = elastic_mlp_ref(x, w, gate, up, down, None, None, None, "silu")
            _check(elastic_mlp_triton(x, w, gate, up, down, None, None, None, "silu"), ref,
                   f"{shape} {tokens} {dtype_name} width {w}")
            ms = _time({
                "triton fused": lambda w=w: elastic_mlp_triton(x, w, gate, up, down, None,
                                                                None, None, "silu"),
                "cuBLAS sliced": lambda gs=gs, us=us, ds=ds: torch.mm(
                    F.silu(torch.mm(x, gs.t())) * torch.mm(x, us.t()), ds.t()),
                "torch path": lambda w=w: elastic_mlp_ref(x, w, gate, up, down, None, None,
                                                          None, "silu"),
            }, reps)
            rows.append({**base, "kind": "fixed", "width": w, "ms": ms,
                         "triton_vs_cublas": ms["triton fused"] / ms["cuBLAS sliced"]})
        cands = [round(c * f) for c in FRACTIONS]
        index = per_token(tokens, len(cands), dev)
        ref = routed_mlp_ref(x, index, cands, gate, up, down, None, None, None, "silu")
        _check(routed_mlp_triton(x, index, cands, gate, up, down, None, None, None, "silu"), ref,
               f"{shape} {tokens} {dtype_name} routed")
        ms = _time({
            "triton routed": lambda: routed_mlp_triton(x, index, cands, gate, up, down, None,
                                                       None, None, "silu"),
            "torch routed": lambda: routed_mlp_ref(x, index, cands, gate, up, down, None, None,
                                                   None, "silu"),
            "dense full": lambda: torch.mm(F.silu(torch.mm(x, gate.t())) * torch.mm(x, up.t()),
                                           down.t()),
        }, reps)
        rows.append({**base, "kind": "routed", "width": "mean 50%", "ms": ms,
                     "dense_full_vs_triton": ms["dense full"] / ms["triton routed"]})
    # training step of the routed op: forward + backward (Triton backward vs the reference's)
    from flextron_fx.codegen import ops
    leaves = [t.detach().requires_grad_() for t in (x, gate, up, down)]
    index, dy = index.clone(), torch.randn_like(x)  # out of inference mode

    def step(backend):
        out = ops.routed_mlp(leaves[0], index, *leaves[1:], None, None, None, cands, "silu",
                             backend)
        torch.autograd.grad(out, leaves, dy)

    ms = _time({"triton routed": lambda: step("triton"), "torch routed": lambda: step("torch")},
               max(3, reps // 4))
    rows.append({**base, "kind": "routed fwd+bwd", "width": "mean 50%", "ms": ms,
                 "torch_vs_triton": ms["torch routed"] / ms["triton routed"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,4096,8192,16384")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--shapes", default="smollm2,llama2-7b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="runs/codegen_gpu.json")
    ap.add_argument("--interpret", action="store_true",
                    help="check this script on the CPU: tiny shapes, fp16, Triton's interpreter "
                         "(times mean nothing)")
    args = ap.parse_args()
    global DEVICE
    if args.interpret:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        DEVICE = torch.device("cpu")
        SHAPES["tiny"] = (32, 48)
        args.shapes, args.tokens, args.dtypes, args.reps = "tiny", "16,40", "fp16", 2
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/codegen_gpu.py needs a CUDA GPU (torch.cuda.is_available() is "
                 "False here). The CPU comparison is benchmarks/codegen_cpu.py; kernel "
                 "correctness on the CPU is tests/test_codegen_kernels.py (Triton interpreter); "
                 "--interpret checks this script on tiny shapes.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/codegen_gpu.py needs Triton: pip install 'flextron_fx[triton]'")
    device_name = "CPU (Triton interpreter)" if args.interpret else torch.cuda.get_device_name()
    rows = []
    for shape in args.shapes.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for dtype_name in args.dtypes.split(","):
                rows.extend(bench(shape, tokens, dtype_name, args.reps))
    print(f"{device_name}, {args.reps} interleaved rounds, median ms")
    print(f"{'shape':<10}{'tokens':>7}{'dtype':>6}  {'case':<16}{'triton':>9}{'cuBLAS/dense':>13}"
          f"{'torch':>9}{'ratio':>8}")
    for r in rows:
        ms = r["ms"]
        if r["kind"] == "fixed":
            case, tri, other, tor = f"fixed w={r['width']}", ms["triton fused"], \
                ms["cuBLAS sliced"], ms["torch path"]
            ratio = f"{r['triton_vs_cublas']:.2f}"  # triton / cuBLAS: target <= 1.10
        elif r["kind"] == "routed":
            case, tri, other, tor = "routed mean 50%", ms["triton routed"], ms["dense full"], \
                ms["torch routed"]
            ratio = f"{r['dense_full_vs_triton']:.2f}x"  # speed-up over dense: target >= 1.6x
        else:
            case, tri, other, tor = "routed fwd+bwd", ms["triton routed"], float("nan"), \
                ms["torch routed"]
            ratio = f"{r['torch_vs_triton']:.2f}x"  # speed-up over the torch training step
        print(f"{r['shape']:<10}{r['tokens']:>7}{r['dtype']:>6}  {case:<16}{tri:>9.3f}"
              f"{other:>13.3f}{tor:>9.3f}{ratio:>8}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "reps": args.reps,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
