"""Rank: accumulate per-neuron and per-head importance over calibration data (Eq. 3, 4).

What is measured, at the input of each block's out-projection (down / o):

* MLP neurons (Eq. 4): sum over tokens of |h_i|, where h is the down projection's
  input. For a gated MLP that is |act(gate_i) * up_i|, the neuron's actual output before
  mixing. The paper's literal Eq. 4 scores the pre-activation of W1's row; for gated MLPs
  the gate and up paths together decide what a neuron contributes, and measured on
  SmolLM2 (DESIGN.md) this activation ranks best among activation and magnitude scores.
* Attention heads: "contribution" (default) sums over tokens the L2 norm of each head's
  output after the output projection, ||W_o[:, head] a_head||; "output_l1" is Eq. 3
  literally, the L1 norm of the head output a_head. The raw head output ignores how
  much W_o amplifies or cancels a head; docs/RESULTS-sorting.md has the measured
  comparison on SmolLM2.

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
from ..errors import CalibrationDataError
from ..trace import check_token_ids

log = logging.getLogger(__name__)

OBSERVER_PREFIX = "flextron_observer_"


class _Observer(torch.nn.Module):
    def __init__(self, layout, weight_getter, in_axis: int, score: str):
        super().__init__()
        self.weight_getter, self.in_axis, self.score = weight_getter, in_axis, score
        self.channel = torch.zeros(layout[2], dtype=torch.float64)
        self.heads: torch.Tensor | None = None  # [num heads] for "contribution"
        self.head_of: torch.Tensor | None = None  # head index of every input channel
        self.shape = (1, 1)  # (KV groups, query heads per group)
        self._cols: list[torch.Tensor] | None = None

    def forward(self, x):
        if self.channel.device != x.device:  # sums live where the model runs (e.g. CUDA)
            self.to_device(x.device)
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.channel += flat.abs().sum(0).double()
        if self.score == "contribution" and self.head_of is not None:
            w = self.weight_getter().detach().float()
            w = w if self.in_axis == 1 else w.t()  # [out, in]
            scores = torch.zeros(self.heads.shape, dtype=torch.float64, device=x.device)
            for h, cols in enumerate(self._columns(x.device)):
                y = flat[:, cols] @ w[:, cols].t()
                scores[h] = y.norm(dim=1).sum().double()
            self.heads += scores
        return x

    def to_device(self, device) -> None:
        self.channel = self.channel.to(device)
        if self.heads is not None:
            self.heads = self.heads.to(device)

    def _columns(self, device) -> list[torch.Tensor]:
        """Input channels of each head, found once on the CPU and kept on `device`."""
        if self._cols is None or self._cols[0].device != torch.device(device):
            self._cols = [(self.head_of == h).nonzero().squeeze(1).to(device)
                          for h in range(self.heads.numel())]
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
         *, head_score: str = "contribution", batch_size: int = 8,
         sample_inputs: tuple = (), progress: bool = True,
         resume: str | Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Importance of every neuron and head, per block name.

    `calibration` is a tensor [n, seq] (split into batches of `batch_size`) or an iterable
    of input tensors. Returns {block: {"neurons": [hidden]} or {"heads": [groups, per_group]}}.
    With `resume`, running sums are saved to that file every ~30 s and a rerun on the same
    data continues after the last saved batch.
    """
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

    observers: dict[str, _Observer] = {}
    graph = gm.graph
    A = analysis.atoms
    for k, block in enumerate(blocks):
        out = block.out_proj
        lay = L.sized(A, out.layout)
        getter = functools.partial(attrgetter(out.weight), gm)
        obs = _Observer(lay, getter, out.axis, head_score if block.kind == "attention" else "")
        if block.kind == "attention":
            g, r = block.classes.get("groups"), block.classes.get("per_group")
            G = A.size[g] if g is not None else 1
            R = A.size[r] if r is not None else 1
            gi = L.coords(lay, g).clamp(min=0) if g is not None else 0
            ri = L.coords(lay, r).clamp(min=0) if r is not None else 0
            obs.head_of = (gi * R + ri) * torch.ones(lay[2], dtype=torch.long)
            obs.heads = torch.zeros(G * R, dtype=torch.float64)
            obs.shape = (G, R)
        name = f"{OBSERVER_PREFIX}{k}"
        gm.add_submodule(name, obs)
        x = out.node.args[1] if out.node.target == torch.ops.aten.addmm.default \
            else out.node.args[0]
        with graph.inserting_before(out.node):
            seen = graph.call_module(name, (x,))
        out.node.replace_input_with(x, seen)
        observers[block.name] = obs
    gm.recompile()
    device = next((p.device for p in gm.parameters()), None)
    fingerprint = _fingerprint(batches, head_score)
    done = _restore(resume, observers, fingerprint) if resume else 0
    try:
        last = time.monotonic()
        with torch.no_grad():
            bar = tqdm(batches, desc="calibrating", unit="batch", disable=not progress,
                       initial=done, total=len(batches))
            finished, good = done, _sums(observers) if resume else None
            try:
                for b in batches[done:]:
                    gm(b.to(device) if device is not None else b)
                    finished += 1
                    bar.update(1)
                    if resume:
                        good = _sums(observers)  # sums after whole batches only
                        if time.monotonic() - last > 30 or finished == len(batches):
                            _checkpoint(resume, good, fingerprint, finished)
                            last = time.monotonic()
            except BaseException:  # Ctrl-C or a crash: keep what was measured
                if resume and finished > done:
                    _checkpoint(resume, good, fingerprint, finished)
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

    scores: dict[str, dict[str, torch.Tensor]] = {}
    for block in blocks:
        obs = observers[block.name]
        obs.to_device("cpu")  # orders are index lists; permute moves them to the weights
        if block.kind == "mlp":
            scores[block.name] = {"neurons": obs.channel.float()}
            continue
        if head_score == "contribution":
            heads = obs.heads
        else:
            heads = torch.zeros(obs.heads.numel(), dtype=torch.float64)
            heads.index_add_(0, obs.head_of, obs.channel)
        scores[block.name] = {"heads": heads.reshape(obs.shape).float()}
    return scores


def _fingerprint(batches, head_score: str) -> str:
    h = hashlib.sha256(head_score.encode())
    for b in batches:
        h.update(f"{tuple(b.shape)} {b.dtype}".encode())
        # raw bytes: numpy has no bfloat16, so .numpy() would fail for bf16 batches
        h.update(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _sums(observers) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, obs in observers.items():
        tensors[f"{name}/channel"] = obs.channel.detach().cpu().clone()
        if obs.heads is not None:
            tensors[f"{name}/heads"] = obs.heads.detach().cpu().clone()
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
            obs.channel.copy_(f.get_tensor(f"{name}/channel"))
            if obs.heads is not None:
                obs.heads.copy_(f.get_tensor(f"{name}/heads"))
    done = int(meta.get("done", 0))
    log.warning("resuming calibration from %s after %d batches", path, done)
    return done


