"""Rank: measure neurons and heads over calibration data, then score them (Eq. 3, 4).

Observers sit at the input of each block's output projection (down / o) and sum, per
channel over the calibration tokens: |h|, h, h^2, and on request the first-order Taylor
term |h * dL/dh| (a backward pass per batch) and each head's output norm after the
projection. `passes/scores.py` turns these sums into importance scores (a registry:
"activation" is Eq. 4 on the neuron's output, |act(gate) * up| for gated MLPs;
"contribution" scores a head by ||W_o[:, head] a_head||; "output_l1" is Eq. 3 read
literally; docs/RESULTS.md has the measured comparisons on SmolLM2). The signed means are
what per-width bias compensation (`passes/compensate.py`) adds back for removed units.

Requires: blocks from analyze(); the graph not yet elasticized.
Ensures: the graph is unchanged (observers are removed again).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from operator import attrgetter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx
from tqdm.auto import tqdm

from ..analyze import Analysis, Block
from ..elastic import layout as L
from ..errors import CalibrationDataError, MemoryBudgetError
from ..trace import check_token_ids
from . import scores as S
from .scores import Stats

log = logging.getLogger(__name__)

OBSERVER_PREFIX = "flextron_observer_"
# Calibration progress (resume=): sums up to SNAPSHOT_BYTES are copied after every batch,
# so a crash saves the last whole batch; larger ones (a Gram matrix per block: 0.65 GB for
# SmolLM2) only when a checkpoint is written, at most one interval behind on a crash. The
# interval is CHECKPOINT_SECONDS, longer for large sums (SECONDS_PER_GB) or slow writes.
SNAPSHOT_BYTES = 64 * 2**20
CHECKPOINT_SECONDS = 30.0
SECONDS_PER_GB = 120.0


class _Observer(torch.nn.Module):
    def __init__(self, layout, weight_getter, in_axis: int, measures: set[str]):
        super().__init__()
        self.weight_getter, self.in_axis, self.measures = weight_getter, in_axis, measures
        n = layout[2]
        self.sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("abs", "sum", "sq")}
        if "taylor" in measures:
            self.sums["taylor"] = torch.zeros(n, dtype=torch.float64)
        if "gram" in measures:
            self.sums["gram"] = torch.zeros(n, n, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.heads: dict[str, torch.Tensor] = {}  # head-level sums (attention)
        self.head_of: torch.Tensor | None = None  # head index of every input channel
        self.shape = (1, 1)  # (KV groups, query heads per group)
        self._cols: list[torch.Tensor] | None = None
        self._zero: torch.Tensor | None = None

    def set_heads(self, head_of: torch.Tensor, shape: tuple[int, int]) -> None:
        self.head_of, self.shape = head_of, shape
        for k in ("contribution", "taylor"):
            if k in self.measures:
                self.heads[k] = torch.zeros(shape[0] * shape[1], dtype=torch.float64)

    def forward(self, x):
        if self.count.device != x.device:  # sums live where the model runs (e.g. CUDA)
            self.to_device(x.device)
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sums["abs"] += flat.abs().sum(0).double()
        self.sums["sum"] += flat.sum(0).double()
        self.sums["sq"] += flat.pow(2).sum(0).double()
        self.count += flat.shape[0]
        if "gram" in self.sums:  # float32 products per batch, summed in float64
            self.sums["gram"] += (flat.t() @ flat).double()
        if "contribution" in self.heads:
            w = self.weight_getter().detach().float()
            w = w if self.in_axis == 1 else w.t()  # [out, in]
            scores = torch.zeros_like(self.heads["contribution"])
            for h, cols in enumerate(self._columns(x.device)):
                y = flat[:, cols] @ w[:, cols].t()
                scores[h] = y.norm(dim=1).sum().double()
            self.heads["contribution"] += scores
        if "taylor" in self.measures and torch.is_grad_enabled():
            if self._zero is None or self._zero.device != x.device:
                self._zero = torch.zeros((), device=x.device, requires_grad=True)
            y = x + self._zero  # the same values; a leaf behind it lets autograd reach here
            y.register_hook(functools.partial(self._taylor, flat))
            return y
        return x

    def _taylor(self, flat: torch.Tensor, grad: torch.Tensor) -> None:
        prod = flat * grad.detach().reshape(flat.shape).float()
        self.sums["taylor"] += prod.abs().sum(0).double()
        if "taylor" in self.heads:
            per_head = torch.zeros(prod.shape[0], self.heads["taylor"].numel(),
                                   device=prod.device).index_add_(
                1, self.head_of.to(prod.device), prod)
            self.heads["taylor"] += per_head.abs().sum(0).double()

    def to_device(self, device) -> None:
        self.sums = {k: v.to(device) for k, v in self.sums.items()}
        self.heads = {k: v.to(device) for k, v in self.heads.items()}
        self.count = self.count.to(device)

    def stats(self) -> Stats:
        self.to_device("cpu")
        return Stats(int(self.count), self.sums["abs"], self.sums["sum"], self.sums["sq"],
                     self.sums.get("taylor"), dict(self.heads), self.head_of, self.shape,
                     self.sums.get("gram"))

    def _columns(self, device) -> list[torch.Tensor]:
        """Input channels of each head, found once on the CPU and kept on `device`."""
        n = self.shape[0] * self.shape[1]
        if self._cols is None or self._cols[0].device != torch.device(device):
            self._cols = [(self.head_of == h).nonzero().squeeze(1).to(device)
                          for h in range(n)]
        return self._cols


def _check(batch: torch.Tensor, sample: tuple) -> None:
    if not isinstance(batch, torch.Tensor):
        raise CalibrationDataError(
            f"calibration batches must be tensors shaped like the sample input "
            f"{tuple(sample[0].shape)}, got {type(batch).__name__}")
    if batch.dim() != sample[0].dim() or batch.dtype != sample[0].dtype:
        raise CalibrationDataError(
            f"calibration batch has shape {tuple(batch.shape)} and dtype {batch.dtype}; "
            f"the model was traced with {sample[0].dim()}-d inputs of dtype "
            f"{sample[0].dtype} ([batch, seq] token ids for language models)")
    if batch.is_floating_point() and not torch.isfinite(batch).all():
        bad = (~torch.isfinite(batch)).nonzero()[0].tolist()
        raise CalibrationDataError(
            f"calibration data contains NaN or Inf (first at index {bad}); clean the data "
            "before calibrating")


def rank(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block], calibration,
         *, head_score: str = "contribution", mlp_score: str = "activation",
         batch_size: int = 8, sample_inputs: tuple = (), progress: bool = True,
         resume: str | Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Importance of every neuron and head, per block name.

    `calibration` is a tensor [n, seq] (split into batches of `batch_size`) or an iterable
    of input tensors. Returns {block: {"neurons": [hidden]} or {"heads": [groups, per_group]}}.
    `mlp_score` and `head_score` name scores of `passes/scores.py`. With `resume`, running
    sums are saved to that file every 30 s or more (`checkpoint_interval`: longer for
    large sums) and a rerun on the same data continues after the last saved batch.
    `measure` + `score_blocks` do the same in two steps.
    """
    S.check(mlp_score, "mlp")
    S.check(head_score, "attention")
    stats = measure(gm, analysis, blocks, calibration, measures=S.needs(mlp_score, head_score),
                    batch_size=batch_size, sample_inputs=sample_inputs, progress=progress,
                    resume=resume)
    return score_blocks(gm, blocks, stats, mlp_score=mlp_score, head_score=head_score)


def score_blocks(gm: fx.GraphModule, blocks: list[Block], stats: dict[str, Stats], *,
                 mlp_score: str = "activation", head_score: str = "contribution"
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """Scores (as `rank` returns them) from measured `stats`, weights in their stored order."""
    scores = {}
    for block in blocks:
        out = block.out_proj
        w = attrgetter(out.weight)(gm).detach()
        w = w if out.axis == 1 else w.t()  # [out, in]: columns are the scored channels
        if block.kind == "mlp":
            scores[block.name] = {"neurons": S.evaluate(mlp_score, "mlp", stats[block.name], w)}
        else:
            scores[block.name] = {"heads": S.evaluate(head_score, "attention",
                                                      stats[block.name], w)}
    return scores


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the loss whose gradient the Taylor score uses."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or ids.dim() != 2 \
            or ids.is_floating_point() or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise CalibrationDataError(
            "the 'taylor' score needs a language model (token ids [batch, seq] in, logits "
            "[batch, seq, vocab] out) for its next-token loss; choose another score "
            f"(scores: {list(S.SCORES)})")
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def measure(gm: fx.GraphModule, analysis: Analysis, blocks: list[Block], calibration,
            *, measures=("abs",), batch_size: int = 8, sample_inputs: tuple = (),
            progress: bool = True, resume: str | Path | None = None,
            gram_kinds: tuple[str, ...] = ("mlp", "attention")) -> dict[str, Stats]:
    """Sums over the calibration tokens at every block's output-projection input.

    `measures` names what to take besides |h|, h and h^2 (always taken): "contribution"
    (head output norms after the projection), "taylor" (|h * dL/dh|, one backward pass
    of the next-token loss per batch) and "gram" (the sum of h h^T, for least-squares
    compensation; taken for the blocks of `gram_kinds` only). Returns {block name:
    `scores.Stats`}.
    """
    measures = set(measures)
    unknown = measures - set(S.MEASURES)
    if unknown:
        raise ValueError(f"unknown measures {sorted(unknown)}; allowed: {list(S.MEASURES)}")
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise CalibrationDataError("calibration tensor is empty; pass [n, seq] inputs")
        batches = list(calibration.split(batch_size))
    else:
        batches = list(calibration)
        if not batches:
            raise CalibrationDataError("calibration data is empty")
    for k, b in enumerate(batches):
        _check(b, sample_inputs)
        check_token_ids(gm, b, f"calibration batch {k}", CalibrationDataError)

    device = next((p.device for p in gm.parameters()), None)
    gram_blocks = {b.name for b in blocks if b.kind in gram_kinds} if "gram" in measures \
        else set()
    if gram_blocks:
        _check_gram_memory(analysis, [b for b in blocks if b.name in gram_blocks], device,
                           copies=2 if resume else 1)
    observers: dict[str, _Observer] = {}
    graph = gm.graph
    A = analysis.atoms
    for k, block in enumerate(blocks):
        out = block.out_proj
        lay = L.sized(A, out.layout)
        getter = functools.partial(attrgetter(out.weight), gm)
        obs = _Observer(lay, getter, out.axis,
                        measures if block.name in gram_blocks else measures - {"gram"})
        if block.kind == "attention":
            g, r = block.classes.get("groups"), block.classes.get("per_group")
            G = A.size[g] if g is not None else 1
            R = A.size[r] if r is not None else 1
            gi = L.coords(lay, g).clamp(min=0) if g is not None else 0
            ri = L.coords(lay, r).clamp(min=0) if r is not None else 0
            obs.set_heads((gi * R + ri) * torch.ones(lay[2], dtype=torch.long), (G, R))
        name = f"{OBSERVER_PREFIX}{k}"
        gm.add_submodule(name, obs)
        x = out.node.args[1] if out.node.target == torch.ops.aten.addmm.default \
            else out.node.args[0]
        with graph.inserting_before(out.node):
            seen = graph.call_module(name, (x,))
        out.node.replace_input_with(x, seen)
        observers[block.name] = obs
    gm.recompile()
    what = ",".join(sorted(measures))
    if gram_blocks:  # which blocks hold a Gram matrix is part of what a checkpoint holds
        what += " gram:" + ",".join(sorted(gram_blocks))
    fingerprint = _fingerprint(batches, what)
    done = _restore(resume, observers, fingerprint) if resume else 0
    taylor = "taylor" in measures
    try:
        last = time.monotonic()
        with torch.enable_grad() if taylor else torch.no_grad():
            bar = tqdm(batches, desc="calibrating", unit="batch", disable=not progress,
                       initial=done, total=len(batches))
            finished, good, good_at, saved_at = done, None, done, done
            size = _nbytes(observers)
            interval = checkpoint_interval(size)
            try:
                for b in batches[done:]:
                    b = b.to(device) if device is not None else b
                    out = gm(b)
                    if taylor:
                        leaves = [o._zero for o in observers.values() if o._zero is not None]
                        torch.autograd.grad(lm_loss(out, b), leaves, allow_unused=True)
                    del out
                    finished += 1
                    bar.update(1)
                    if not resume:
                        continue
                    due = time.monotonic() - last > interval or finished == len(batches)
                    if due or size <= SNAPSHOT_BYTES:  # sums after whole batches only
                        good, good_at = _sums(observers), finished
                    if due:
                        t0 = time.monotonic()
                        _checkpoint(resume, good, fingerprint, finished)
                        last, saved_at = time.monotonic(), finished
                        interval = checkpoint_interval(size, last - t0)
            except BaseException:  # Ctrl-C or a crash: keep what was measured
                if resume and good_at > saved_at:
                    _checkpoint(resume, good, fingerprint, good_at)
                raise
            finally:
                bar.close()
    finally:
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        for name, _ in list(gm.named_children()):
            if name.startswith(OBSERVER_PREFIX):
                delattr(gm, name)
        gm.recompile()
    return {name: obs.stats() for name, obs in observers.items()}


def _check_gram_memory(analysis: Analysis, blocks: list[Block], device, copies: int) -> None:
    """MemoryBudgetError, before calibrating, if the blocks' float64 Gram matrices (one
    [in, in] per output projection; `copies` of them, two when progress is checkpointed)
    would take more than half the memory where the sums live."""
    sizes = [L.sized(analysis.atoms, b.out_proj.layout)[2] for b in blocks]
    need = copies * 8 * sum(n * n for n in sizes)
    if device is not None and device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "in this machine"
    if need > have / 2:
        mlp = copies * 8 * sum(n * n for n, b in zip(sizes, blocks) if b.kind == "mlp")
        raise MemoryBudgetError(
            f"least-squares compensation (compensation_rank > 0) sums an [in, in] float64 "
            f"Gram matrix per block while calibrating: {need / 2**30:.1f} GiB for these "
            f"{len(blocks)} blocks (widest input {max(sizes)}), more than half of the "
            f"{have / 2**30:.1f} GiB {where}. Pass FlextronConfig(compensation_rank=0) "
            f"(`flextron convert --compensation-rank 0`) for the mean-bias compensation, or "
            f"compensate='attention' to fit the attention blocks only "
            f"({(need - mlp) / 2**30:.1f} GiB).")


def _fingerprint(batches, what: str) -> str:
    h = hashlib.sha256(what.encode())
    for b in batches:
        h.update(f"{tuple(b.shape)} {b.dtype}".encode())
        # raw bytes: numpy has no bfloat16, so .numpy() would fail for bf16 batches
        h.update(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def checkpoint_interval(nbytes: int, write_seconds: float = 0.0) -> float:
    """Seconds between calibration checkpoints: CHECKPOINT_SECONDS, longer for large sums
    (SECONDS_PER_GB) or when a write took long (at most ~5 % of the time spent writing)."""
    return max(CHECKPOINT_SECONDS, SECONDS_PER_GB * nbytes / 2**30, 20 * write_seconds)


def _nbytes(observers) -> int:
    return sum(t.numel() * t.element_size() for obs in observers.values()
               for t in (obs.count, *obs.sums.values(), *obs.heads.values()))


def _sums(observers) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, obs in observers.items():
        tensors[f"{name}/count"] = obs.count.detach().cpu().clone()
        for k, v in obs.sums.items():
            tensors[f"{name}/{k}"] = v.detach().cpu().clone()
        for k, v in obs.heads.items():
            tensors[f"{name}/heads_{k}"] = v.detach().cpu().clone()
    return tensors


def _checkpoint(path, tensors: dict[str, torch.Tensor], fingerprint: str, done: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "done": str(done)})
    os.replace(tmp, path)


def _restore(path, observers, fingerprint: str) -> int:
    path = Path(path)
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            log.warning("ignoring %s: it was written for other calibration data", path)
            return 0
        for name, obs in observers.items():
            obs.count.copy_(f.get_tensor(f"{name}/count"))
            for k, v in obs.sums.items():
                v.copy_(f.get_tensor(f"{name}/{k}"))
            for k, v in obs.heads.items():
                v.copy_(f.get_tensor(f"{name}/heads_{k}"))
    done = int(meta.get("done", 0))
    log.warning("resuming calibration from %s after %d batches", path, done)
    return done


