"""Router training (paper Figure 3): backbone frozen, budgets sampled per step, routers
propose sub-networks, a surrogate model learns their loss, routers follow the surrogate.

One step on a batch of B sequences:

1. a budget T_b per sequence, uniform in `budget_range` (fractions of the full cost);
2. one forward of the elastic model with the routers sampling (straight-through
   Gumbel-softmax): static routers pick a width per op and sequence, dynamic routers a
   width per token; no gradient reaches or leaves the backbone;
3. the real loss of each sequence's sub-network (its mean next-token loss) is the
   surrogate's target (Eq. 10); the surrogate is fitted by MSE on a memory of recent
   (router outputs, loss) pairs;
4. routers always get the latency loss of Eq. 8, max(expected cost - T, 0) with the
   expected cost sum_i softmax(R_i) . cost_i from the cost table, and, once the
   surrogate's error on fresh samples (before it fits them, smoothed) is under
   `surrogate_threshold`, its predicted loss.

Dynamic routers start from scratch (the paper) or, with `init_from`, as a trained static
router run's routers (`DynamicRouter.start_from`). With `surrogate_level="token"` the
surrogate predicts each token's loss from its own decisions and final hidden state (and,
with `surrogate_context`, the mean decisions of the token and those before it). With
`signal="measured"` there is no surrogate: routers learn targets from each op's loss
excess measured at every candidate, per token (dynamic, capacity) or per op for a budget
(static) (route/measured.py).

Checkpoints, exact resume, SIGTERM safety and the metrics log work as in `train-elastic`
(the same helpers); `curves.png` shows surrogate MSE, LM loss and latency loss over steps
(the stages of the paper's Figure 12). Joint tuning of routers and backbone afterwards is
not implemented here.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .._atomic import savefig_atomic, write_atomic
from ..elastic.model import ElasticModel
from ..errors import TrainingError
from ..passes.inject_routers import (
    MODES,
    budget_source,
    calibrate_budget,
    calibrate_capacity,
    final_hidden_tap,
    inject_routers,
    router_mode,
    routers_of,
    set_budget,
)
from ..train import state as S
from ..train.loop import (
    _logits,
    _Stop,
    _truncate,
    batch_rows,
    check_resume,
    check_run_folder,
    check_tokens,
    data_fingerprint,
    read_metrics,
    spread_rows,
)
from .costs import CostTable
from .surrogate import Surrogate

TARGETS = ("loss", "excess")
LEVELS = ("sequence", "token")
BUDGET_LOSSES = ("hinge", "match")
SIGNALS = ("surrogate", "measured")


@dataclass(frozen=True)
class RouterConfig:
    """Settings of a router training run (saved with every checkpoint).

    `latency_weight` is lambda of Eq. 7; `tau` the Gumbel-softmax temperature; the
    surrogate steers the routers once the running mean of its squared error on fresh
    samples is below `surrogate_threshold` (in squared loss units) or, when
    `surrogate_explained` is set, once that error is at most (1 - surrogate_explained)
    times the variance of the remembered targets (a criterion that carries over between
    models and text: on SmolLM2 with eight domains the squared error never fell under
    0.15 while the surrogate explained 50-80 % of the variance); it fits a memory of
    the last `memory` samples at every step.
    """

    steps: int
    mode: str = "static"
    metric: str = "latency"
    batch: int = 4
    # None: from 0.4 of the full cost, or the cheapest sub-network's fraction where that is
    # more, to 1 (`CostTable.budget_range`, resolved when training starts)
    budget_range: tuple[float, float] | None = None
    lr: float = 1e-3
    surrogate_lr: float = 3e-3
    latency_weight: float = 10.0
    # "hinge" (Eq. 8: only spending over T costs) or "match" (|expected cost - T|: Figure 3's
    # "the requested latency matches the real overall latency"; spending under T costs too,
    # so routers whose surrogate is too weak to push them wider still use the budget given)
    budget_loss: str = "hinge"
    tau: float = 1.0
    surrogate_threshold: float = 0.05
    surrogate_explained: float | None = None  # trust by explained variance instead
    surrogate_warmup: int = 20  # first steps: only the surrogate learns (Figure 12, stage 1)
    target: str = "loss"  # "loss" (Eq. 10) or "excess": loss minus the full model's
    # "sequence" (Eq. 10: a sequence's loss from its token shares and pooled hidden state)
    # or "token" (dynamic/capacity: each token's loss from its own widths and hidden state,
    # so routers learn which tokens need width; the memory then holds sampled tokens)
    surrogate_level: str = "sequence"
    # token level: the surrogate also reads the mean decisions of the token's context
    # (itself and every earlier token), whose widths its loss depends on through attention
    surrogate_context: bool = False
    surrogate_hidden: int = 128
    memory: int = 512
    hidden: int = 64  # static router MLP width
    units: int = 128  # dynamic router U (paper: 128)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    init_from: str | None = None  # dynamic/capacity: start from this static router run
    # capacity, latency: rounds per batch of the end-of-run timing (calibrate_capacity)
    capacity_timing_reps: int = 0
    # "surrogate" (Figure 3) or "measured" (routers learn targets from each op's measured
    # excess at every candidate, route/measured.py: per token, or per op for static ones)
    signal: str = "surrogate"
    measure: tuple[str, ...] = ("mlp", "attention")  # measured: the kinds of ops measured
    # measured: what a position's excess is shrunk toward, "hidden" (what its op's router
    # input predicts of it, measured.predicted_excess) or "mean" (its op's mean excess),
    # and the share of its own deviation from that its target keeps (1: as measured).
    # Default 0 toward hidden, 0.3 toward mean: on SmolLM2 the best of each, and hidden
    # beat mean at every budget (docs/ROUTERS.md, "Shrunk toward what the hidden state
    # predicts"). Static routers pick one width per op for a budget: their targets are
    # each op's mean excess (None: "mean" and 0 for them, "hidden" for the others)
    shrink_toward: str | None = None
    token_weight: float | None = None
    extra: dict = field(default_factory=dict)
    # what a run saved before a field existed ran with, where that is not today's default
    # (check_resume compares a resumed run against it)
    BEFORE_FIELD: ClassVar[dict] = {"shrink_toward": "mean"}
    # fields that only one signal reads (check_resume ignores the other signal's)
    SURROGATE_ONLY: ClassVar[tuple] = (
        "surrogate_lr", "latency_weight", "budget_loss", "tau", "surrogate_threshold",
        "surrogate_explained", "surrogate_warmup", "target", "surrogate_level",
        "surrogate_context", "surrogate_hidden", "memory")
    MEASURED_ONLY: ClassVar[tuple] = ("measure", "shrink_toward", "token_weight")

    def unused_fields(self) -> set[str]:
        """Fields this run's signal does not read: a resumed run may differ on them."""
        return set(self.SURROGATE_ONLY if self.signal == "measured" else self.MEASURED_ONLY)

    def __post_init__(self) -> None:  # frozen: defaults resolved once, here
        static = self.mode == "static"
        if self.shrink_toward is None:
            object.__setattr__(self, "shrink_toward", "mean" if static else "hidden")
        if self.token_weight is None:
            object.__setattr__(self, "token_weight",
                               0.0 if static or self.shrink_toward == "hidden" else 0.3)

    def validate(self) -> None:
        if self.steps < 1:
            raise TrainingError(f"steps must be >= 1, got {self.steps}")
        if self.mode not in MODES:
            raise TrainingError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.batch < 1:
            raise TrainingError(f"batch must be >= 1, got {self.batch}")
        if self.budget_range is not None and not 0 < self.budget_range[0] \
                <= self.budget_range[1] <= 1:
            raise TrainingError(f"budget_range is 0 < low <= high <= 1 (fractions of the "
                                f"full cost), got {list(self.budget_range)}")
        for name in ("lr", "surrogate_lr", "tau", "surrogate_threshold"):
            if not getattr(self, name) > 0:
                raise TrainingError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.capacity_timing_reps < 0 or (self.capacity_timing_reps and (
                self.metric != "latency" or self.mode != "capacity")):
            raise TrainingError(f"capacity_timing_reps is a number of timing rounds >= 0, "
                                f"for capacity routers and latency budgets only; got "
                                f"{self.capacity_timing_reps} with mode {self.mode!r} and "
                                f"metric {self.metric!r}")
        if self.budget_loss not in BUDGET_LOSSES:
            raise TrainingError(f"budget_loss must be one of {list(BUDGET_LOSSES)}, got "
                                f"{self.budget_loss!r}")
        if self.target not in TARGETS:
            raise TrainingError(f"target must be one of {list(TARGETS)}, got {self.target!r}")
        if self.surrogate_level not in LEVELS:
            raise TrainingError(f"surrogate_level must be one of {list(LEVELS)}, got "
                                f"{self.surrogate_level!r}")
        if self.surrogate_context and self.surrogate_level != "token":
            raise TrainingError("surrogate_context adds a token's context to a token-level "
                                "surrogate; use surrogate_level='token'")
        if self.surrogate_level == "token" and self.mode == "static":
            raise TrainingError("a token-level surrogate needs per-token widths: use mode "
                                "'dynamic' or 'capacity' (static routers pick one "
                                "sub-network per sequence)")
        if self.init_from is not None and self.mode == "static":
            raise TrainingError("init_from starts dynamic or capacity routers from trained "
                                "static ones; a static run starts from scratch")
        if self.surrogate_explained is not None and not 0 < self.surrogate_explained < 1:
            raise TrainingError(f"surrogate_explained is a share of variance in (0, 1), got "
                                f"{self.surrogate_explained}")
        if self.signal not in SIGNALS:
            raise TrainingError(f"signal must be one of {list(SIGNALS)}, got {self.signal!r}")
        if self.signal == "measured":
            if self.mode == "static" and (self.shrink_toward, self.token_weight) != ("mean", 0):
                raise TrainingError(
                    f"static routers pick one width per op for a budget, taught by each op's "
                    f"mean measured excess; shrink_toward {self.shrink_toward!r} and "
                    f"token_weight {self.token_weight} are for per-token routers: leave them "
                    "unset (or use mode 'dynamic')")
            if not self.measure or set(self.measure) - {"mlp", "attention"}:
                raise TrainingError(f"measure names kinds of ops, 'mlp' and/or 'attention'; "
                                    f"got {list(self.measure)}")
            if self.shrink_toward not in ("mean", "hidden"):
                raise TrainingError(f"shrink_toward is 'mean' or 'hidden', got "
                                    f"{self.shrink_toward!r}")
            if not 0 <= self.token_weight <= 1:
                raise TrainingError(f"token_weight is a share in [0, 1], got "
                                    f"{self.token_weight}")
            if set(self.measure) != {"mlp", "attention"} and self.init_from is None:
                raise TrainingError(f"measuring only {list(self.measure)} leaves the other "
                                    "ops' routers untaught: give init_from (a static router "
                                    "run) so they follow the budget, or measure both kinds")
        if self.latency_weight < 0 or self.memory < 1 or self.surrogate_warmup < 0:
            raise TrainingError("latency_weight and surrogate_warmup must be >= 0, memory >= 1")


class RouterTraining(nn.Module):
    """What router training updates and checkpoints: the routers (the same modules the
    graph calls), the surrogate, and the surrogate's memory of recent samples."""

    def __init__(self, routers: dict, surrogate: Surrogate, router_dim: int,
                 hidden_dim: int, memory: int):
        super().__init__()
        self.routers = nn.ModuleDict({str(i): r for i, r in enumerate(routers.values())})
        self.surrogate = surrogate
        self.register_buffer("mem_r", torch.zeros(memory, router_dim))
        self.register_buffer("mem_h", torch.zeros(memory, hidden_dim))
        self.register_buffer("mem_y", torch.zeros(memory))
        self.register_buffer("mem_n", torch.zeros((), dtype=torch.long))
        self.register_buffer("mse_ema", torch.full((), -1.0))

    def remember(self, r: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        """Append samples (rows) to the ring buffer, overwriting the oldest."""
        m, n = self.mem_y.shape[0], y.shape[0]
        if n > m:  # only the last m fit
            r, h, y = r[-m:], h[-m:], y[-m:]
            self.mem_n += n - m
            n = m
        j = (int(self.mem_n) + torch.arange(n, device=y.device)) % m
        self.mem_r[j], self.mem_y[j] = r, y
        if h.shape[-1]:
            self.mem_h[j] = h
        self.mem_n += n

    def memory(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        n = min(int(self.mem_n), self.mem_y.shape[0])
        h = self.mem_h[:n] if self.mem_h.shape[-1] else None
        return self.mem_r[:n], h, self.mem_y[:n]


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position but the last: [batch, seq - 1]."""
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                           reduction="none")
    return loss.view(ids.shape[0], -1)


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence: [batch]."""
    return token_losses(logits, ids).mean(1)


def router_outputs(em: ElasticModel, per_token: bool = False) -> tuple[torch.Tensor,
                                                                       list[torch.Tensor]]:
    """After a sampling forward: the surrogate input r [batch, sum K] (per op: the one-hot
    sample, or the share of tokens per candidate; with `per_token`, [batch, seq, sum K]:
    each token's one-hot samples) with straight-through gradients, and per op the expected
    candidate distribution [batch, K] (softmax, token-averaged)."""
    decisions, probs = [], []
    for name, r in routers_of(em).items():
        if r.record is None:
            raise TrainingError(f"the router of {name} did not sample in the last forward")
        p, s = r.record
        decisions.append(s if s.dim() == 2 or per_token else s.mean(1))
        probs.append(p if p.dim() == 2 else p.mean(1))
    return torch.cat(decisions, -1), probs


def causal_mean(r: torch.Tensor) -> torch.Tensor:
    """[batch, seq, D] -> at each position, the mean over it and every earlier position."""
    count = torch.arange(1, r.shape[1] + 1, device=r.device, dtype=r.dtype)
    return r.cumsum(1) / count[:, None]


def expected_cost(probs: list[torch.Tensor], table: CostTable, names) -> torch.Tensor:
    """Eq. 8's expected cost as a fraction of the full model's: [batch]."""
    total = table.fixed + sum(p @ table.tensor(n, p.device) for p, n in zip(probs, names))
    return total / table.full


def latency_loss(cost: torch.Tensor, budget: torch.Tensor, match: bool = False) -> torch.Tensor:
    """Eq. 8: mean over sequences of max(expected cost - T, 0) (fractions of full); with
    `match`, of |expected cost - T| (spending under the budget costs as much as over)."""
    return ((cost - budget).abs() if match else torch.relu(cost - budget)).mean()


def _final_hidden(em: ElasticModel, batch: int, per_token: bool = False) -> torch.Tensor:
    """The recorded final hidden state pooled over tokens [batch, H], or with `per_token`
    [batch, seq, H]; [batch, 0] when the graph has no tap (static routers)."""
    tap = final_hidden_tap(em)
    if tap is None or tap.last is None:
        return torch.zeros(batch, 0)
    h = tap.last.float()
    h = h.reshape(batch, -1, h.shape[-1])
    return h if per_token else h.mean(1)


def _hidden_dim(em: ElasticModel) -> int:
    tap = final_hidden_tap(em)
    if tap is None:
        return 0
    node = next(n for n in em.graph_module.graph.nodes
                if n.op == "call_module" and n.target == "flextron_final_hidden")
    val = node.args[0].meta.get("val")
    if val is None:
        raise TrainingError("the final hidden state has no recorded shape; dynamic routers "
                            "need a graph traced with shapes (flextronize does that)")
    return int(val.shape[-1])


@torch.no_grad()
def full_losses(em: ElasticModel, ids: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Each sequence's loss (with `per_token`, each token's) under the full model (every
    router gives its widest width)."""
    routers = list(routers_of(em).values())
    saved = [(r.full, r.record, r.last_index) for r in routers]
    try:
        for r in routers:
            r.full = True
        logits = _logits(em(ids))
        return token_losses(logits, ids) if per_token else sequence_losses(logits, ids)
    finally:
        for r, (full, record, last) in zip(routers, saved):
            r.full, r.record, r.last_index = full, record, last


class _Sampling:
    """Routers sample (Gumbel) from `gen` and the final-hidden tap records; undone on exit.
    (The exported graph has no train/eval switch: it was traced in eval mode.)"""

    def __init__(self, em: ElasticModel, gen: torch.Generator, tau: float):
        self.em, self.gen, self.tau = em, gen, tau

    def __enter__(self):
        for r in routers_of(self.em).values():
            r.sampling, r.generator, r.tau = True, self.gen, self.tau
        tap = final_hidden_tap(self.em)
        if tap is not None:
            tap.recording = True
        return self

    def __exit__(self, *exc):
        for r in routers_of(self.em).values():
            r.sampling, r.generator = False, None
        tap = final_hidden_tap(self.em)
        if tap is not None:
            tap.recording, tap.last = False, None


def router_step(em: ElasticModel, state: RouterTraining, table: CostTable, ids: torch.Tensor,
                config: RouterConfig, gen: torch.Generator) -> tuple[dict, dict]:
    """One router training step's losses and gradients (not applied): returns the metrics
    and {parameter: gradient}."""
    low, high = config.budget_range
    budget = low + (high - low) * torch.rand(ids.shape[0], generator=gen)
    budget = budget.to(ids.device)
    set_budget(em, budget)
    token = config.surrogate_level == "token"
    with _Sampling(em, gen, config.tau), torch.enable_grad():
        logits = _logits(em(ids))
        target = (token_losses if token else sequence_losses)(logits.detach(), ids)
        del logits
        r, probs = router_outputs(em, per_token=token)
        if config.surrogate_context:
            r = torch.cat([r, causal_mean(r)], -1)
        h = _final_hidden(em, ids.shape[0], per_token=token).to(ids.device)
    if config.target == "excess":
        target = target - full_losses(em, ids, per_token=token)
    fresh = None
    if token:  # the widths and hidden state at position t predict the loss of token t + 1
        r, h, target = r[:, :-1].flatten(0, 1), h[:, :-1].flatten(0, 1), target.flatten()
        # the memory gets a random sample of this step's tokens (a share of its size)
        keep = max(1, config.memory // 8)
        fresh = torch.randperm(target.shape[0], generator=gen)[:keep].to(target.device)
    names = list(routers_of(em))
    cost = expected_cost(probs, table, names)
    lat = latency_loss(cost, budget, match=config.budget_loss == "match")
    sur = state.surrogate
    hs = h if h.shape[-1] else None
    if int(state.mem_n) == 0:
        sur.offset.fill_(float(target.mean()))
    with torch.no_grad():
        pred = sur(r.detach(), hs)
        mse = float(((pred - target) ** 2).mean())
    ema = mse if float(state.mse_ema) < 0 else 0.9 * float(state.mse_ema) + 0.1 * mse
    state.mse_ema.fill_(ema)
    seen = state.memory()[2]
    seen_spread = float(seen.var(unbiased=False)) if seen.numel() > 1 else 0.0
    fresh_explained = 1 - ema / seen_spread if seen_spread > 0 else None
    if config.surrogate_explained is None:
        good = ema < config.surrogate_threshold
    else:
        good = fresh_explained is not None and fresh_explained >= config.surrogate_explained
    # samples remembered per step: sequences, or the tokens kept (warm-up counts steps)
    per_step = ids.shape[0] if fresh is None else fresh.shape[0]
    trusted = good and int(state.mem_n) >= config.surrogate_warmup * per_step
    if fresh is None:
        state.remember(r.detach(), h, target)
    else:
        state.remember(r.detach()[fresh], h[fresh], target[fresh])
    mr, mh, my = state.memory()
    fit = ((sur(mr, mh) - my) ** 2).mean()
    spread = float(my.var(unbiased=False)) if my.numel() > 1 else 0.0
    warm = int(state.mem_n) > config.surrogate_warmup * per_step
    router_loss = config.latency_weight * lat * float(warm)
    predicted = torch.zeros(())
    if trusted:
        frozen = {k: v.detach() for k, v in sur.named_parameters()}
        frozen.update(dict(sur.named_buffers()))
        predicted = functional_call(sur, frozen, (r, hs)).mean()
        router_loss = router_loss + predicted
    rparams = [p for p in state.routers.parameters()]
    sparams = [p for p in sur.parameters()]
    grads = {}
    for params, loss in ((rparams, router_loss), (sparams, fit)):
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        grads.update({p: g if g is not None else torch.zeros_like(p) for p, g in zip(params, gs)})
    metrics = {"lm_loss": float(target.mean()), "surrogate_mse": mse, "surrogate_mse_ema": ema,
               "surrogate_fit": float(fit.detach()),
               "surrogate_explained": 1 - float(fit.detach()) / spread if spread else 0.0,
               "surrogate_fresh_explained": fresh_explained, "surrogate_pred": float(pred.mean()),
               "latency_loss": float(lat.detach()), "expected_cost": float(cost.detach().mean()),
               "budget": float(budget.mean()), "over_budget": float((cost.detach() > budget).float().mean()),
               "trusted": bool(trusted), "predicted_loss": float(predicted.detach()),
               "router_loss": float(router_loss.detach())}
    return metrics, grads


def run_steps(run: Path, config, tokens: torch.Tensor, device, ckpt, module: nn.Module,
              optimizer, scheduler, gen: torch.Generator, step_fn, *, info: dict, desc: str,
              postfix, plot, progress: bool, max_seconds: float | None) -> dict:
    """The loop that router training and joint tuning share: restore checkpoint `ckpt` (if
    any), then per step a batch, `step_fn(ids)` (returns the metrics row and {parameter:
    gradient}), the optimizer and scheduler steps, a `metrics.jsonl` row, progress, and
    checkpoints of `module` every `config.checkpoint_every` steps, at the end, on SIGTERM
    or Ctrl-C, and after `max_seconds` of steps. Returns the summary's first fields."""
    start, seen, elapsed = 0, 0, 0.0
    if ckpt is not None:
        st = S.load_checkpoint(ckpt, module, optimizer, scheduler, gen)
        start, seen, elapsed = st["step"], st["tokens"], st["elapsed_s"]
        print(f"resuming {run} from {ckpt.name} (step {start})")
    metrics = run / "metrics.jsonl"
    run.mkdir(parents=True, exist_ok=True)
    _truncate(metrics, start)
    write_atomic(run / "config.json", json.dumps(asdict(config), indent=1))
    bar = tqdm(total=config.steps, initial=start, desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True)
    step, status, t_run = start, "done", time.perf_counter()
    try:
        with _Stop() as stop:
            while step < config.steps:
                t0 = time.perf_counter()
                rows = batch_rows(step, config.batch, tokens.shape[0], config.seed)
                ids = tokens[rows].to(device)
                row, grads = step_fn(ids)
                optimizer.zero_grad(set_to_none=True)
                for p, g in grads.items():
                    p.grad = g
                optimizer.step()
                scheduler.step()
                step += 1
                seen += ids.numel()
                dt = time.perf_counter() - t0
                elapsed += dt
                row = {"step": step, **row, "tokens": seen, "tok_per_s": ids.numel() / dt,
                       "elapsed_s": round(elapsed, 3)}
                S.append_metrics(run, row)
                bar.update(1)
                bar.set_postfix(postfix(row))
                want_stop = stop.requested or (max_seconds is not None and elapsed >= max_seconds)
                if step % config.checkpoint_every == 0 or step == config.steps or want_stop:
                    S.save_checkpoint(run, step, module, optimizer, scheduler, gen,
                                      dict(info, tokens=seen, elapsed_s=elapsed),
                                      keep=config.keep_checkpoints)
                    plot(run)
                if want_stop and step < config.steps:
                    status = "stopped"
                    break
    finally:
        bar.close()
    return {"status": status, "step": step, "tokens": seen, "elapsed_s": elapsed,
            "wall_s": time.perf_counter() - t_run}


@S.holding_run_lock
def train_routers(em: ElasticModel, tokens: torch.Tensor, run: str | Path, config: RouterConfig,
                  cost, *, heldout: torch.Tensor | None = None, resume: bool = False,
                  progress: bool = True, max_seconds: float | None = None,
                  overwrite: bool = False, eval_budgets=(0.5, 0.6, 0.7, 0.8)) -> dict:
    """Inject routers of `config.mode` into `em` (unless it has them) and train them on
    token blocks `tokens` [n, seq] against `cost` (a `CostTable`, a profiler `CostModel` or
    {op: [cost per candidate]}); checkpoints and metrics go to `run`.

    The backbone stays frozen. On SIGTERM or Ctrl-C the run checkpoints and returns (while
    measuring excess, `signal="measured"`: it saves what it measured); `resume=True`
    continues from the newest checkpoint exactly as if never stopped. With `heldout`, the
    summary holds each of `eval_budgets`' held-out loss and predicted cost.

    Example:
        >>> cfg = RouterConfig(steps=300, mode="static")                   # doctest: +SKIP
        >>> train_routers(em, blocks, "runs/routers", cfg, CostModel(em, lut))  # doctest: +SKIP
    """
    run = Path(run)
    config.validate()
    check_tokens(tokens, config.batch)
    table = CostTable.coerce(em, cost, config.metric)
    if config.budget_range is None:
        config = replace(config, budget_range=table.budget_range())
    table.refuse_below_minimum(config.budget_range[0])
    # a folder holding only measured excess is a measured run stopped before its first step
    check_run_folder(run, overwrite or (run / "measured.pt").is_file())
    S.clean_leftovers(run)
    data = data_fingerprint(tokens)
    ckpt = S.latest(run) if resume else None
    if not resume and ckpt is None and S.latest(run) is not None:
        raise TrainingError(f"{run} already holds checkpoints; pass resume=True (--resume) "
                            "to continue it, or use a new folder")
    if ckpt is not None:
        check_resume(run, S.read_state(ckpt), config, data)
    mode = router_mode(em)
    excess = None
    if config.signal == "measured":  # before the routers: each op's width is set in turn
        from .measured import FILE, measure_excess

        excess = measure_excess(em, tokens, run / FILE, config.measure, config.batch, data,
                                progress, max_seconds)
        if excess is None:  # stopped while measuring; what it measured is in RUN/measured.pt
            return {"status": "stopped", "step": 0, "tokens": 0, "elapsed_s": 0.0,
                    "stage": "measuring", "mode": config.mode, "metric": config.metric,
                    "budget_range": list(config.budget_range)}
    if mode is None:
        static = None
        if config.init_from is not None and ckpt is None:  # a resumed run loads its own
            from .selection import read_static_routers, router_folder

            static = read_static_routers(em, router_folder(config.init_from))
        injected = inject_routers(em, config.mode, cost=table, metric=config.metric,
                                  hidden=config.hidden, units=config.units, seed=config.seed)
        if static is not None:
            for name, router in injected.items():
                router.start_from(static[name])
    elif mode != config.mode:
        raise TrainingError(f"the model already has {mode} routers, not {config.mode} ones; "
                            "remove_routers(em) first")
    routers = routers_of(em)
    budget_source(em).calibration = None  # it was measured on the routers before training
    device = next(em.parameters()).device
    frozen = {p: p.requires_grad for p in em.parameters()}
    for p in em.parameters():
        p.requires_grad_(False)
    info = {"config": asdict(config), "data": data, "cost": table.to_dict()}
    if excess is not None:
        from .measured import fit_measured

        try:
            summary = fit_measured(em, excess, tokens, run, config, table, ckpt, info,
                                   progress, max_seconds)
        finally:
            for p, was in frozen.items():
                p.requires_grad_(was)
        return _finish(em, summary, config, table, tokens, heldout, eval_budgets, progress)
    router_dim = sum(len(r.candidates) for r in routers.values()) \
        * (2 if config.surrogate_context else 1)
    hidden_dim = _hidden_dim(em) if config.mode != "static" else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        surrogate = Surrogate(router_dim, config.surrogate_hidden, hidden_dim or None)
    state = RouterTraining(routers, surrogate, router_dim, hidden_dim, config.memory).to(device)
    for p in state.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([
        {"params": list(state.routers.parameters()), "lr": config.lr},
        {"params": list(state.surrogate.parameters()), "lr": config.surrogate_lr}],
        betas=(0.5, 0.99))  # little momentum: the hinge of Eq. 8 stops pushing at the budget
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gen = torch.Generator().manual_seed(config.seed)
    try:
        summary = run_steps(
            run, config, tokens, device, ckpt, state, optimizer, scheduler, gen,
            lambda ids: router_step(em, state, table, ids, config, gen),
            info=info, desc=f"train-routers ({config.mode})", plot=plot_router_run,
            postfix=lambda row: {"lm": f"{row['lm_loss']:.3f}",
                                 "mse": f"{row['surrogate_mse']:.4f}",
                                 "lat": f"{row['latency_loss']:.4f}"},
            progress=progress, max_seconds=max_seconds)
    finally:
        for p, was in frozen.items():
            p.requires_grad_(was)
    return _finish(em, summary, config, table, tokens, heldout, eval_budgets, progress)


def _finish(em: ElasticModel, summary: dict, config: RouterConfig, table: CostTable,
            tokens: torch.Tensor, heldout, eval_budgets, progress: bool) -> dict:
    """After the steps of a finished run: calibrate dynamic or capacity routers on 2
    batches of training blocks spread over the text (every domain, when it holds several),
    evaluate on `heldout`; the summary with what was done."""
    summary.update(mode=config.mode, metric=config.metric,
                   budget_range=list(config.budget_range))
    status = summary["status"]
    sample = spread_rows(tokens, 2 * config.batch)
    if status == "done" and config.mode == "capacity":  # split budgets as the routers spend
        calibrate_capacity(em, table, sample, batch=config.batch,
                           timing_reps=config.capacity_timing_reps, progress=progress)
    elif status == "done" and config.mode == "dynamic" and config.signal != "measured":
        # spend T where they are asked for T (the measured signal calibrates on its data)
        calibrate_budget(em, table, sample, batch=config.batch, progress=progress)
    if heldout is not None and status == "done":
        summary["eval"] = evaluate_routers(em, heldout, table, eval_budgets, config.batch)
    return summary


@torch.no_grad()
def evaluate_routers(em: ElasticModel, heldout: torch.Tensor, table: CostTable, budgets,
                     batch: int = 4) -> dict[str, dict]:
    """Per budget: mean held-out next-token loss with the routers deciding (argmax, or
    capacity), the predicted cost as a fraction of full (token-averaged for dynamic), and
    whether that cost is within the budget. Static routers' argmax can spend a little more
    or less than T; `select` (`flextron select`) fits their widths to it."""
    from ..train.loop import lm_loss

    device = next(em.parameters()).device
    names = list(routers_of(em))
    out = {}
    for b in budgets:
        set_budget(em, float(b))
        total = count = spent = 0.0
        for i in range(0, heldout.shape[0], batch):
            ids = heldout[i:i + batch].to(device)
            n = ids[:, 1:].numel()
            total += float(lm_loss(_logits(em(ids)), ids)) * n
            count += n
            spent += chosen_cost(em, table, names) * ids.numel()
        cost = spent / heldout.numel() / table.full
        out[str(b)] = {"loss": total / count, "cost": cost,
                       "within_budget": bool(cost <= float(b) + 1e-9)}
    return out


def chosen_cost(em: ElasticModel, table: CostTable, names=None) -> float:
    """Cost (table units) of the routers' choices in the last forward, token-averaged."""
    total = table.fixed
    for name, r in routers_of(em).items():
        k = r.last_index
        c = table.tensor(name)
        total += float(c[k]) if isinstance(k, int) else float(c[k.cpu()].mean())
    return total


def plot_rows(run: str | Path, panels: int, width: float = 5.0):
    """(pyplot, figure, axes, metrics rows, steps) for a run's curves, or None without
    matplotlib or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run)
    if not rows:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 4))
    return plt, fig, axes, rows, [r["step"] for r in rows]


def cost_panel(ax, steps, rows) -> None:
    """Latency loss, expected cost and budget over steps."""
    ax.plot(steps, [r["latency_loss"] for r in rows], lw=0.8, label="latency loss (Eq. 8)")
    ax.plot(steps, [r["expected_cost"] for r in rows], lw=0.8, label="expected cost")
    ax.plot(steps, [r["budget"] for r in rows], lw=0.8, label="budget (batch mean)")
    ax.set_title("cost, fraction of full")
    ax.set_xlabel("step")
    ax.legend()


def save_curves(plt, fig, run: str | Path) -> Path:
    fig.tight_layout()
    out = savefig_atomic(fig, Path(run) / "curves.png", dpi=110)
    plt.close(fig)
    return out


def plot_router_run(run: str | Path) -> Path | None:
    """`RUN/curves.png`: surrogate MSE, LM loss (real and predicted) and latency loss with
    expected cost against budget, over steps (the stages of the paper's Figure 12)."""
    got = plot_rows(run, 3)
    if got is None:
        return None
    plt, fig, (a, b, c), rows, steps = got
    a.plot(steps, [r["surrogate_mse"] for r in rows], lw=0.8, label="on fresh samples")
    a.plot(steps, [r["surrogate_mse_ema"] for r in rows], label="running mean")
    trusted = [r["step"] for r in rows if r["trusted"]]
    if trusted:
        a.axvline(trusted[0], color="gray", ls="--", label="routers follow the surrogate")
    a.set_yscale("log")
    a.set_title("surrogate MSE")
    a.set_xlabel("step")
    a.legend()
    b.plot(steps, [r["lm_loss"] for r in rows], lw=0.8, label="real (sampled sub-networks)")
    b.plot(steps, [r["surrogate_pred"] for r in rows], lw=0.8, label="surrogate")
    b.set_title("LM loss")
    b.set_xlabel("step")
    b.legend()
    cost_panel(c, steps, rows)
    return save_curves(plt, fig, run)


__all__ = ["RouterConfig", "RouterTraining", "chosen_cost", "evaluate_routers",
           "expected_cost", "latency_loss", "plot_router_run", "router_step",
           "sequence_losses", "train_routers"]
