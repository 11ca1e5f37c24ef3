"""ONNX on the CPU: one file per budget against one elastic file for every budget.

    python benchmarks/onnx_budgets.py [--seq 256] [--reps 10] [--budgets 1.0,0.75,0.5,0.25]
        [--lut runs/r13/lut-1x256.json] [--json out.json]

Exports SmolLM2 at uniform widths (default 1.0, 0.75, 0.5 and 0.25, the last one the
smallest sub-network: 3 of 9 heads, 384 of 1536 neurons), each to its own file (`to_onnx`)
and those of `--elastic-budgets` (1.0, 0.75, 0.5) to one file (`to_elastic_onnx`, the
budget an input), checks that the elastic file's logits equal each per-budget file's,
then times prefill (1 x seq) in onnxruntime:
every file and setting once per round, rounds interleaved, ratios to the full-width
per-budget file measured within each round. Weights keep their trained order (no
calibration): speed and equality do not depend on the order. With `--lut`, each budget's
latency fraction as a latency table (`flextron profile`) predicts it is printed beside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flextron_fx import flextronize
from flextron_fx.export import to_elastic_onnx, to_onnx
from flextron_fx.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budgets", default="1.0,0.75,0.5,0.25",
                    help="uniform width fractions; the first must be 1.0 (the reference)")
    ap.add_argument("--elastic-budgets", default="1.0,0.75,0.5",
                    help="the settings of the one elastic file (a subset of --budgets); at "
                         "0.25 its logits differ from the materialized sub-network's by 8e-3 "
                         "at scale 29, over the export check's 1e-4 of scale")
    ap.add_argument("--lut", default=None, help="a latency table of this model, to print "
                                                "the latency fraction it predicts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    budgets = tuple(float(b) for b in args.budgets.split(","))
    settings = tuple(float(b) for b in args.elastic_budgets.split(","))
    if budgets[0] != 1.0:
        ap.error("--budgets must start with 1.0, the reference of every ratio")
    if not set(settings) <= set(budgets):
        ap.error("--elastic-budgets must be a subset of --budgets")
    import onnxruntime as ort

    torch.manual_seed(0)
    model, _ = load(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    em = flextronize(model, (ids[:1].repeat(2, 1)[:, :16],), None, progress=False)
    folder = Path(tempfile.mkdtemp(prefix="onnx-budgets-"))
    t0 = time.perf_counter()
    files = {b: to_onnx(em, folder / f"{b}.onnx", b) for b in budgets}
    per_budget_s = (time.perf_counter() - t0) / len(budgets)
    t0 = time.perf_counter()
    elastic = to_elastic_onnx(em, folder / "elastic.onnx", list(settings))
    elastic_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads

    def session(path):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = {b: session(p) for b, p in files.items()}
    one = session(elastic)
    feed = {"input_0": ids.numpy()}
    runs = {f"per-budget {b}": (lambda s=s: s.run(None, feed)[0]) for b, s in sessions.items()}
    runs.update({f"elastic file {b}": (lambda k=k: one.run(None, {
        **feed, "setting": np.array(k, dtype=np.int64)})[0]) for k, b in enumerate(settings)})
    diffs = {b: float(np.abs(runs[f"elastic file {b}"]() - runs[f"per-budget {b}"]()).max())
             for b in settings}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.reps):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    base = times["per-budget 1.0"]
    rows = []
    print(f"{args.model}, prefill 1 x {args.seq}, onnxruntime CPU, {args.threads} threads, "
          f"{args.reps} interleaved rounds; export {per_budget_s:.0f} s per budget file, "
          f"{elastic_s:.0f} s for the elastic file")
    print(f"{'file and setting':<24}{'median ms':>10}{'vs full file':>14}{'max |diff|':>12}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        budget = float(name.split()[-1])
        diff = diffs[budget] if name.startswith("elastic") else 0.0
        rows.append({"run": name, "median_ms": statistics.median(ts) * 1e3,
                     "ratio_to_full_file": ratio, "max_abs_diff_to_per_budget": diff})
        print(f"{name:<24}{statistics.median(ts) * 1e3:>10.1f}{ratio:>14.3f}{diff:>12.1e}")
    predicted = {}
    if args.lut:
        from flextron_fx.profiler import CostModel, LatencyTable

        cost = CostModel(em, LatencyTable.load(args.lut))
        full = cost.latency(em.static_widths(1.0))
        predicted = {b: cost.latency(em.static_widths(b)) / full for b in budgets}
        print("latency fraction the table predicts: " + ", ".join(
            f"{b}: {f:.3f}" for b, f in predicted.items()))
    sizes = {p.name: p.stat().st_size for p in [*files.values(), elastic]}
    print("file sizes (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sizes.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "seq": args.seq,
                                               "reps": args.reps, "threads": args.threads,
                                               "rows": rows, "sizes": sizes,
                                               "predicted_latency_fraction": predicted},
                                              indent=2))


if __name__ == "__main__":
    main()
