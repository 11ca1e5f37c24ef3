"""Elastic continued training (paper Eq. 5): the full network plus k sampled sub-networks
per step, gradients accumulated over all of them, one optimizer step.

Sub-networks run on sliced weights (the `WeightSlice` views of the elastic graph), so a
half-width step does about half the work and gradients reach only the active slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._atomic import savefig_atomic, write_atomic
from ..elastic.model import ElasticModel
from ..errors import OutputError, TrainingError
from ..passes.compensate import compensation_modules
from . import state as S
from .sampling import KINDS, SAMPLERS, make_sampler

log = logging.getLogger(__name__)
LOSSES = ("lm", "kd", "lm+kd")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of an elastic training run (saved with every checkpoint).

    `batch` is the global batch in sequences (split over ranks); `samples` is k in Eq. 5.
    `loss` is what sub-networks learn from: "lm" (next tokens), "kd" (the full network's
    distribution at this step, temperature `kd_temperature`) or "lm+kd" (their mean).
    The full network always learns from next tokens. The learning rate warms up linearly for
    `warmup` steps, then follows a cosine down to `min_lr_ratio * lr`.
    `train_compensation`: the per-width compensation biases (passes/compensate.py), if the
    model has them, are trained with the weights (True) or kept as calibrated (False).
    """

    steps: int
    batch: int = 4
    samples: int = 3
    sampler: str = "uniform"
    budget_range: tuple[float, float] | None = None  # budget sampler: 0.4-0.8 if None
    vary: str | None = None  # "mlp" or "attention": sample only that kind; None: both
    loss: str = "lm"
    kd_temperature: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 25
    seed: int = 0
    train_compensation: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the run

    def validate(self, world: int) -> None:
        if self.steps < 1:
            raise TrainingError(f"steps must be >= 1, got {self.steps}")
        if self.batch < 1 or self.batch % world:
            raise TrainingError(f"the global batch ({self.batch}) must be a positive multiple "
                                f"of the number of processes ({world})")
        if self.samples < 0:
            raise TrainingError(f"samples (k sub-networks per step) must be >= 0, "
                                f"got {self.samples}")
        if self.sampler not in SAMPLERS:
            raise TrainingError(f"unknown sampler {self.sampler!r}; choose one of "
                                f"{list(SAMPLERS)}")
        if self.budget_range is not None and self.sampler not in ("budget", "matformer"):
            raise TrainingError(f"a budget range limits the budget and matformer samplers; "
                                f"the {self.sampler} sampler would ignore it: drop it or "
                                "choose one of those samplers")
        if self.vary not in KINDS:
            raise TrainingError(f"vary must be 'mlp', 'attention' or None (both), "
                                f"got {self.vary!r}")
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if not self.lr > 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per predicted token, scaled by T^2 (Hinton et al.)."""
    t = temperature
    s = F.log_softmax(logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    p = F.log_softmax(teacher[:, :-1].float() / t, dim=-1).flatten(0, 1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TrainingError("elastic training needs a model that returns logits [batch, seq, "
                            f"vocab] (or an output with .logits); got {type(out).__name__}")
    return logits


class _Stop:
    """Turns SIGTERM / Ctrl-C into a request to checkpoint and stop after this step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        log.warning("signal %d: saving a checkpoint after this step", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def batch_rows(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Rows of the training blocks used at `step` (0-based): consecutive slices of one
    shuffled order per epoch, so the data position is a function of the step alone."""
    start = step * batch
    rows = []
    while len(rows) < batch:
        epoch, offset = divmod(start + len(rows), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        rows.extend(order[offset:offset + batch - len(rows)].tolist())
    return torch.tensor(rows)


def spread_rows(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """`k` rows of `tokens` spread evenly from the first to the last (all when fewer)."""
    n = tokens.shape[0]
    return tokens[torch.linspace(0, n - 1, min(k, n)).round().long()]


def validation_settings(em: ElasticModel, fractions=(0.5, 0.65, 0.8)) -> dict[str, dict]:
    """Fixed sub-networks to track: full, uniform 50 % MLP (all heads), and the uniform
    (MLP fraction, heads fraction) pair whose non-embedding parameters are closest to each
    fraction of the full model's."""
    full = em.full_widths()
    em_mlp = em.resolve(0.5, kind="mlp") if any(
        o.kind == "mlp" for o in em.ops.values()) else full
    out = {"full": full, "mlp50": {n: em_mlp[n] if em.ops[n].kind == "mlp" else full[n]
                                   for n in full}}
    total = em.num_params(full, non_embedding=True)
    grid = []
    mlp_c = sorted({c / o.full for o in em.ops.values() if o.kind == "mlp" for c in o.candidates})
    att_c = sorted({c / o.full for o in em.ops.values() if o.kind == "attention"
                    for c in o.candidates}) or [1.0]
    for fm in mlp_c or [1.0]:
        for fa in att_c:
            w = {n: _at(o, fm if o.kind == "mlp" else fa) for n, o in em.ops.items()}
            grid.append((em.num_params(w, non_embedding=True) / total, w))
    for f in fractions:
        _, w = min(grid, key=lambda g: abs(g[0] - f))
        out[f"params{round(f * 100)}"] = w
    return out


def _at(op, frac: float) -> int:
    return next(c for c in op.candidates if c >= frac * op.full - 1e-9)


@torch.no_grad()
def evaluate(model, em: ElasticModel, heldout: torch.Tensor, settings: dict[str, dict],
             batch: int) -> dict[str, float]:
    """Mean next-token loss of each setting on the held-out blocks."""
    out = {}
    for name, widths in settings.items():
        total, count = 0.0, 0
        with em.at(widths), torch.no_grad():
            for i in range(0, heldout.shape[0], batch):
                ids = heldout[i:i + batch].to(_device(em))
                logits = _logits(model(ids))
                n = ids[:, 1:].numel()
                total += lm_loss(logits, ids).double().item() * n
                count += n
        out[name] = total / count
    return out


def _device(em) -> torch.device:
    return next(em.parameters()).device


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@S.holding_run_lock
def train_elastic(em: ElasticModel, tokens: torch.Tensor, run: str | Path,
                  config: TrainConfig, *, heldout: torch.Tensor | None = None,
                  resume: bool = False, parallel: str = "auto", progress: bool = True,
                  max_seconds: float | None = None, overwrite: bool = False) -> dict:
    """Train `em` in place on token blocks `tokens` [n, seq]; checkpoints go to `run`.

    Under `torchrun` (an initialised process group) the model is wrapped in
    DistributedDataParallel (`parallel="ddp"`, the default there) or sharded with FSDP2
    (`parallel="fsdp"`); every rank samples the same sub-networks. On SIGTERM or Ctrl-C the
    run checkpoints and returns; `resume=True` continues from the newest checkpoint, step for
    step as if never stopped. `max_seconds` stops (with a checkpoint) once training has taken
    that long in total. Returns a summary with the final validation losses.

    `run` must be new, empty or a training run's folder (`OutputError` otherwise, unless
    `overwrite`), and no other process may be training in it (`state.run_lock`).
    Half-written checkpoints left by a killed run are removed first. A resumed
    run must have the same settings, the same number of steps (the learning-rate schedule
    depends on it) and the same training tokens (a fingerprint is saved with every
    checkpoint); `TrainingError` names the difference otherwise.

    Example:
        >>> cfg = TrainConfig(steps=200, batch=4, loss="lm+kd")              # doctest: +SKIP
        >>> train_elastic(em, train_blocks, "runs/train", cfg, heldout=val)  # doctest: +SKIP
    """
    run = Path(run)
    rank, world = _rank_world()
    config.validate(world)
    check_tokens(tokens, config.batch)
    check_run_folder(run, overwrite)
    if rank == 0:
        S.clean_leftovers(run)
    if world > 1:
        dist.barrier()
    data = data_fingerprint(tokens)
    ckpt = S.latest(run) if resume else None
    if not resume and S.latest(run) is not None:
        raise TrainingError(f"{run} already holds checkpoints ({S._listing(run)}); pass "
                            "resume=True (--resume) to continue it, or use a new folder")
    if ckpt is not None:
        check_resume(run, S.read_state(ckpt), config, data)
    device = _device(em)
    for p in em.parameters():
        p.requires_grad_(True)
    if not config.train_compensation:
        for mod in compensation_modules(em.graph_module).values():
            mod.requires_grad_(False)  # its bias and low-rank factors
    model = _wrap(em, parallel, world, device)
    optimizer = make_optimizer(em, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    gen = torch.Generator().manual_seed(config.seed)
    sample = make_sampler(em, config.sampler,
                          config.budget_range and tuple(config.budget_range), config.vary)
    settings = validation_settings(em)
    start, seen, elapsed = 0, 0, 0.0
    if ckpt is not None:
        st = S.load_checkpoint(ckpt, em, optimizer, scheduler, gen)
        start, seen, elapsed = st["step"], st["tokens"], st["elapsed_s"]
        if rank == 0:
            print(f"resuming {run} from {ckpt.name} (step {start}, {seen:,} tokens)")
    metrics = run / "metrics.jsonl"
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        _truncate(metrics, start)
        write_atomic(run / "config.json", json.dumps(asdict(config), indent=1))
    local = config.batch // world
    if heldout is not None and config.eval_every and start == 0:
        first = evaluate(model, em, heldout, settings, local)  # straight after sorting
        if rank == 0:
            fractions = {k: round(_fraction(em, w), 4) for k, w in settings.items()}
            write_atomic(metrics, json.dumps({"step": 0, "tokens": 0, "val": first,
                                              "val_params": fractions}) + "\n")
    bar = tqdm(total=config.steps, initial=start, desc="train-elastic", unit="step",
               disable=not progress or rank != 0, dynamic_ncols=True)
    info = {"config": asdict(config), "world": world, "data": data}
    last_val = None
    step, status, t_run = start, "done", time.perf_counter()
    with _Stop() as stop:
        while step < config.steps:
            t0 = time.perf_counter()
            rows = batch_rows(step, config.batch, tokens.shape[0], config.seed)
            ids = tokens[rows[rank * local:(rank + 1) * local]].to(device)
            picks = sample(gen, config.samples)
            optimizer.zero_grad(set_to_none=True)
            losses = accumulate(model, em, ids, [em.full_widths()] + picks, config)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(em.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += config.batch * tokens.shape[1]
            loss_t = losses
            if world > 1:
                dist.all_reduce(loss_t)
                loss_t /= world
            dt = time.perf_counter() - t0
            elapsed += dt
            row = {"step": step, "loss": float(loss_t.sum()), "loss_full": float(loss_t[0]),
                   "loss_sub": [float(x) for x in loss_t[1:]],
                   "sub_params": [round(_fraction(em, w), 4) for w in picks],
                   "lr": scheduler.get_last_lr()[0], "tokens": seen,
                   "tok_per_s": config.batch * tokens.shape[1] * (1 + len(picks)) / dt,
                   "elapsed_s": round(elapsed, 3)}
            if heldout is not None and config.eval_every and (
                    step % config.eval_every == 0 or step == config.steps):
                last_val = evaluate(model, em, heldout, settings, local)
                row["val"] = last_val
            if rank == 0:
                S.append_metrics(run, row)
                if "val" in row:
                    plot_run(run)  # keep the curves current while the run goes on
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss_full']:.3f}", tok_s=f"{row['tok_per_s']:.0f}")
            want_stop = stop.requested or (max_seconds is not None and elapsed >= max_seconds)
            if world > 1:
                flag = torch.tensor([float(want_stop)], device=device)
                dist.all_reduce(flag)
                want_stop = bool(flag.item())
            if step % config.checkpoint_every == 0 or step == config.steps or want_stop:
                S.save_checkpoint(run, step, em, optimizer, scheduler, gen,
                                  dict(info, tokens=seen, elapsed_s=elapsed),
                                  write=rank == 0, keep=config.keep_checkpoints)
                if world > 1:
                    dist.barrier()
            if want_stop and step < config.steps:
                status = "stopped"
                break
    bar.close()
    if rank == 0:
        plot_run(run)
    return {"status": status, "step": step, "tokens": seen, "elapsed_s": elapsed,
            "wall_s": time.perf_counter() - t_run, "val": last_val,
            "settings": {k: _fraction(em, w) for k, w in settings.items()}}


def make_optimizer(em: ElasticModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over all weights. Weight decay (off by default) shrinks every weight at every
    step, including rows the step's sub-networks did not use."""
    return torch.optim.AdamW(em.parameters(), lr=config.lr, betas=(0.9, 0.95),
                             weight_decay=config.weight_decay)


def accumulate(model, em: ElasticModel, ids: torch.Tensor, runs: list[dict],
               config: TrainConfig) -> torch.Tensor:
    """Forward and backward every sub-network in `runs` on `ids`, summing gradients into the
    shared weights (Eq. 5); the first run is the teacher when the loss uses KD. Returns the
    losses. Under DDP only the last backward synchronises gradients."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ids.device.type == "cuda"
                else nullcontext())
    losses, teacher = [], None
    for j, widths in enumerate(runs):
        last = j == len(runs) - 1
        with (nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()), \
                autocast, em.at(widths):
            logits = _logits(model(ids))
            if j == 0 or config.loss == "lm":
                loss = lm_loss(logits, ids)
            elif config.loss == "kd":
                loss = kd_loss(logits, teacher, config.kd_temperature)
            else:
                loss = 0.5 * (lm_loss(logits, ids)
                              + kd_loss(logits, teacher, config.kd_temperature))
            if j == 0 and config.loss != "lm":
                teacher = logits.detach()
        loss.backward()
        losses.append(loss.detach().float())
        del logits, loss
    return torch.stack(losses)


def _fraction(em: ElasticModel, widths: dict) -> float:
    return em.num_params(widths, non_embedding=True) / em.num_params(em.full_widths(),
                                                                     non_embedding=True)


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        span = max(1, config.steps - config.warmup)
        t = min(1.0, (step - config.warmup) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _wrap(em: ElasticModel, parallel: str, world: int, device: torch.device):
    if parallel not in ("auto", "none", "ddp", "fsdp"):
        raise TrainingError(f"parallel must be auto, none, ddp or fsdp, got {parallel!r}")
    if world == 1 or parallel == "none":
        return em
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(em.graph_module)
        return em
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(em, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def _truncate(metrics: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a run resumes from), and a
    last line cut short by a kill."""
    if not metrics.exists():
        return
    keep = [json.dumps(r) for r in _rows(metrics) if r["step"] <= step]
    write_atomic(metrics, "".join(line + "\n" for line in keep))


def _rows(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise TrainingError(f"{path}, line {i + 1}, is not JSON: the log is damaged; "
                                    "delete that line or start a new run") from None
            log.warning("%s: ignoring its last line, cut short by a kill", path)
    return rows


def read_metrics(run: str | Path) -> list[dict]:
    return _rows(Path(run) / "metrics.jsonl")


def data_fingerprint(tokens: torch.Tensor) -> dict:
    """Shape and SHA-256 of the training token blocks: a resumed run checks it trains on
    the same data as the steps before."""
    t = tokens.detach().cpu().contiguous()
    digest = hashlib.sha256(str(t.dtype).encode())
    digest.update(t.numpy().tobytes())
    return {"blocks": int(t.shape[0]), "seq": int(t.shape[1]), "sha256": digest.hexdigest()}


def check_resume(run: Path, saved_state: dict, config: TrainConfig, data: dict) -> None:
    """Refuse to resume `run` when the settings, the number of steps or the training data
    differ from those of its checkpoint (`saved_state`, its state.json). Settings the run
    does not read (the config's `unused_fields()`, where it has one) are not compared."""
    saved = saved_state["config"]
    mine = json.loads(json.dumps(asdict(config)))
    # runs older than a field ran with its default then: today's, or BEFORE_FIELD's
    defaults = {f.name: f.default for f in fields(config)}
    defaults.update(getattr(config, "BEFORE_FIELD", {}))
    unused = config.unused_fields() if hasattr(config, "unused_fields") else set()
    diff = {k: (saved.get(k, defaults[k]), v) for k, v in mine.items()
            if k not in ("steps", "extra", *unused) and saved.get(k, defaults[k]) != v}
    if diff:
        raise TrainingError(f"resuming {run} with different settings {diff} (saved, "
                            "given); resume with the run's own settings")
    if saved.get("steps") != config.steps:
        raise TrainingError(
            f"resuming {run} with steps={config.steps}, but it was started with "
            f"steps={saved.get('steps')}: the learning-rate schedule (warm-up, then a cosine "
            f"that ends at the last step) depends on it, so the steps to come would follow "
            f"another schedule than the steps done. Resume with --steps {saved.get('steps')} "
            "(--max-minutes or Ctrl-C stop earlier), or start a new run from its final/ or "
            "a checkpoint's weights")
    was, now = saved.get("extra") or {}, mine["extra"]
    spec = {k: (was.get(k), now.get(k)) for k in sorted(set(was) | set(now))
            if k != "elastic" and was.get(k) != now.get(k)}
    if spec:
        raise TrainingError(f"resuming {run} on other training data: "
                            + "; ".join(f"{k}: the run used {a!r}, now {b!r}"
                                        for k, (a, b) in spec.items())
                            + ". Resume with the run's own data, or use a new folder")
    before = saved_state.get("data")
    if before is None:
        log.warning("%s: its checkpoint predates data fingerprints; cannot check that the "
                    "training text is the same as before", run)
    elif before != data:
        raise TrainingError(
            f"resuming {run} on other training tokens: the run used {before['blocks']:,} "
            f"blocks of {before['seq']} tokens (sha256 {before['sha256'][:12]}), these are "
            f"{data['blocks']:,} blocks of {data['seq']} (sha256 {data['sha256'][:12]}). "
            "Resume with the same text, tokenizer and --seq, or use a new folder")


def check_tokens(tokens: torch.Tensor, batch: int) -> None:
    """Training token blocks: a LongTensor [n, seq], seq >= 2, at least one batch of them."""
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype != torch.long:
        raise TrainingError(f"tokens must be a LongTensor [n, seq] with seq >= 2, got "
                            f"{tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[0] < batch:
        raise TrainingError(f"{tokens.shape[0]} training blocks are fewer than one batch of "
                            f"{batch}; give more text or a smaller batch")


def check_run_folder(run: Path, overwrite: bool = False) -> None:
    """Refuse (`OutputError`) a `run` folder that holds files but not a training run,
    unless `overwrite`: training writes config.json, metrics.jsonl, curves.png,
    checkpoints/ and final/ into it."""
    if overwrite or not run.exists():
        return
    if not run.is_dir():
        raise OutputError(f"{run} is a file, not a folder for a training run; choose "
                          "another path")
    held = sorted(p.name for p in run.iterdir() if p.name != S.LOCK)
    if not held or _is_run(run):
        return
    raise OutputError(
        f"{run} is a folder holding {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}, "
        "not a training run; training would write config.json, metrics.jsonl, curves.png, "
        "checkpoints/ and final/ into it, replacing files of those names. Choose a new or "
        "empty folder, or pass overwrite=True (--overwrite) to write there anyway")


def _is_run(run: Path) -> bool:
    if (run / "checkpoints").is_dir() or (run / "metrics.jsonl").is_file():
        return True
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and {"steps", "sampler", "samples"} <= set(config)


_LABELS = {"full": "full", "mlp50": "MLP 50 %, all heads"}


def plot_run(run: str | Path) -> Path | None:
    """`RUN/curves.png`: training loss, and held-out perplexity of each tracked setting
    against tokens (the paper's Figure 11)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    rows = read_metrics(run)
    vals = [r for r in rows if "val" in r]
    rows = [r for r in rows if "loss_full" in r]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["tokens"] for r in rows], [r["loss_full"] for r in rows], label="full", lw=1)
    kd = json.loads((Path(run) / "config.json").read_text()).get("loss", "lm") != "lm"
    a.plot([r["tokens"] for r in rows], [sum(r["loss_sub"]) / max(1, len(r["loss_sub"]))
                                         for r in rows], lw=1,
           label="sampled sub-networks" + (" (their LM/KD loss)" if kd else ""))
    a.set_xlabel("training tokens")
    a.set_ylabel("training loss")
    a.set_title("training loss")
    a.legend()
    share = vals[0].get("val_params", {}) if vals else {}
    for name in (vals[0]["val"] if vals else {}):
        label = (f"uniform, nearest {name[6:]} % params" if name.startswith("params")
                 else _LABELS.get(name, name))
        label += f" ({share[name]:.0%})" if name in share else ""
        b.plot([r["tokens"] for r in vals], [math.exp(r["val"][name]) for r in vals],
               marker="o", label=label)
    b.set_yscale("log")
    b.set_xlabel("training tokens")
    b.set_ylabel("held-out perplexity (log scale)")
    b.set_title("held-out perplexity by sub-network")
    if vals:
        b.legend()
    fig.tight_layout()
    out = savefig_atomic(fig, Path(run) / "curves.png", dpi=110)
    plt.close(fig)
    return out
