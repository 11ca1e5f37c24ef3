"""`flextron profile RUN_DIR ...` measures a latency table; `flextron profile-check RUN_DIR
--lut TABLE ...` measures random sub-networks end to end and compares them with it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ProfileError


def add_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("profile", formatter_class=fmt, description=__doc__,
                       help="measure a latency lookup table of an elastic model")
    p.add_argument("run_dir", help="saved elastic model (flextron convert --out), or a "
                                   "training run folder holding final/")
    p.add_argument("--backend", default="torch-cpu",
                   help="torch-cpu, torch-cuda or onnxruntime-cpu")
    p.add_argument("--mode", choices=["prefill", "decode"], default="prefill")
    p.add_argument("--shapes", default="1x256",
                   help="BATCHxLENGTH, comma-separated; LENGTH is the prompt (prefill) or "
                        "the KV-cache length (decode)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: torch's, usually the core count)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per sub-network")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up forwards per sub-network in the first round (later: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True,
                   help="the table is written here; JSON.partial keeps finished rounds and "
                        "a second run with the same settings resumes from it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_profile)

    p = sub.add_parser("profile-check", formatter_class=fmt, description=__doc__,
                       help="predicted vs measured latency of random sub-networks")
    p.add_argument("run_dir")
    p.add_argument("--lut", required=True, help="table written by flextron profile")
    p.add_argument("--n", type=int, default=30, help="random sub-networks")
    p.add_argument("--low", type=float, default=0.4,
                   help="spread random sub-networks over this fraction of full latency to 1")
    p.add_argument("--shapes", default=None, help="subset of the table's shapes")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds for every sub-network")
    p.add_argument("--precision", type=float, default=0.02,
                   help="then more rounds for each sub-network whose measured ratio to full "
                        "has a relative standard error above this (0 turns it off)")
    p.add_argument("--max-repeats", type=int, default=None,
                   help="at most this many rounds per sub-network (default 4 x --repeats)")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up forwards the first time each sub-network runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every point and the metrics here")
    p.add_argument("--plot", default=None, help="scatter plot PNG")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_check)


def _load(run_dir: str):
    from .. import load

    path = Path(run_dir)
    if not (path / "flextron.json").is_file() and (path / "final" / "flextron.json").is_file():
        path = path / "final"
    return load(path)


def run_profile(args) -> dict:
    from .measure import ProfileConfig, profile

    config = ProfileConfig(backend=args.backend, mode=args.mode, shapes=args.shapes,
                           dtype=args.dtype, threads=args.threads, repeats=args.repeats,
                           warmup=args.warmup, seed=args.seed)
    em = _load(args.run_dir)
    table = profile(em, config, path=args.json, progress=not args.no_progress)
    print(summary(table))
    print(f"wrote {args.json} ({table.data['seconds']:.0f} s of measuring)")
    return {"json": args.json, "seconds": table.data["seconds"]}


def run_check(args) -> dict:
    from .table import LatencyTable
    from .validate import check, plot, report

    if args.n < 3:
        raise ProfileError(f"--n {args.n}: use at least 3 random sub-networks for a rank "
                           "correlation")
    em = _load(args.run_dir)
    table = LatencyTable.load(args.lut)
    if args.repeats < 1 or args.warmup < 0:
        raise ProfileError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and "
                           f"{args.warmup}")
    result = check(em, table, n=args.n, seed=args.seed, low=args.low, repeats=args.repeats,
                   warmup=args.warmup, shapes=args.shapes, precision=args.precision or None,
                   max_repeats=args.max_repeats, progress=not args.no_progress)
    print(report(result))
    if args.json:
        from .._atomic import write_atomic

        write_atomic(Path(args.json), json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return result


def summary(table) -> str:
    """Per shape: fixed parts and each row's entries (median ms) at every width."""
    fp = table.fingerprint
    lines = [(f"{fp['backend']} {fp['dtype']} {fp['mode']}, "
              f"{fp['machine'].get('threads')} threads, model {fp['model']['class']} "
              f"({fp['model']['ops']} elastic ops)")]
    settings = table.data.get("settings", {})
    if settings.get("method"):
        lines.append(f"measured on {settings['method']}")
    if settings.get("decode") and fp["mode"] == "prefill":
        lines.append(f"decode: {settings['decode']}")
    for key in table.shapes:
        fixed = table.fixed_ms(key)
        lines.append(f"shape {key}: fixed " + ", ".join(f"{p} {v:.3f}" for p, v in fixed.items())
                     + " ms")
        scale = table.data.get("block_scale", {}).get(key)
        if scale is not None:
            lines.append(f"  block entries = hooked times x {scale:.3f}, fitted with 'other' "
                         "to the grid's whole forwards")
        for rid, row in table.data["rows"].items():
            ent = table.data["entries"][rid].get(key, {})
            cells = ", ".join(f"{w}: {e['median_ms']:.3f} [{e['p25_ms']:.3f}-{e['p75_ms']:.3f}]"
                              for w, e in ent.items())
            lines.append(f"  {rid} x{len(row['ops'])}: {cells} ms")
        lines += layer_breakdown(table, key)
        for a in table.data["anchors"].get(key, []):
            m = a["measured"]["median_ms"]
            lines.append(f"  anchor {a['label']:<28} measured {m:8.3f} ms, predicted "
                         f"{a['predicted_ms']:8.3f} ms ({a['predicted_ms'] / m - 1:+.1%})")
    return "\n".join(lines)


def layer_costs(table, key: str) -> dict | None:
    """Paper section 5.1 in numbers: per layer, ms of each op kind at full and at the
    smallest width, and the fixed parts' ms and the full model's predicted ms."""
    rows = table.data["rows"]
    by_kind: dict = {}
    for rid, row in rows.items():
        ent = table.data["entries"][rid].get(key, {})
        if ent:
            widths = sorted(int(w) for w in ent)
            by_kind.setdefault(row["kind"], []).append(
                (len(row["ops"]), ent[str(widths[-1])]["median_ms"],
                 ent[str(widths[0])]["median_ms"]))
    if not by_kind:
        return None
    layers = max(sum(n for n, _, _ in v) for v in by_kind.values())
    out = {at: {k: sum(t[0] * t[pick] for t in v) / layers for k, v in by_kind.items()}
           for at, pick in (("full", 1), ("smallest", 2))}
    out["fixed_ms"] = sum(table.fixed_ms(key).values())
    out["full_ms"] = out["fixed_ms"] + sum(n * e for v in by_kind.values() for n, e, _ in v)
    return out


def layer_breakdown(table, key: str) -> list[str]:
    """Paper section 5.1: per layer, how much time attention and the MLP take, at full and
    at the smallest width, and the fixed parts' share of the full model."""
    costs = layer_costs(table, key)
    if costs is None:
        return []
    out = []
    for at in ("full", "smallest"):
        per = costs[at]
        total = sum(per.values())
        out.append(f"  per layer at {at} width: " + ", ".join(
            f"{k} {ms:.3f} ms ({ms / total:.0%})" for k, ms in sorted(per.items())))
    fixed, full = costs["fixed_ms"], costs["full_ms"]
    out.append(f"  fixed parts: {fixed:.3f} ms of {full:.3f} ms at full width "
               f"({fixed / full:.0%})")
    return out
