"""Turn a budget into per-op widths once (static routers), and save or load routers.

`select(em, budget, table)` asks the static routers for their argmax widths at the budget
(Eq. 9), then, if the table says that sub-network costs more than the budget, steps ops
down one candidate at a time, always the step that costs the routers the least logit per
unit of cost saved. A budget below every sub-network's cost is refused with the smallest
achievable cost in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from .._atomic import replace_folder
from ..elastic.model import ElasticModel
from ..errors import CheckpointError, WidthError
from ..passes.inject_routers import (
    budget_source,
    inject_routers,
    router_mode,
    routers_of,
    set_capacity,
)
from .costs import CostTable
from .routers import StaticRouter

FORMAT, VERSION = "flextron-routers", 1
META, WEIGHTS = "routers.json", "routers.safetensors"


@dataclass(frozen=True)
class Selection:
    """The sub-network chosen for a budget: per-op widths and what it costs."""

    widths: dict[str, int]
    budget: float  # fraction of the full cost
    metric: str
    cost: float  # in the table's units
    fraction: float  # of the full cost
    predicted: dict = field(default_factory=dict)  # latency_ms / params / memory_bytes

    def to_dict(self) -> dict:
        return {"budget": self.budget, "metric": self.metric, "cost": self.cost,
                "fraction": self.fraction, "predicted": self.predicted, "widths": self.widths}

    def __str__(self) -> str:
        lines = [(f"budget {self.metric} <= {self.budget:.4g} of full: chosen sub-network at "
                 f"{self.fraction:.4f} of full ({self.cost:,.4g})")]
        lines += [f"  {k}: {v:,.6g}" for k, v in self.predicted.items()]
        lines += [f"  {name:<40} {w}" for name, w in self.widths.items()]
        return "\n".join(lines)


@torch.no_grad()
def _fill(choice: dict[str, int], logits: dict, table: CostTable, limit: float) -> None:
    """Step ops up one candidate at a time while the total stays within `limit`, always
    the step with the most logit gained (least lost) per cost added. A router's argmax can
    fall short of its budget (on SmolLM2 at T = 0.7 it chose 0.662); a nested model is
    better with every width it is given, so the rest of the budget is spent."""
    while True:
        best = None
        spare = limit - table.total(choice)
        for name, k in choice.items():
            c = table.costs[name]
            dearer = [j for j in range(len(c)) if c[k] < c[j] <= c[k] + spare]
            if not dearer:
                continue
            j = min(dearer, key=lambda i: c[i])
            score = (logits[name][j] - logits[name][k]) / (c[j] - c[k])
            if best is None or score > best[0]:
                best = (score, name, j)
        if best is None:
            return
        choice[best[1]] = best[2]


def select(em: ElasticModel, budget, table: CostTable, *, cost_model=None) -> Selection:
    """Per-op widths of the static routers for `budget` (a fraction of the full cost or a
    profiler `Budget` of the table's metric): their argmax, stepped down until it is within
    the budget, then up while it stays within (`_fill`); with a profiler `CostModel`,
    also its predicted latency (if it has a table), parameters and memory.

    Example:
        >>> sel = select(em, Budget.parse("latency=0.6"), table)   # doctest: +SKIP
        >>> em_small = em.materialize(sel.widths)                  # doctest: +SKIP
    """
    routers = routers_of(em)
    if not routers:
        raise WidthError("this model has no routers; train or load them first "
                         "(flextron train-routers, load_routers)")
    if router_mode(em) != "static":
        raise WidthError(f"select needs static routers (one width per op for a budget); these "
                         f"are {router_mode(em)} routers, which choose per token")
    table.check(em)
    frac = table.budget_fraction(budget)
    table.refuse_below_minimum(frac)
    logits, choice = {}, {}
    for name, r in routers.items():
        device = r.net[0].weight.device
        logits[name] = r.logits(torch.tensor([frac], device=device))[0].float().cpu().tolist()
        choice[name] = max(range(len(logits[name])), key=lambda k, lg=logits[name]: lg[k])
    limit = frac * table.full * (1 + 1e-9)
    while table.total(choice) > limit:
        best = None
        for name, k in choice.items():
            c = table.costs[name]
            cheaper = [j for j in range(len(c)) if c[j] < c[k]]
            if not cheaper:
                continue
            j = max(cheaper, key=lambda i: c[i])
            score = (logits[name][k] - logits[name][j]) / (c[k] - c[j])
            if best is None or score < best[0]:
                best = (score, name, j)
        if best is None:  # cannot happen above the minimum; kept as a guard
            table.refuse_below_minimum(frac)
            break
        choice[best[1]] = best[2]
    _fill(choice, logits, table, limit)
    widths = {n: em.ops[n].candidates[k] for n, k in choice.items()}
    predicted = {}
    if cost_model is not None:
        if cost_model.table is not None:
            predicted["latency_ms"] = cost_model.latency(widths)
        predicted["params"] = cost_model.params(widths)
        predicted["params_non_embedding"] = cost_model.params(widths, non_embedding=True)
        predicted["memory_bytes"] = cost_model.memory(widths)
    return Selection(widths, frac, table.metric, table.total(choice), table.fraction(choice),
                     predicted)


def save_routers(em: ElasticModel, path: str | Path, table: CostTable | None = None, *,
                 extra: dict | None = None) -> Path:
    """Write `em`'s routers to folder `path` (routers.json + routers.safetensors),
    atomically, with the cost table they were trained against."""
    files = router_files(em, table, extra=extra)
    path = Path(path)
    with replace_folder(path) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return path


def router_files(em: ElasticModel, table: CostTable | None = None, *,
                 extra: dict | None = None) -> dict[str, bytes]:
    """{file name: contents} of `save_routers`' two files (to write them next to other
    files, as a jointly tuned model's final/ does)."""
    routers = routers_of(em)
    if not routers:
        raise WidthError("this model has no routers to save")
    first = next(iter(routers.values()))
    sizes = ({"hidden": first.net[0].out_features} if first.kind == "static"
             else {"units": first.w_budget.numel()})
    meta = {"format": FORMAT, "version": VERSION, "mode": first.kind, **sizes,
            "ops": {n: list(r.candidates) for n, r in routers.items()},
            "cost": table.to_dict() if table is not None else None, "extra": extra or {}}
    if getattr(first, "profile", None) is not None:
        meta["capacity_profile"] = first.profile
    calibration = budget_source(em).calibration
    if calibration is not None:
        meta["budget_calibration"] = calibration
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, r in enumerate(routers.values()) for k, v in r.state_dict().items()}
    return {WEIGHTS: save_safetensors(tensors), META: json.dumps(meta, indent=1).encode()}


def router_folder(path: str | Path) -> Path:
    """The folder holding the routers: `path` itself, or a train-routers run's final/."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if (path / "final" / META).is_file():
        return path / "final"
    raise CheckpointError(f"{path} holds no trained routers ({META}, or final/{META}); "
                          "train them with flextron train-routers")


def read_router_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} holds no readable {META} ({exc}); it is not a router "
                              "folder written by save_routers / flextron train-routers") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META} is not a router file (format "
                              f"{meta.get('format')!r})")
    return meta


def _saved(em: ElasticModel, path: Path) -> tuple[dict, dict[int, dict]]:
    """(metadata, {router position: state dict}) of a router folder, checked against the
    ops of `em`."""
    meta = read_router_meta(path)
    mine = {n: list(op.candidates) for n, op in em.ops.items()}
    if meta["ops"] != mine:
        raise CheckpointError(f"the routers in {path} were trained for other elastic ops or "
                              "candidates than this model's; load the elastic model they were "
                              "trained on")
    states: dict[int, dict] = {}
    for key, v in load_file(str(path / WEIGHTS)).items():
        i, name = key.split(".", 1)
        states.setdefault(int(i), {})[name] = v
    return meta, states


def _load_state(router, state: dict, path: Path) -> None:
    try:
        router.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the routers in {path} do not fit this version's "
                              f"{type(router).__name__} (dynamic routers gained a budget bias "
                              f"on 2026-12-01): train them again. {e}") from None


def load_routers(em: ElasticModel, path: str | Path,
                 mode: str | None = None) -> tuple[dict, CostTable | None, dict]:
    """Inject routers saved by `save_routers` into `em`; returns (routers, cost table,
    the saved metadata). `mode` "capacity" or "dynamic" runs saved dynamic (or capacity)
    routers the other way: the two share their weights and differ only in how tokens
    are assigned."""
    path = Path(path)
    meta, states = _saved(em, path)
    table = CostTable.from_dict(meta["cost"]) if meta.get("cost") else None
    per_token = ("dynamic", "capacity")
    if mode is not None and mode != meta["mode"] and not (mode in per_token
                                                          and meta["mode"] in per_token):
        raise CheckpointError(f"{path} holds {meta['mode']} routers; they cannot run as "
                              f"{mode} routers (dynamic and capacity routers share weights, "
                              "static ones do not)")
    mode_used = mode or meta["mode"]
    routers = inject_routers(em, mode_used, cost=table,
                             metric=table.metric if table else "latency",
                             hidden=meta.get("hidden", 64), units=meta.get("units", 128))
    for i, r in enumerate(routers.values()):
        _load_state(r, states.get(i, {}), path)
    if mode_used == "capacity" and meta.get("capacity_profile") and table is not None:
        set_capacity(routers, table, meta["capacity_profile"])
    if mode_used == "dynamic" and meta.get("budget_calibration"):
        budget_source(em).calibration = meta["budget_calibration"]
    return routers, table, meta


def read_static_routers(em: ElasticModel, path: str | Path) -> dict[str, StaticRouter]:
    """The static routers saved in folder `path` for `em`'s ops, as modules outside any
    graph ({op name: router}): what a dynamic router run starts from (`init_from`)."""
    path = Path(path)
    meta, states = _saved(em, path)
    if meta["mode"] != "static":
        raise CheckpointError(f"{path} holds {meta['mode']} routers; a dynamic run starts "
                              "from static ones (flextron train-routers --mode static)")
    out = {}
    for i, (name, op) in enumerate(em.ops.items()):
        router = StaticRouter(name, op.candidates, meta.get("hidden", 64))
        _load_state(router, states.get(i, {}), path)
        out[name] = router
    return out
