"""`flextron export`: one fixed sub-network of a saved elastic model as ONNX or Hugging Face.

    flextron export DIR --fraction 0.5 --format onnx --out small.onnx
    flextron export DIR --widths widths.json --format hf --out small-hf/
    flextron export DIR --fraction 0.5 --format onnx-decoder --out decoder.onnx
    flextron export DIR --budget params=0.6 --format onnx --out small.onnx
    flextron select ROUTERS --budget latency=0.6 --json sel.json   # trained static routers
    flextron export DIR --widths sel.json --format onnx --out small.onnx
    flextron export DIR --budget latency=0.6 --lut lut.json --format onnx --out small.onnx
    flextron export DIR --routers ROUTER_RUN --budget latency=0.6 --format hf --out small/
    flextron export DIR --routers DYNAMIC_RUN --budget 0.6 --format onnx-decoder --out r.onnx

`--budget` picks the largest uniform widths (one fraction for every op) whose cost fits it;
with `--routers` (a `flextron train-routers` run of static routers for DIR's model) the
routers pick per-op widths for it, as `flextron select` does. Dynamic routers export as an
ONNX decoder with the routers inside (`--format onnx-decoder`, export/routed_onnx.py),
whose `budget` input takes any budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``flextron export`` on the top-level subparsers ``sub``."""
    p = sub.add_parser("export", help="write one sub-network as ONNX or a Hugging Face model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("elastic", help="a folder saved by `flextron convert` or `train-elastic`")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--fraction", type=float, help="every op at this width fraction")
    which.add_argument("--widths", help="a JSON file {op name: width} (as `em.widths`), or "
                                        "what `flextron select --json` wrote (the static "
                                        "routers' choice for a budget)")
    which.add_argument("--budget", help="latency=0.6, params=50M, memory=300MB, ...: the "
                                        "largest uniform widths within it, or the static "
                                        "routers' choice with --routers")
    p.add_argument("--lut", default=None, help="latency table (`flextron profile`), for "
                                               "latency budgets")
    p.add_argument("--routers", default=None,
                   help="a `flextron train-routers` run for this model: static routers "
                        "choose per-op widths for --budget (0.6 or latency=0.6); dynamic "
                        "ones go inside an ONNX decoder (--format onnx-decoder)")
    p.add_argument("--format", choices=["onnx", "onnx-decoder", "hf"], default="onnx",
                   help="onnx: logits only; onnx-decoder: with past/present keys and values "
                        "per layer, for generating in onnxruntime; hf: a Hugging Face folder")
    p.add_argument("--out", required=True, help="an .onnx file, or a folder for --format hf")
    p.add_argument("--tokenizer", default=None,
                   help="bundled model whose tokenizer is saved beside a Hugging Face export")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from .. import load
    from ..errors import CheckpointError

    if not Path(args.elastic).is_dir():
        raise CheckpointError(f"{args.elastic} is not a folder; pass one saved by "
                              "`flextron convert` or `flextron train-elastic`")
    em = load(args.elastic)
    if getattr(args, "routers", None) and _dynamic(args.routers):
        return _routed_decoder(em, args)
    widths = _widths(em, args)
    print(f"widths: {_describe(em, widths)}")
    if args.format == "onnx":
        from .onnx import to_onnx

        path = to_onnx(em, args.out, widths, overwrite=args.overwrite)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), checked in onnxruntime")
        return 0
    if args.format == "onnx-decoder":
        from .decoder_onnx import to_onnx_decoder
        from .sliced import sliced_hf

        path = to_onnx_decoder(sliced_hf(em, widths), args.out, overwrite=args.overwrite)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), a decoder with a "
              "key/value cache, checked in onnxruntime")
        return 0
    return _save_hf(em, widths, args)


def _dynamic(run) -> bool:
    from ..route.selection import read_router_meta, router_folder

    return read_router_meta(router_folder(run))["mode"] != "static"


def _routed_decoder(em, args: argparse.Namespace) -> int:
    """Dynamic routers: the ONNX decoder with the routers inside (`to_routed_onnx`)."""
    from ..errors import CheckpointError, InputError
    from ..route.selection import load_routers, router_folder
    from .routed_onnx import to_routed_onnx

    check_router_args(args)
    if args.format != "onnx-decoder":
        raise InputError("dynamic routers choose every token's widths, so they export as a "
                         "decoder with the routers inside: use --format onnx-decoder (or "
                         "train static routers for one fixed sub-network)")
    _, table, _ = load_routers(em, router_folder(args.routers), "dynamic")
    if table is None:
        raise CheckpointError(f"{args.routers} holds no cost table; retrain the routers")
    fraction = router_budget(table, args.budget)
    path = to_routed_onnx(em, args.out, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), a decoder of one token "
          "of one sequence per step with the dynamic routers inside, checked in onnxruntime; "
          f"its `budget` input takes any budget (--budget {args.budget}: feed {fraction:.4g})")
    return 0


def _widths(em, args: argparse.Namespace):
    from ..errors import WidthError

    if getattr(args, "routers", None):
        check_router_args(args)
        return static_router_widths(em, args.routers, args.budget)
    if args.fraction is not None:
        return em.static_widths(args.fraction)
    if args.widths is not None:
        try:
            chosen = json.loads(Path(args.widths).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise WidthError(f"cannot read widths from {args.widths}: {exc}; write a JSON "
                             "object {op name: width}") from exc
        if isinstance(chosen, dict) and isinstance(chosen.get("widths"), dict):
            chosen = chosen["widths"]  # the JSON of `flextron select --json`
        if not isinstance(chosen, dict):
            raise WidthError(f"{args.widths} holds a {type(chosen).__name__}; write a JSON "
                             "object {op name: width}")
        return em.static_widths(chosen)
    return uniform_for_budget(em, args.budget, args.lut)


def check_router_args(args: argparse.Namespace) -> None:
    """--routers choose the widths for --budget: refuse fixed widths or no budget."""
    from ..errors import InputError

    if args.fraction is not None or args.widths is not None:
        raise InputError("--routers choose the widths for --budget; leave out --fraction and "
                         "--widths")
    if not args.budget:
        raise InputError("--routers need --budget: a fraction of the full model's cost "
                         "(0.6) or one of the routers' metric (latency=0.6)")


def router_budget(table, text: str) -> float:
    """`text` ("0.6", "latency=0.6", "latency=40ms") as a fraction of the full cost in the
    metric of `table`, refused clearly when no sub-network meets it."""
    from ..profiler.cost import Budget

    try:
        value = float(text)
    except ValueError:
        value = Budget.parse(text)
    fraction = table.budget_fraction(value)
    table.refuse_below_minimum(fraction)
    return fraction


def static_router_widths(em, run, budget: str) -> dict[str, int]:
    """Per-op widths that the static routers of `run` (a train-routers run, its final/ or
    a router folder) choose for `budget`, as `flextron select`; `em` is left without them."""
    from ..errors import CheckpointError
    from ..passes.inject_routers import remove_routers
    from ..route.selection import load_routers, read_router_meta, router_folder, select

    folder = router_folder(run)
    if read_router_meta(folder)["mode"] != "static":
        raise CheckpointError(f"{run} holds per-token (dynamic) routers; a fixed sub-network "
                              "needs static ones (flextron train-routers --mode static)")
    _, table, _ = load_routers(em, folder)
    try:
        if table is None:
            raise CheckpointError(f"{run} holds no cost table; retrain the routers")
        return select(em, router_budget(table, budget), table).widths
    finally:
        remove_routers(em)


def uniform_for_budget(em, budget: str, lut: str | None = None) -> dict[str, int]:
    """The largest uniform widths whose cost fits `budget` ("params=0.6", ...)."""
    from ..errors import ProfileError
    from ..profiler.cost import Budget, CostModel
    from ..profiler.table import LatencyTable

    limit = Budget.parse(budget)
    if limit.metric == "latency" and lut is None:
        raise ProfileError("a latency budget needs a latency table: pass --lut (made by "
                           "`flextron profile`), or use a params or memory budget")
    cost = CostModel(em, LatencyTable.load(lut) if lut else None)
    fractions = sorted({c / op.full for op in em.ops.values() for c in op.candidates},
                       reverse=True)
    settings = [em.static_widths(f) for f in fractions]
    fitting = [w for w in settings if limit.allows(cost, w)]
    if not fitting:
        smallest = min(cost.cost(limit.metric, w) for w in settings)
        full = cost.cost(limit.metric, None)
        raise ProfileError(f"no uniform sub-network meets {budget}: the smallest costs "
                           f"{smallest:.4g} ({smallest / full:.1%} of the full model's "
                           f"{full:.4g})")
    return fitting[0]


def _describe(em, widths: dict) -> str:
    parts = []
    for kind, unit in (("mlp", "MLP neurons"), ("attention", "heads")):
        ops = [op for op in em.ops.values() if op.kind == kind]
        if ops:
            kept = sum(widths[o.name] for o in ops) / sum(o.full for o in ops)
            parts.append(f"{kept:.0%} of {unit}")
    return ", ".join(parts) + f", {em.num_params(widths) / 1e6:.1f} M parameters"


def _save_hf(em, widths: dict, args: argparse.Namespace) -> int:
    from .._atomic import replace_folder
    from ..errors import OutputError
    from .hf import to_hf

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    model = to_hf(em, widths)
    tokenizer = None
    if args.tokenizer:
        from ..models import tokenizer as load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    with replace_folder(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"wrote {out} ({type(model).__name__}"
          f"{', with tokenizer' if tokenizer is not None else ''}); load it with "
          "transformers.AutoModelForCausalLM.from_pretrained")
    return 0
