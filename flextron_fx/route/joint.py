"""Joint tuning of routers and backbone (paper section 3.2, after Figure 3): once the
routers are trained, the surrogate is dropped and the routers and the LLM are fine-tuned
together on the real loss.

One step on a batch of B sequences:

1. a budget T_b per sequence, uniform in `budget_range`;
2. one forward in which every router samples a straight-through Gumbel-softmax decision
   (as in router training) and its block runs at that width: real slicing, routed mode
   for per-token widths, never masks;
3. the loss is the sub-network's real next-token loss plus lambda times Eq. 8's latency
   hinge; the backbone's used weight slices and the routers get its gradient.

How a router gets the real loss's gradient: the forward pass runs only the sampled
widths (real slicing, as at inference), and the output y of each block (its last
`ElasticRegion`: the MLP, or attention's output projection) is replaced by
`y + sum_k (g_k - g_k.detach()) * y_k`, with g the router's straight-through sample and
y_k the block's output with the token at candidate k (computed without autograd). The
forward value is y bit for bit; the gradient dL/dg_k = <dL/dy, y_k> is that of a soft
mixture of the candidates (what mask-based implementations get), so a router learns
how much a wider or narrower width would change the loss, against the latency hinge.
This costs one extra evaluation of each MLP block per candidate (attention: of its output
projection; candidates wider than the batch's widest keep y, no signal). With only the
chosen candidate's gate (the mixture-of-experts estimator) routers got no signal for
other widths and, on tiny models, shrank to the cheapest ones under the latency hinge.
Static and dynamic routers; capacity routers are tuned as the dynamic routers they share
their weights with. `freeze_backbone` (`--freeze-backbone`) keeps every backbone weight and
tunes the routers alone on this gradient: router training on the real loss instead of a
surrogate's prediction of it.

Checkpoints (backbone, routers, AdamW, budgets' and Gumbel noise's generator), exact
resume, SIGTERM safety and `metrics.jsonl` work as in `train-elastic`. `final/` holds the
tuned elastic model and its routers (`flextron select RUN`, `load(RUN/final)` with
`load_routers(em, RUN)`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .._atomic import write_atomic
from ..elastic.model import ElasticModel
from ..elastic.ops import ElasticRegion
from ..errors import TrainingError
from ..passes.inject_routers import (
    budget_source,
    calibrate_budget,
    remove_routers,
    router_mode,
    routers_of,
    set_budget,
)
from ..train import state as S
from ..train.loop import (
    _logits,
    _schedule,
    check_resume,
    check_run_folder,
    check_tokens,
    data_fingerprint,
    lm_loss,
)
from .costs import CostTable
from .train import (
    _Sampling,
    cost_panel,
    evaluate_routers,
    expected_cost,
    latency_loss,
    plot_rows,
    router_outputs,
    run_steps,
    save_curves,
)


@dataclass(frozen=True)
class JointConfig:
    """Settings of a joint tuning run (saved with every checkpoint). `lr` is the
    backbone's peak learning rate (AdamW, warm-up then cosine down to `min_lr_ratio`),
    `router_lr` the routers' (Adam betas 0.5, 0.99 as in router training);
    `freeze_backbone`: only the routers change (on the real loss's gradient, no surrogate),
    the backbone's weights stay as they are and `lr` is unused;
    `budget_range` None: `CostTable.budget_range` (0.4 or the cheapest sub-network, to 1)."""

    steps: int
    batch: int = 4
    budget_range: tuple[float, float] | None = None
    lr: float = 1e-5
    router_lr: float = 1e-4
    latency_weight: float = 10.0
    tau: float = 1.0
    warmup: int = 10
    min_lr_ratio: float = 0.1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    freeze_backbone: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise TrainingError(f"steps and batch must be >= 1, got {self.steps} and "
                                f"{self.batch}")
        if self.budget_range is not None and not 0 < self.budget_range[0] \
                <= self.budget_range[1] <= 1:
            raise TrainingError(f"budget_range is 0 < low <= high <= 1 (fractions of the "
                                f"full cost), got {list(self.budget_range)}")
        for name in ("lr", "router_lr", "tau"):
            if not getattr(self, name) > 0:
                raise TrainingError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.latency_weight < 0 or self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainingError("latency_weight and warmup must be >= 0, min_lr_ratio in "
                                "[0, 1]")


def last_regions(em: ElasticModel) -> dict[str, ElasticRegion]:
    """{op name: the block's last ElasticRegion in graph order}: the MLP, or attention's
    output projection, whose output is the block's contribution."""
    gm = em.graph_module
    out: dict[str, ElasticRegion] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ElasticRegion):
                out[mod.block] = mod
    missing = [n for n in routers_of(em) if n not in out]
    if missing:
        raise TrainingError(f"elastic ops {missing[:3]} have no ElasticRegion node; joint "
                            "tuning gates a block's output there (convert the model again "
                            "with this flextron_fx)")
    return out


class Gates:
    """While entered, every routed block's output y becomes
    `y + sum_k (g_k - g_k.detach()) * y_k.detach()`: y itself in the forward pass (bit for
    bit), and in the backward pass dL/dg_k = <dL/dy, y_k> for every candidate k, where g is
    the router's straight-through sample and y_k the block's output with every token at
    candidate k. Needs routers that sample (`_Sampling`)."""

    def __init__(self, em: ElasticModel):
        self.routers = routers_of(em)
        self.regions = last_regions(em)
        self._hooks = []

    def __enter__(self):
        for name, router in self.routers.items():
            self._hooks.append(self.regions[name].register_forward_hook(
                lambda mod, args, out, router=router: _gated(mod, args, out, router)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _gated(region: ElasticRegion, args, out: torch.Tensor, router) -> torch.Tensor:
    if router.record is None:
        raise TrainingError(f"the router of {router.block} did not sample in this forward; "
                            "joint tuning needs sampling routers")
    x, width, *params = args
    sample = router.record[1]  # one-hot forward, soft sample's gradient: [B, K] or [B, S, K]
    if sample.dim() == 2:  # static: one decision per sequence
        sample = sample[:, None]
    batch, per, k_all = sample.shape
    if out.dim() >= 3 and out.shape[0] == batch and per in (1, out.shape[1]):
        shape = (batch, per, *[1] * (out.dim() - 2))
    elif out.dim() == 2 and out.shape[0] % batch == 0 and per in (1, out.shape[0] // batch):
        shape = None  # tokens flattened into the first axis
    else:
        raise TrainingError(f"the block {router.block} gives an output of shape "
                            f"{tuple(out.shape)}; joint tuning gates [batch, seq, ...] or "
                            f"[batch * seq, ...] outputs by decisions of shape "
                            f"{tuple(sample.shape[:2])}")
    widest = int(width.max()) if isinstance(width, torch.Tensor) else \
        region.candidates.index(width)
    gated = out
    for k in range(k_all):
        g = sample[..., k] - sample[..., k].detach()  # exactly 0 forward
        g = g.reshape(shape) if shape is not None else \
            g.expand(batch, out.shape[0] // batch).reshape(-1, 1)
        if k > widest and region.in_layout is not None:
            y = out.detach()  # attention holds no heads beyond the batch's widest: no signal
        else:
            with torch.no_grad():
                y = region.uniform(x, k, widest, params)
        gated = gated + g.to(out.dtype) * y
    return gated


def joint_step(em: ElasticModel, table: CostTable, ids: torch.Tensor, config: JointConfig,
               gen: torch.Generator, gates: Gates | None = None) -> tuple[torch.Tensor, dict]:
    """One step's loss (not yet backpropagated) and metrics; `gates` as built once for the
    run (else built here: a walk over the graph)."""
    low, high = config.budget_range
    budget = (low + (high - low) * torch.rand(ids.shape[0], generator=gen)).to(ids.device)
    set_budget(em, budget)
    with _Sampling(em, gen, config.tau), gates or Gates(em):
        lm = lm_loss(_logits(em(ids)), ids)
        _, probs = router_outputs(em)
    cost = expected_cost(probs, table, list(routers_of(em)))
    lat = latency_loss(cost, budget)
    loss = lm + config.latency_weight * lat
    return loss, {"lm_loss": float(lm.detach()), "latency_loss": float(lat.detach()),
                  "expected_cost": float(cost.detach().mean()),
                  "budget": float(budget.mean()),
                  "over_budget": float((cost.detach() > budget).float().mean()),
                  "loss": float(loss.detach())}


@S.holding_run_lock
def tune_jointly(em: ElasticModel, tokens: torch.Tensor, run: str | Path, config: JointConfig,
                 table: CostTable, *, heldout: torch.Tensor | None = None,
                 resume: bool = False, progress: bool = True,
                 max_seconds: float | None = None, overwrite: bool = False,
                 eval_budgets=(0.5, 0.6, 0.7, 0.8)) -> dict:
    """Fine-tune `em` (with trained routers injected, e.g. by `load_routers`) and its routers
    together on token blocks `tokens` [n, seq] (see the module docstring); checkpoints and
    metrics go to `run`. Dynamic routers get their budget calibrated again at the end.
    With `heldout`, the summary holds each of `eval_budgets`' held-out loss and cost.

    Example:
        >>> routers, table, _ = load_routers(em, "runs/static")           # doctest: +SKIP
        >>> tune_jointly(em, blocks, "runs/joint", JointConfig(steps=200), table)  # doctest: +SKIP
    """
    run = Path(run)
    config.validate()
    check_tokens(tokens, config.batch)
    mode = router_mode(em)
    if mode is None:
        raise TrainingError("joint tuning fine-tunes trained routers with the backbone; this "
                            "model has none: load them first (load_routers(em, RUN), or "
                            "flextron joint-tune --routers RUN)")
    if mode == "capacity":
        raise TrainingError("capacity routers share their weights with dynamic ones: load "
                            "them as dynamic routers (load_routers(em, RUN, mode='dynamic')) "
                            "to tune them jointly, then run them as capacity routers")
    table.check(em)
    if config.budget_range is None:
        config = replace(config, budget_range=table.budget_range())
    table.refuse_below_minimum(config.budget_range[0])
    check_run_folder(run, overwrite)
    S.clean_leftovers(run)
    data = data_fingerprint(tokens)
    ckpt = S.latest(run) if resume else None
    if not resume and S.latest(run) is not None:
        raise TrainingError(f"{run} already holds checkpoints; pass resume=True (--resume) "
                            "to continue it, or use a new folder")
    if ckpt is not None:
        check_resume(run, S.read_state(ckpt), config, data)
    gates = Gates(em)  # refuses a graph without regions before any work
    budget_source(em).calibration = None  # routers read T itself while they change
    routers = routers_of(em)
    router_params = [p for r in routers.values() for p in r.parameters()]
    chosen = {id(p) for p in router_params}
    backbone = [] if config.freeze_backbone else \
        [p for p in em.parameters() if id(p) not in chosen]
    was = {p: p.requires_grad for p in em.parameters()}
    for p in em.parameters():
        p.requires_grad_(id(p) in chosen or not config.freeze_backbone)
    groups = [{"params": backbone, "lr": config.lr, "betas": (0.9, 0.95),
               "weight_decay": 0.0}] if backbone else []
    optimizer = torch.optim.AdamW(groups + [{"params": router_params, "lr": config.router_lr,
                                             "betas": (0.5, 0.99), "weight_decay": 0.0}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    gen = torch.Generator().manual_seed(config.seed)
    params = backbone + router_params

    def step(ids):
        loss, row = joint_step(em, table, ids, config, gen, gates)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        routed = [g for g in grads[len(backbone):] if g is not None]
        row["router_grad_norm"] = float(torch.linalg.vector_norm(
            torch.stack([g.norm() for g in routed]))) if routed else 0.0
        row["lr"] = scheduler.get_last_lr()[0]  # the backbone's (frozen: routers'), this step
        return row, {p: g for p, g in zip(params, grads) if g is not None}

    try:
        summary = run_steps(
            run, config, tokens, next(em.parameters()).device, ckpt, em.graph_module,
            optimizer, scheduler, gen, step,
            info={"config": asdict(config), "data": data, "cost": table.to_dict()},
            desc="joint-tune", plot=plot_joint_run,
            postfix=lambda row: {"lm": f"{row['lm_loss']:.3f}",
                                 "cost": f"{row['expected_cost']:.3f}"},
            progress=progress, max_seconds=max_seconds)
    finally:
        for p, g in was.items():
            p.requires_grad_(g)
    summary.update(mode=mode, metric=table.metric, budget_range=list(config.budget_range))
    status = summary["status"]
    if status == "done" and mode == "dynamic":  # the routers changed: calibrate again
        with torch.no_grad():
            calibrate_budget(em, table, tokens[:2 * config.batch], batch=config.batch,
                             progress=progress)
    if heldout is not None and status == "done":
        summary["eval"] = evaluate_routers(em, heldout, table, eval_budgets, config.batch)
    return summary


def save_tuned(em: ElasticModel, path: str | Path, table: CostTable, *,
               extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the tuned elastic model and its routers to one folder: `load(path)` gives the
    model, `load_routers(em, path)` its routers (whose `extra["elastic"]` is `path`)."""
    from ..export.checkpoint import save
    from .selection import load_routers, router_files

    path = Path(path)
    mode = router_mode(em)
    files = router_files(em, table, extra={**(extra or {}), "elastic": str(path)})
    remove_routers(em)  # the model is saved with constant widths, as any elastic model
    save(em, path, overwrite=overwrite)
    for name, data in files.items():
        write_atomic(path / name, data)
    load_routers(em, path, mode)  # and `em` gets its routers back, as they were
    return path


def plot_joint_run(run: str | Path) -> Path | None:
    """`RUN/curves.png`: the LM loss of the sampled sub-networks, and the latency loss with
    their expected cost against the budget, over steps."""
    got = plot_rows(run, 2)
    if got is None:
        return None
    plt, fig, (a, b), rows, steps = got
    a.plot(steps, [r["lm_loss"] for r in rows], lw=0.8)
    a.set_title("LM loss of the sampled sub-networks")
    a.set_xlabel("step")
    cost_panel(b, steps, rows)
    return save_curves(plt, fig, run)
