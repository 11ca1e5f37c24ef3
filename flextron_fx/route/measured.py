"""Routers taught by measured per-token excess (`train-routers --signal measured`).

The surrogate (route/train.py) and the real loss's gradient (route/joint.py) both left
per-token routers on SmolLM2 choosing one width per op for every token: a straight-through
gradient is the first-order change of the loss (route/sensitivity.py), and dropping three
quarters of an MLP is far outside the range where that says which tokens can be narrowed
(docs/ROUTERS.md). This teacher measures it instead, at the candidate:

1. **measure**: per op and candidate k, one pass over the text with that op at k for every
   token and every other op at full width; a token's excess e[op, t, k] is its own
   next-token loss there minus at full width (the oracle of `benchmarks/token_shares.py
   --per-op`, at every candidate). Per batch one full-width pass, then per op and
   candidate only the part of the graph the op's width reaches (`Rerun`: about half of
   SmolLM2 for the average op); saved batch by batch to `RUN/measured.pt`, so an
   interrupted run measures only what is missing.
2. **targets**: for budget T, the cheapest sum of excesses the budget allows, op by op and
   token by token: k*(t) = argmin_k e'[op, t, k] + lambda(T) * cost[op, k] / full cost,
   with lambda(T) set by bisection so the token-mean cost of the targets (and of the
   unmeasured ops' routers) is T (a Lagrangian knapsack; it treats excesses as additive).
   Single measurements are mostly noise, so e' shrinks each position's excess toward a
   center: e' = center + `token_weight` x (e - center). The center is what the router's
   own input can know of it (`shrink_toward="hidden"`, the default: a ridge regression of
   the excess on the full-width hidden state, cross-fitted over the measured blocks,
   `predicted_excess`), or the op's mean excess (`"mean"`; `token_weight` 0 is then one
   width per op).
3. **fit**: every measured op's router reads (T, h) for a token (h: the router's input at
   full width) and learns k* by cross-entropy; budgets drawn per token from the budget
   range. Only the routers train; no forward pass of the model per step.

Static routers (one width per op for a budget) learn the same way from T alone, their
targets each op's mean excess (center "mean", token_weight 0): the per-op Lagrangian
choice, with no surrogate to trust first.

Ops whose kind is not measured keep the routers they start with (`init_from`: a static
run's, so their width follows the budget alone) and their cost counts in lambda(T).

On SmolLM2 (converted on eight domains) the routers it trains decide per token. With the
targets as measured they lose to one width per op chosen from the same measurements at
the same cost; shrunk toward the op's mean (token_weight 0.3) they beat it at every budget
by 0.01-0.06 nats, shrunk all the way to the hidden state's prediction (token_weight 0,
the default) by 0.05-0.11 (docs/ROUTERS.md, "Shrunk toward what the hidden state
predicts").
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from .._atomic import write_atomic
from ..elastic.model import ElasticModel, check_call
from ..errors import TrainingError
from ..passes.inject_routers import budget_source, router_mode, routers_of
from ..train.loop import _logits, _Stop
from .costs import CostTable
from .train import token_losses

FILE = "measured.pt"


def token_nll(em: ElasticModel, tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """Next-token loss of every predicted position of `tokens` [n, seq], flattened
    (n * (seq - 1): the last position of a block predicts nothing)."""
    device = next(em.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch):
            ids = tokens[i:i + batch].to(device)
            logits = em(ids)
            out.append(token_losses(getattr(logits, "logits", logits), ids).flatten().cpu())
    return torch.cat(out).float()


def measure_excess(em: ElasticModel, tokens: torch.Tensor, path: str | Path | None,
                   kinds=("mlp", "attention"), batch: int = 4, data: dict | None = None,
                   progress: bool = True,
                   max_seconds: float | None = None) -> dict[str, torch.Tensor] | None:
    """{op: [n * (seq - 1), K] excess}: column k is every position's next-token loss with
    that op alone at candidate k (every token) minus at full width; the last column (full
    width) is zero. `em` has no routers. Ops of `kinds` only.

    Batch by batch: one full-width pass, then per op and narrower candidate only the part
    of the graph that op's width reaches (`Rerun`; on SmolLM2 about half the model on
    average). With `path`, what is measured is saved after every batch (with `data`, the
    text's fingerprint), and positions already there for the same text and candidates are
    not measured again. On SIGTERM or Ctrl-C, or after `max_seconds`, it saves what it has
    after the op being measured and returns None (run it again to go on)."""
    if router_mode(em) is not None:
        raise TrainingError("measuring excess sets each op's width; the model has routers. "
                            "Measure on the elastic model before injecting routers")
    names = [n for n, op in em.ops.items() if op.kind in kinds]
    if not names:
        raise TrainingError(f"the model has no ops of kinds {list(kinds)} to measure; its "
                            f"ops are {sorted({op.kind for op in em.ops.values()})}")
    path = None if path is None else Path(path)
    done = _read(path, data, em) if path is not None and path.is_file() else {}
    done = {n: v for n, v in done.items() if n in names}
    per_block = tokens.shape[1] - 1
    total = tokens.shape[0] * per_block
    rows = {n: done[n].shape[0] if n in done else 0 for n in names}
    if progress and any(rows.values()):
        print(f"reusing {path}: {sum(rows.values()):,} of {len(names) * total:,} op "
              "positions already measured")
    starts = range(0, tokens.shape[0], batch)
    need = [[n for n in names if rows[n] < min(i + batch, tokens.shape[0]) * per_block]
            for i in starts]
    if not any(need):
        return done
    rerun = Rerun(em, names)
    device = next(em.parameters()).device
    bar = tqdm(total=sum(len(em.ops[n].candidates) - 1 for ops in need for n in ops),
               disable=not progress, desc="measuring excess", unit="pass", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with _Stop() as stop, torch.inference_mode():
            for i, ops in zip(starts, need):
                if not ops:
                    continue
                full = rerun.full(tokens[i:i + batch].to(device))
                for name in ops:
                    columns = []
                    for width in em.ops[name].candidates[:-1]:
                        columns.append(rerun.nll(name, width) - full)
                        bar.update(1)
                    columns.append(torch.zeros_like(full))
                    new = torch.stack(columns, -1)[rows[name] - i * per_block:]
                    done[name] = new if name not in done else torch.cat([done[name], new])
                    rows[name] = done[name].shape[0]
                    late = max_seconds is not None and time.perf_counter() - start > max_seconds
                    if stop.requested or late:
                        if path is not None:
                            _write(path, done, data, em)
                        return None
                if path is not None:
                    _write(path, done, data, em)
    finally:
        bar.close()
    return done


class Rerun:
    """One op's excess without running the whole model again: `full(ids)` runs the graph
    at full width and keeps the values that the part downstream of any op's width node
    reads; `nll(op, width)` then runs only that part (torch.fx's partial evaluation,
    `Interpreter.run(initial_env=...)`), every other value taken from the full pass.

    Exact: nothing upstream of an op's width node, nor beside it, depends on its width. On
    a decoder the part after layer l is the rest of the stack and the head, about half the
    model for the average op."""

    def __init__(self, em: ElasticModel, names):
        self.em = em
        gm = em.graph_module
        self.interpreter = fx.Interpreter(gm)
        nodes = list(gm.graph.nodes)
        width = em.width_nodes()
        self.before: dict[str, list[fx.Node]] = {}  # each op's nodes its width does not reach
        read = set()  # values some op's part reads from outside it
        for name in names:
            reached = {width[name]}
            for node in nodes:  # graph order is topological
                if any(i in reached for i in node.all_input_nodes):
                    reached.add(node)
            self.before[name] = [n for n in nodes if n not in reached]
            read |= {i for n in reached for i in n.all_input_nodes if i not in reached}
        self.read = read
        self.values: dict[fx.Node, object] = {}
        self.ids = None

    def full(self, ids: torch.Tensor) -> torch.Tensor:
        """Token losses of `ids` at full width; keeps what `nll` reads."""
        check_call((ids,), self.em.sample_shape)
        keeping = _Keeping(self.em.graph_module, self.read)
        with self.em.at(1.0):
            out = keeping.run(ids)
        self.values, self.ids = keeping.kept, ids
        return self._losses(out)

    def nll(self, name: str, width: int) -> torch.Tensor:
        """Token losses of the last `full` batch with op `name` at `width`, others full."""
        env = {n: self.values.get(n) for n in self.before[name]}  # None: never read
        with self.em.at(1.0), self.em.at({name: width}):
            out = self.interpreter.run(self.ids, initial_env=env)
        return self._losses(out)

    def _losses(self, out) -> torch.Tensor:
        return token_losses(_logits(out), self.ids).flatten().float().cpu()


class _Keeping(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes in `keep`."""

    def __init__(self, gm: fx.GraphModule, keep: set):
        super().__init__(gm)
        self.keep, self.kept = keep, {}

    def run_node(self, node):
        value = super().run_node(node)
        if node in self.keep:
            self.kept[node] = value
        return value


def _write(path: Path, excess: dict, data: dict | None, em: ElasticModel) -> None:
    buf = io.BytesIO()
    torch.save({"excess": excess, "data": data,
                "candidates": {n: list(em.ops[n].candidates) for n in excess}}, buf)
    write_atomic(path, buf.getvalue())


def _read(path: Path, data: dict | None, em: ElasticModel) -> dict:
    saved = torch.load(path, weights_only=True)
    if data is not None and saved.get("data") != data:
        raise TrainingError(f"{path} was measured on other text ({saved.get('data')}, now "
                            f"{data}); delete it, or train on the same text")
    for name, cands in saved["candidates"].items():
        if name not in em.ops or list(em.ops[name].candidates) != cands:
            raise TrainingError(f"{path} was measured on another elastic model (op {name} "
                                f"with candidates {cands}); delete it or use that model")
    return saved["excess"]


def router_inputs(em: ElasticModel, routers: dict, tokens: torch.Tensor,
                  batch: int = 4) -> dict[str, torch.Tensor]:
    """{op: [n * (seq - 1), dim]}: each dynamic router's hidden-state input at every
    predicted position, with every op at full width (each router told to give its widest
    candidate), in the order `measure_excess` uses."""
    device = next(em.parameters()).device
    got: dict[str, list] = {n: [] for n in routers}

    def hook(name):
        def keep(module, args, kwargs):
            h = args[1] if len(args) > 1 else kwargs["h"]
            ids = args[2] if len(args) > 2 else kwargs["ids"]
            h = h.detach().reshape(ids.shape[0], ids.shape[1], -1)
            got[name].append(h[:, :-1].reshape(-1, h.shape[-1]).float().cpu())
        return keep

    handles = [r.register_forward_pre_hook(hook(n), with_kwargs=True)
               for n, r in routers.items()]
    before = {n: r.full for n, r in routers.items()}
    try:
        for r in routers.values():
            r.full = True
        with torch.inference_mode():
            for i in range(0, tokens.shape[0], batch):
                em(tokens[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
        for n, r in routers.items():
            r.full = before[n]
    return {n: torch.cat(v) for n, v in got.items()}


class Teacher:
    """The measured excesses, the routers' inputs and the costs: targets for any budget.

    `excess` {op: [N, K]}, `hidden` {op: [N, dim]} for every router (measured or not),
    `table` the cost table; `others` the routers of unmeasured ops, whose token-mean cost
    at each budget counts against it."""

    def __init__(self, excess: dict, hidden: dict, table: CostTable, others: dict,
                 budget_range: tuple[float, float], grid: int = 101,
                 token_weight: float = 1.0, center: dict | None = None):
        # a position's excess counts `token_weight` of its own deviation from its center
        # (1: as measured). The center is the op's mean (0: one width per op), or with
        # `center` {op: [N, K]} a prediction per position (predicted_excess)
        center = center or {n: e.mean(0, keepdim=True) for n, e in excess.items()}
        self.excess = {n: center[n] + token_weight * (e - center[n])
                       for n, e in excess.items()}
        self.hidden, self.table = hidden, table
        self.costs = {n: table.tensor(n).float() / table.full for n in excess}
        self.budgets = torch.linspace(budget_range[0], budget_range[1], grid)
        fixed = table.fixed / table.full
        self.others = others
        spent = self._others_cost(self.budgets)
        self.multipliers = torch.tensor([self._multiplier(float(t) - fixed - s)
                                         for t, s in zip(self.budgets, spent)])

    def _others_cost(self, budgets: torch.Tensor) -> list[float]:
        """Token-mean cost fraction of the unmeasured routers' choices at each budget."""
        spent = [0.0] * len(budgets)
        with torch.no_grad():
            for name, r in self.others.items():
                c = self.table.tensor(name).float() / self.table.full
                h = self.hidden[name][:, None, :]
                for j, t in enumerate(budgets):
                    k = r.logits(t.expand(h.shape[0]), h).argmax(-1)
                    spent[j] += float(c[k].mean())
        return spent

    def choices(self, multiplier: torch.Tensor, rows=None) -> dict[str, torch.Tensor]:
        """{op: [n] target candidate}: argmin_k excess + multiplier * cost (per row)."""
        m = multiplier.reshape(-1, 1)
        return {n: (e if rows is None else e[rows]).add(m * self.costs[n]).argmin(-1)
                for n, e in self.excess.items()}

    def mean_cost(self, picks: dict) -> float:
        return sum(float(self.costs[n][k].mean()) for n, k in picks.items())

    def _multiplier(self, allowed: float) -> float:
        """The smallest lambda >= 0 whose targets cost at most `allowed` on the measured ops
        (token mean, fraction of the full model); the cheapest candidates' lambda if even
        they cost more."""
        one = torch.ones(1)
        if self.mean_cost(self.choices(0 * one)) <= allowed:
            return 0.0
        lo, hi = 0.0, 1.0
        while self.mean_cost(self.choices(hi * one)) > allowed and hi < 1e8:
            lo, hi = hi, hi * 4
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.mean_cost(self.choices(mid * one)) > allowed:
                lo = mid
            else:
                hi = mid
        return hi

    def multiplier_at(self, budget: torch.Tensor) -> torch.Tensor:
        """lambda for each budget in `budget`: that of the largest grid budget at most it
        (so the targets never cost more than the budget; at most one grid step less)."""
        i = torch.searchsorted(self.budgets, budget.float(), right=True) - 1
        return self.multipliers[i.clamp(0, len(self.budgets) - 1)]

    def targets(self, budget: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """{op: [len(rows)] target candidate} for positions `rows`, each at its budget."""
        return self.choices(self.multiplier_at(budget), rows)

    def choice_at(self, budget: float) -> dict[str, torch.Tensor]:
        """The targets for one budget with lambda solved for it exactly (not on the grid)."""
        spent = self._others_cost(torch.tensor([float(budget)]))[0]
        m = self._multiplier(budget - self.table.fixed / self.table.full - spent)
        return self.choices(torch.tensor([m]))

    def calibration(self, routers: dict, inputs) -> dict:
        """A budget calibration (`BudgetSource.calibration`) without a forward pass: the
        token-mean cost fraction that `routers` (every op's) spend on the teacher's
        positions, from their full-width hidden states, at each router input."""
        costs = []
        with torch.no_grad():
            for x in inputs:
                total = self.table.fixed / self.table.full
                for name, r in routers.items():
                    h = self.hidden[name][:, None, :]
                    k = r.logits(torch.full((h.shape[0],), float(x)), h).argmax(-1)
                    total += float((self.table.tensor(name).float()[k]).mean()) / self.table.full
                costs.append(total)
        return {"inputs": [float(x) for x in inputs], "costs": costs}

    def excess_of(self, picks: dict, rows: torch.Tensor) -> torch.Tensor:
        """Per position, the sum over measured ops of the excess of candidates `picks`."""
        return sum(e[rows].gather(1, picks[n][:, None])[:, 0] for n, e in self.excess.items())


def predicted_excess(excess: dict, hidden: dict, blocks: int, folds: int = 3,
                     alphas=tuple(10.0 ** p for p in range(-3, 3))) -> tuple[dict, dict]:
    """What each router's input can know of its op's measured excess: per op, a ridge
    regression of every candidate's excess on the full-width hidden state, cross-fitted
    (a position is predicted by the fit on the blocks of the other folds, so its own
    noise is not learned back), its strength chosen per op by the held-out error.

    `excess` {op: [N, K]}, `hidden` {op: [N, dim]}, N = `blocks` x positions per block
    (block-major, as measured). Returns ({op: [N, K] prediction}, {op: share of the
    excess's variance the prediction explains, held out})."""
    if min(e.shape[0] for e in excess.values()) < 2 * folds:
        raise TrainingError(f"predicting the excess from the hidden state needs at least "
                            f"{2 * folds} measured positions; measure more text "
                            f"(--measure-blocks) or use --shrink-toward mean")
    predicted, explained = {}, {}
    for name, e in excess.items():
        x, n = hidden[name].double(), e.shape[0]
        # folds of whole blocks (a block's positions share their context), or of parts of
        # blocks where there are fewer blocks than folds
        fold = torch.arange(n) // max(1, n // max(blocks, folds)) % folds
        errors, guesses = [], []
        for f in range(folds):
            fit, out = fold != f, fold == f
            mu, sd = x[fit].mean(0), x[fit].std(0).clamp_min(1e-6)
            ym = e[fit].double().mean(0)
            u, s, vt = torch.linalg.svd((x[fit] - mu) / sd, full_matrices=False)
            uty, xo = u.T @ (e[fit].double() - ym), (x[out] - mu) / sd
            rows = []
            for a in alphas:
                w = vt.T @ ((s / (s ** 2 + a * fit.sum())).unsqueeze(1) * uty)
                rows.append(xo @ w + ym)
            guesses.append(torch.stack(rows))  # [alphas, n_out, K]
            errors.append(((guesses[-1] - e[out].double()) ** 2).sum((1, 2)))
        best = int(torch.stack(errors).sum(0).argmin())
        guess = torch.empty_like(e, dtype=torch.float64)
        for f in range(folds):
            guess[fold == f] = guesses[f][best]
        guess[:, -1] = 0  # full width: no excess by definition
        predicted[name] = guess.to(e.dtype)
        spread = float(((e.double() - e.double().mean(0)) ** 2).sum())
        explained[name] = 1 - float(((guess - e.double()) ** 2).sum()) / max(spread, 1e-12)
    return predicted, explained


def measured_step(teacher: Teacher, routers: dict, rows: torch.Tensor,
                  budget_range: tuple[float, float], gen: torch.Generator):
    """One fitting step on positions `rows`: budgets drawn per position, the teacher's
    targets, cross-entropy of every measured op's router. Returns (metrics row,
    {parameter: gradient})."""
    low, high = budget_range
    budget = low + (high - low) * torch.rand(rows.numel(), generator=gen)
    want = teacher.targets(budget, rows)
    loss, agree, picks = 0.0, 0.0, {}
    for name, k in want.items():
        r = routers[name]
        device = next(r.parameters()).device
        if r.kind == "static":  # one width per op for a budget: from T alone
            logits = r.logits(budget.to(device))
        else:
            logits = r.logits(budget.to(device),
                              teacher.hidden[name][rows][:, None, :].to(device))[:, 0]
        loss = loss + F.cross_entropy(logits.float(), k.to(device))
        picks[name] = logits.detach().argmax(-1).cpu()
        agree += float((picks[name] == k).float().mean())
    loss = loss / len(want)
    params = [p for n in want for p in routers[n].parameters()]
    grads = torch.autograd.grad(loss, params)
    row = {"ce": float(loss.detach()), "agree": agree / len(want),
           "router_excess": float(teacher.excess_of(picks, rows).mean()),
           "oracle_excess": float(teacher.excess_of(want, rows).mean()),
           "router_cost": teacher.mean_cost(picks), "oracle_cost": teacher.mean_cost(want)}
    return row, dict(zip(params, grads))


def fit_measured(em: ElasticModel, excess: dict, tokens: torch.Tensor, run: Path, config,
                 table: CostTable, ckpt, info: dict, progress: bool,
                 max_seconds: float | None) -> dict:
    """Steps 2 and 3 of the module's recipe on `em` with its dynamic routers injected:
    `config.steps` steps of `config.batch` blocks' worth of positions, with `run_steps`'
    checkpoints, resume, metrics and stop handling."""
    from .train import run_steps

    routers = routers_of(em)
    others = {n: r for n, r in routers.items() if n not in excess}
    static = config.mode == "static"
    if static:  # they read the budget alone, and learn each op's mean excess
        excess = {n: e.mean(0, keepdim=True) for n, e in excess.items()}
    hidden = {} if static else router_inputs(em, routers, tokens, config.batch)
    center = None
    if config.shrink_toward == "hidden":
        center, explained = predicted_excess(excess, hidden, tokens.shape[0])
        info["hidden_explains"] = {n: round(v, 4) for n, v in explained.items()}
        if progress:
            print(f"the routers' inputs explain {sum(explained.values()) / len(explained):.1%}"
                  f" of the measured excess (held out, mean over {len(explained)} ops)")
    teacher = Teacher(excess, hidden, table, others, config.budget_range,
                      token_weight=config.token_weight, center=center)
    n = tokens.shape[0] * (tokens.shape[1] - 1)  # predicted positions, as measured
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    groups = order.reshape(tokens.shape[0], tokens.shape[1] - 1)  # a "block" of positions
    module = nn.ModuleDict({str(i): r for i, r in enumerate(routers.values())})
    trained = [p for name in excess for p in routers[name].parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gen = torch.Generator().manual_seed(config.seed)
    summary = run_steps(
        run, config, groups, torch.device("cpu"), ckpt, module, optimizer, scheduler, gen,
        lambda rows: measured_step(  # static: every position reads its op's mean, row 0
            teacher, routers, rows.flatten() if not static else torch.zeros_like(
                rows.flatten()), config.budget_range, gen),
        info=info, desc="train-routers (measured)", plot=plot_measured_run,
        postfix=lambda row: {"ce": f"{row['ce']:.3f}", "agree": f"{row['agree']:.3f}"},
        progress=progress, max_seconds=max_seconds)
    if center is not None:  # what the hidden state explains of each op's excess, held out
        summary["hidden_explains"] = info["hidden_explains"]
    if summary["status"] == "done" and config.mode == "dynamic":
        # the budget each router input spends, read off the teacher's positions (a forward
        # calibration, calibrate_budget, took half an hour on SmolLM2)
        low = max(0.05, config.budget_range[0] - 0.1)
        inputs = torch.arange(round(low * 100), 101) / 100
        budget_source(em).calibration = teacher.calibration(routers, inputs.tolist())
    return summary


def plot_measured_run(run: str | Path) -> Path | None:
    """`RUN/curves.png`: the routers' cross-entropy and agreement with the teacher's
    targets, and the summed measured excess and cost of their choices against the
    teacher's, over steps."""
    from .train import plot_rows, save_curves

    got = plot_rows(run, 3)
    if got is None:
        return None
    plt, fig, (a, b, c), rows, steps = got
    a.plot(steps, [r["ce"] for r in rows], lw=0.8, label="cross-entropy")
    a.plot(steps, [r["agree"] for r in rows], lw=0.8, label="share of targets hit")
    a.set_title("routers against the measured targets")
    b.plot(steps, [r["router_excess"] for r in rows], lw=0.8, label="routers' choices")
    b.plot(steps, [r["oracle_excess"] for r in rows], lw=0.8, label="targets")
    b.set_title("summed measured excess per token (nats)")
    c.plot(steps, [r["router_cost"] for r in rows], lw=0.8, label="routers' choices")
    c.plot(steps, [r["oracle_cost"] for r in rows], lw=0.8, label="targets")
    c.set_title("cost of the measured ops, fraction of full")
    for ax in (a, b, c):
        ax.set_xlabel("step")
        ax.legend()
    return save_curves(plt, fig, run)
