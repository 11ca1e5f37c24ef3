"""The `flextron` command line: demo, convert, ablate-sorting, data, eval, profile,
train-routers, select."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def _data(tokenizer, args):
    from .data import calibration_and_heldout
    from .data.blocks import calibration_mix
    from .data.domains import resolve_domains
    from .errors import CalibrationDataError

    calib, held, source = calibration_and_heldout(
        tokenizer, seq_len=args.seq_len, n_calib=args.calib_samples,
        n_heldout_tokens=args.heldout_tokens, seed=args.seed)
    try:
        domains = resolve_domains(args.calib_domains)
    except ValueError as exc:
        raise CalibrationDataError(f"--calib-domains: {exc}") from None
    if domains != ["wikipedia"]:
        calib, mix = calibration_mix(tokenizer, domains, seq_len=args.seq_len,
                                     n_calib=args.calib_samples)
        source = f"{source}; calibration on {mix}"
    return calib, held, source, domains


def _config(args):
    from .config import FlextronConfig

    return FlextronConfig(head_mode=args.head_mode, head_score=args.head_score,
                          mlp_score=args.score, compensate=args.compensation,
                          compensation_rank=args.compensation_rank, seed=args.seed,
                          calibration_batch_size=args.batch_size)


def convert(args) -> dict:
    """Trace, rank, permute, elasticize and save a model; returns a summary."""
    import torch

    from . import flextronize, save
    from .export.checkpoint import check_target
    from .models import load

    check_target(args.out, args.overwrite)  # before the long calibration
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load(args.model)
    calib, _, source, domains = _data(tok, args)
    print(f"calibrating on {calib.shape[0]} x {calib.shape[1]} tokens from {source}")
    sample = (calib[:2, :16],)
    partial = Path(str(args.out).rstrip("/") + ".partial") / "calibration.safetensors"
    em = flextronize(model, sample, calib, config=_config(args), resume=partial)
    em.note_domains("calibration", domains)
    out = save(em, args.out, overwrite=args.overwrite)
    partial.unlink(missing_ok=True)
    if partial.parent.exists():
        partial.parent.rmdir()
    secs = time.perf_counter() - t0
    print(em.summary())
    print(f"saved {len(em.ops)} elastic ops to {out} in {secs:.0f} s")
    return {"seconds": secs, "ops": len(em.ops), "out": str(out)}


def ablate_sorting(args) -> dict:
    """The paper's Table 5: perplexity at 50 % MLP / 50 % heads, without and with sorting."""
    import torch

    from . import flextronize
    from .eval import perplexity
    from .models import load

    torch.manual_seed(args.seed)
    model, tok = load(args.model)
    calib, heldout, source, _ = _data(tok, args)
    sample = (calib[:2, :16],)
    print(f"held-out: {heldout.numel()} tokens ({source}); calibration: {calib.shape[0]} seqs")
    result: dict = {"model": args.model, "eval_source": source,
                    "eval_tokens": int(heldout.shape[0] * (heldout.shape[1] - 1)),
                    "calibration_sequences": int(calib.shape[0])}
    ppl = lambda m, what: perplexity(m, heldout, batch_size=args.batch_size, desc=what)["ppl"]
    unsorted = flextronize(model, sample, None, config=_config(args))
    if args.elastic:  # a model saved by `flextron convert` on the same calibration data
        from . import load as load_elastic

        print(f"sorted model: {args.elastic}")
        sorted_em = load_elastic(args.elastic)
    else:
        sorted_em = flextronize(model, sample, calib, config=_config(args))
    cfg = sorted_em.config
    result.update(head_mode=cfg.head_mode, head_score=cfg.head_score, mlp_score=cfg.mlp_score,
                  compensate=cfg.compensate, compensation_rank=cfg.compensation_rank)
    runs = {"unsorted": unsorted, "sorted": sorted_em}
    del model
    for label, em in runs.items():
        em.set_full()
        if label == "sorted":
            result["full_ppl"] = ppl(em, "full")
        with em.at(0.5, kind="mlp"):
            result["mlp_fraction_kept"] = _kept(em, "mlp")
            result[f"mlp50_{label}_ppl"] = ppl(em, f"mlp50 {label}")
        with em.at(0.5, kind="attention"):
            result["heads_fraction_kept"] = _kept(em, "attention")
            result[f"heads50_{label}_ppl"] = ppl(em, f"heads50 {label}")
        # with grouped-query attention 50 % may not exist: also show the size below it
        low = max(c for c in _head_candidates(em) if c < 0.5 * _full_heads(em))
        with em.at(low / _full_heads(em), kind="attention"):
            result["heads_low_fraction_kept"] = _kept(em, "attention")
            result[f"heads_low_{label}_ppl"] = ppl(em, f"heads low {label}")
        print(json.dumps({k: v for k, v in result.items() if label in k}, indent=1))
    print(_table(result))
    if args.json:
        from ._atomic import write_atomic

        write_atomic(Path(args.json), json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


def _full_heads(em) -> int:
    return next(o.full for o in em.ops.values() if o.kind == "attention")


def _head_candidates(em) -> tuple[int, ...]:
    return next(o.candidates for o in em.ops.values() if o.kind == "attention")


def _kept(em, kind: str) -> float:
    ops = [o for o in em.ops.values() if o.kind == kind]
    return sum(em.widths[o.name] for o in ops) / sum(o.full for o in ops)


def _compensation(r: dict) -> str:
    if r.get("compensate", "none") == "none":
        return ""
    return " + LS comp." if r.get("compensation_rank") else " + mean comp."


def _table(r: dict) -> str:
    return "\n".join([
        f"Held-out perplexity ({r['eval_tokens']} tokens, {r['eval_source']})",
        f"{'setup':<34}{'MHA':>12}{'MLP':>12}",
        f"{'full (baseline)':<34}{r['full_ppl']:>12.2f}{r['full_ppl']:>12.2f}",
        (f"{'50 % w/o sorting':<34}{r['heads50_unsorted_ppl']:>12.2f}"
         f"{r['mlp50_unsorted_ppl']:>12.2f}"),
        (f"{'50 % with sorting' + _compensation(r):<34}{r['heads50_sorted_ppl']:>12.2f}"
         f"{r['mlp50_sorted_ppl']:>12.2f}"),
        (f"(kept: {r['heads_fraction_kept']:.0%} of query heads, "
         f"{r['mlp_fraction_kept']:.0%} of MLP neurons per layer)"),
        (f"with {r['heads_low_fraction_kept']:.0%} of query heads: "
         f"{r['heads_low_unsorted_ppl']:.2f} without sorting, "
         f"{r['heads_low_sorted_ppl']:.2f} with"),
    ])


def demo(args) -> None:
    """Convert SmolLM2, save it, print the sorting ablation (paper Table 5), train it
    elastically for two steps and its static routers for four (`flextron train-elastic` and
    `train-routers` run long ones), then what a user deploys: a table of budgets, a
    sub-network exported to ONNX and run in onnxruntime (`--onnx`), and text generated at
    two budgets. It calibrates on 32 sequences and evaluates on 2k tokens, to finish in
    under five minutes on two CPU cores; `--paper` calibrates and evaluates at the paper's
    sizes (512 sequences, 32k tokens) and exports ONNX."""
    if args.paper:
        args.calib_samples, args.heldout_tokens, args.onnx = 512, 32768, True
    args.out = args.out or "runs/smollm2-135m"
    stages: dict[str, float] = {}

    def stage(name: str, fn, *a) -> None:
        t0 = time.perf_counter()
        fn(*a)
        stages[name] = time.perf_counter() - t0

    stage("convert", convert, args)
    args.elastic = args.out
    stage("sorting ablation", ablate_sorting, args)
    trained = f"{args.out}-train"
    again = ["--resume"] + (["--overwrite"] if args.overwrite else [])
    stage("train-elastic", _run, [
        "train-elastic", trained, "--elastic", args.out, "--model", args.model, "--steps",
        "2", "--batch", "2", "--seq", "128", "--eval-every", "2", "--checkpoint-every", "2",
        "--eval-tokens", "512", "--warmup", "1", "--seed", str(args.seed), *again])
    # static routers for a parameter budget (no latency table needed), then the widths
    # they pick for 60 % of the parameters
    routers = f"{args.out}-routers"
    stage("train-routers + select", lambda: (_run([
        "train-routers", routers, "--elastic", f"{trained}/final", "--model", args.model,
        "--mode", "static", "--metric", "params", "--steps", "4", "--batch", "2", "--seq",
        "128", "--eval-tokens", "512", "--surrogate-warmup", "2", "--seed", str(args.seed),
        *again]), _run(["select", routers, "--budget", "params=0.6"])))
    stage("deploy", _deploy, args, f"{trained}/final")
    print("\ndemo stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
          + f"; total {sum(stages.values()):.0f} s")


def _run(argv: list[str]) -> None:
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


def _deploy(args, folder: str) -> None:
    """The demo's ending: budgets table, ONNX in onnxruntime (with --onnx), generation at
    two budgets."""
    import torch

    from . import load as load_elastic
    from .eval import perplexity
    from .export.generate import TorchDecoder, generate
    from .export.generate_command import show
    from .export.sliced import sliced_hf
    from .models import load

    em = load_elastic(folder)
    _, tok = load(args.model)
    _, held, _, _ = _data(tok, args)
    held = held[:8]
    ids = held[:1]
    fractions = (1.0, 0.75, 0.5)
    models = {f: em.materialize(em.static_widths(f)) for f in fractions}
    times: dict[float, list[float]] = {f: [] for f in fractions}
    with torch.inference_mode():
        for f in fractions:
            models[f](ids)  # warm-up
        for _ in range(3):  # rounds, the fractions interleaved in each
            for f in fractions:
                t0 = time.perf_counter()
                models[f](ids)
                times[f].append(time.perf_counter() - t0)
    full_params = em.num_params(em.static_widths(1.0))
    print(f"\nBudgets of {folder} (uniform widths; perplexity on {held.numel()} held-out "
          f"tokens; prefill 1 x {ids.shape[1]} on this CPU, median of 3 interleaved rounds)")
    print(f"{'fraction':>8} {'parameters':>12} {'perplexity':>11} {'prefill':>9}")
    for f in fractions:
        ppl = perplexity(models[f], held, batch_size=args.batch_size, desc=f"ppl {f}")["ppl"]
        ratio = sorted(times[f])[1] / sorted(times[1.0])[1]
        print(f"{f:>8.2f} {em.num_params(em.static_widths(f)) / full_params:>11.0%} "
              f"{ppl:>11.2f} {ratio:>8.2f}x")
    # what `flextron export` and `flextron generate` do, on the model already in memory
    # (each command would load it again)
    onnx_path = f"{args.out}-half.onnx"
    print(f"\n$ flextron export {folder} --fraction 0.5 --format onnx --out {onnx_path}")
    if not args.onnx:
        print("(skipped: the export takes about 70 s on two CPU cores; `flextron demo --onnx` "
              "runs it and the file in onnxruntime)")
    else:
        _onnx(em, onnx_path, ids)
    prompt = "The history of the city"
    prompt_ids = torch.tensor([tok(prompt)["input_ids"]])
    for f in (1.0, 0.5):
        print(f"\n$ flextron generate {folder} --fraction {f} --prompt {prompt!r} "
              "--max-new-tokens 16")
        decoder = TorchDecoder(sliced_hf(em, em.static_widths(f)))
        show(generate(decoder, prompt_ids, 16, eos=tok.eos_token_id), prompt_ids, tok, "torch")


def _onnx(em, onnx_path: str, ids) -> None:
    """Export `em` at half width to ONNX and run it in onnxruntime beside PyTorch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from .export.onnx import to_onnx

    t0 = time.perf_counter()
    to_onnx(em, onnx_path, em.static_widths(0.5), overwrite=True)
    print(f"wrote {onnx_path} in {time.perf_counter() - t0:.0f} s, checked in onnxruntime")
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: ids.numpy()}
    t0 = time.perf_counter()
    got = session.run(None, feed)[0]
    ms = (time.perf_counter() - t0) * 1e3
    with torch.inference_mode(), em.at(0.5):
        want = em(ids)
    want = getattr(want, "logits", want).numpy()
    print(f"onnxruntime ran {onnx_path} (1 x {ids.shape[1]}, first run) in {ms:.0f} ms; "
          "largest logit "
          f"difference from PyTorch {float(np.abs(got - want).max()):.2g}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="bundled model name")
    p.add_argument("--calib-samples", type=int, default=512,
                   help="calibration sequences (paper: 512)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heldout-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=8)
    from .config import FlextronConfig
    from .passes.scores import names

    default = FlextronConfig()
    p.add_argument("--head-mode", choices=["query", "group"], default="group")
    p.add_argument("--score", choices=names("mlp"), default=default.mlp_score,
                   help="MLP neuron importance (flextron_fx/passes/scores.py)")
    p.add_argument("--head-score", choices=names("attention"), default=default.head_score,
                   help="attention head importance")
    p.add_argument("--compensation", choices=["none", "mlp", "attention", "all"],
                   default=default.compensate,
                   help="blocks that get per-width compensation (passes/compensate.py)")
    p.add_argument("--compensation-rank", type=int, default=default.compensation_rank,
                   help="0: add back the removed units' mean output; r > 0: also a rank-r "
                        "least-squares correction of the kept output-projection columns")
    p.add_argument("--calib-domains", default="wikipedia",
                   help="comma list of domains whose calibration splits are mixed in equal "
                        "shares for calibration (fetched with `flextron data fetch`)")
    p.add_argument("--seed", type=int, default=0)


_OVERWRITE = ("replace OUT even when it holds files that are not a flextron checkpoint "
              "(a checkpoint there is always replaced, atomically)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flextron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="convert SmolLM2 and print the sorting ablation")
    _common(p)
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    p.add_argument("--json", default="runs/ablate-sorting.json")
    p.add_argument("--paper", action="store_true",
                   help="calibrate on 512 sequences and evaluate on 32k tokens (the "
                        "paper's sizes; 16 times the default's calibration and evaluation "
                        "work)")
    p.add_argument("--onnx", action="store_true",
                   help="also export the half-width sub-network to ONNX and run it in "
                        "onnxruntime (about 70 s more on two CPU cores; --paper does too)")
    p.set_defaults(func=demo, calib_samples=32, heldout_tokens=2048)
    p = sub.add_parser("convert", help="trace, rank, permute, elasticize and save a model")
    _common(p)
    p.add_argument("--out", required=True,
                   help="output folder; an interrupted run resumes its calibration from "
                        "OUT.partial/ when started again with the same arguments")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    p.set_defaults(func=convert)
    p = sub.add_parser("ablate-sorting", help="paper Table 5 on held-out text")
    _common(p)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--elastic", default=None,
                   help="use this saved elastic model (flextron convert) as the sorted one "
                        "instead of calibrating again")
    p.set_defaults(func=ablate_sorting)
    from .train.command import add_parser as add_train

    add_train(sub)
    from .data.commands import add_parser as add_data
    from .eval.commands import add_parser as add_eval

    add_data(sub)
    add_eval(sub)
    from .profiler.commands import add_parser as add_profile

    add_profile(sub)
    from .export.commands import add_parser as add_export

    add_export(sub)
    from .export.generate_command import add_parser as add_generate

    add_generate(sub)
    from .route.commands import add_parser as add_route

    add_route(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .errors import FlextronError

    try:
        rc = args.func(args)
    except FlextronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
