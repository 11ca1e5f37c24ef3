"""An ONNX decoder with the dynamic routers inside: every token at the widths its routers
choose, with a key/value cache, in onnxruntime.

`to_routed_onnx(em, path)` exports `routed_hf(em)` for one token per step:

    inputs   input_ids [1, 1], budget [] (float32, what the routers read: a fraction of
             the full model's cost, or with a budget calibration, which the metadata
             `flextron_budget_calibration` holds, `BudgetSource.router_input` of it),
             past_key_i / past_value_i [1, kv_i, past, head_dim]
    outputs  logits [1, 1, vocab], present_key_i / present_value_i
             [1, kv_i, past + 1, head_dim], widths [ops] (int64: the candidate index each
             op's router chose for this token, in `em.ops` order, which the file's
             metadata `flextron_ops` lists)

Inside, each block's router reads the block's input and the budget, and its argmax
picks the token's candidate. A block's units (MLP neurons, query heads) are split into
bands between consecutive candidates, each band's weights their own initializers: the
smallest candidate's band always runs, each wider band under an `If` that runs it when the
token's candidate reaches it, and the output projection adds the bands' parts. So a
narrower token runs fewer and smaller matmuls, nothing is masked, and no weight is copied
at run time (onnxruntime has no views: slicing a weight in the graph, as the elastic ONNX
file does, copies it on every call). The cache holds every head's keys and values, as in
`routed_hf`. One file serves every budget. One token of one sequence per step:
`OrtRoutedDecoder` feeds a prompt token by token and the rows of a batch one after
another, each with its own cache, which gives each token what `routed_hf` gives it (a
token's widths and output depend only on it and the tokens before it). Before the file is
written, onnxruntime is checked against the same step in PyTorch token by token, at two
budgets: logits to `tol` of their scale and the routers' choices exactly.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._atomic import write_atomic
from ..elastic.compensation import LowRankDelta
from ..elastic.model import ElasticModel
from ..errors import ExportError, OutputError, UnsupportedModelError
from .decoder_onnx import _rename, _Step, cache_shapes
from .onnx import compare, export_program
from .routed_hf import RoutedAttention, RoutedMLP, _Elastic, plan_indices, routed_hf

OPS_KEY = "flextron_ops"  # metadata: the op names of the `widths` output, in order
CALIBRATION_KEY = "flextron_budget_calibration"  # metadata: the routers' budget calibration


class _Token:
    """What one step shares with its blocks: the budget input and the choices made."""

    def __init__(self):
        self.budget: torch.Tensor | None = None
        self.chosen: dict[str, torch.Tensor] = {}

    def choose(self, elastic: _Elastic, h: torch.Tensor) -> torch.Tensor:
        """The candidate index (a 0-d int64 tensor) the block's router picks for the one
        token `h`; the same arithmetic as the router's own inference path."""
        r = elastic.router
        logits = r.logits_after(self.budget * r.w_budget + r.b_budget, h.reshape(1, 1, -1))
        index = logits.reshape(-1).argmax()
        self.chosen[r.block] = index
        return index

    @staticmethod
    def compensate(elastic: _Elastic, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return y if elastic.comp is None else elastic.comp(y, index.reshape(1, 1))


def _bands(sizes: list[int]) -> list[tuple[int, int]]:
    """[(start, length)] of the bands between consecutive candidates' kept sizes."""
    edges = [0, *sizes]
    return [(lo, hi - lo) for lo, hi in itertools.pairwise(edges)]


def _cond(index: torch.Tensor, band: int, add, operands: tuple) -> torch.Tensor:
    """`add(*operands)` (the running sum plus band `band`'s part) when the token's candidate
    `index` uses that band, else the running sum `operands[0]`: an `If` in ONNX, so a
    narrower token skips the wider bands' matmuls and no weight is ever copied."""
    return torch.cond(index >= band, add, lambda y, *rest: y.clone(), operands)


class _Correction(nn.Module):
    """A block's low-rank compensation (passes/compensate.py) in the routed step: at the
    token's candidate k below the full width, y + U_k V_k^T a, where `a` holds the unit
    outputs of the bands the token ran (zeros for the others), in band order; `orders[k]`
    puts V_k's rows (kept units in the slice's order) in that order (None: the same)."""

    def __init__(self, comp, orders: list):
        super().__init__()
        self.comp, self.orders = comp, orders

    def forward(self, y: torch.Tensor, a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        for k, order in enumerate(self.orders):
            u, v = self.comp.u[k], self.comp.v[k]
            if order is not None:
                v = v.index_select(0, order)
            y = torch.cond(index == k,
                           lambda y, a, u=u, v=v: y + (a[..., :v.shape[0]] @ v) @ u.t(),
                           lambda y, a: y.clone(), (y, a))
        return y

    @staticmethod
    def of(elastic: _Elastic, kept: list, bands: list) -> _Correction | None:
        """The correction of `elastic`'s block, or None without a rank. `kept[k]`: the
        units of candidate k in the slice's order; `bands[b]`: band b's units."""
        comp = elastic.comp
        if comp is None or not comp.rank:
            return None
        if any(m.axis != 1 for m in elastic.region.ref.modules()
               if isinstance(m, LowRankDelta)):
            raise UnsupportedModelError(f"{comp.block}: a transposed output projection")
        orders, ran = [], []
        for k in range(len(kept) - 1):
            ran = [*ran, *bands[k].tolist()]
            where = {int(c): j for j, c in enumerate(kept[k])}
            order = torch.tensor([where[c] for c in ran])
            orders.append(None if torch.equal(order, torch.arange(len(order))) else order)
        return _Correction(comp, orders)


def _with_units(index: torch.Tensor, band: int, run, operands: tuple, units: int) -> tuple:
    """`_cond` for a block with a correction: (the running sum, band `band`'s unit
    outputs), zeros for the units when the token does not reach the band."""
    y = operands[0]
    zeros = y.new_zeros(*y.shape[:-1], units)  # made outside: both branches, one shape

    def dense(zeros, *operands):  # both branches must give the same strides
        y, out = run(*operands)
        return y, out.clone(memory_format=torch.contiguous_format)

    return torch.cond(index >= band, dense,
                      lambda zeros, y, *rest: (y.clone(), zeros.clone()), (zeros, *operands))


class _TokenMLP(nn.Module):
    """A routed MLP for one token, in bands: the neurons between consecutive candidates
    are one band, the smallest candidate's always runs, each wider band runs when the
    router's candidate reaches it, and the down projection adds the bands' parts."""

    def __init__(self, routed: RoutedMLP, token: _Token):
        super().__init__()
        from ..passes.lower import match_mlp

        self.elastic, self.token = routed.elastic, token
        region = self.elastic.region
        spec = match_mlp(region)
        if isinstance(spec, str):
            raise UnsupportedModelError(f"{region.block}: {spec}; the routed ONNX decoder "
                                        "splits recognised MLPs (prefix slices) into bands")
        self.spec, self.bands = spec, _bands(list(region.candidates))
        self.correction = _Correction.of(
            self.elastic, [torch.arange(c) for c in region.candidates],
            [torch.arange(lo, lo + n) for lo, n in self.bands])

    def _band(self, x: torch.Tensor, band: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(band `band`'s part of the down projection, its neurons' outputs)."""
        from ..codegen.mlp import activation

        lo, n = self.bands[band]
        gate, up, down, b_gate, b_up, _ = self.spec.operands(self.elastic.params)
        a = F.linear(x, up.narrow(0, lo, n), None if b_up is None else b_up.narrow(0, lo, n))
        if gate is not None:
            g = F.linear(x, gate.narrow(0, lo, n),
                         None if b_gate is None else b_gate.narrow(0, lo, n))
            a = activation(self.spec.act, g) * a
        else:
            a = activation(self.spec.act, a)
        return F.linear(a, down.narrow(1, lo, n)), a

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        index = self.token.choose(self.elastic, x)
        y, a = self._band(x, 0)
        units = [a]
        for band in range(1, len(self.bands)):
            if self.correction is None:
                y = _cond(index, band, lambda y, x, band=band: y + self._band(x, band)[0],
                          (y, x))
                continue

            def run(y, x, band=band):
                part, a = self._band(x, band)
                return y + part, a

            y, a = _with_units(index, band, run, (y, x), self.bands[band][1])
            units.append(a)
        if self.correction is not None:
            y = self.correction(y, torch.cat(units, -1), index)
        b_down = self.spec.operands(self.elastic.params)[-1]
        return self.token.compensate(self.elastic, y if b_down is None else y + b_down, index)


class _TokenAttention(nn.Module):
    """A routed attention for one token, in bands of query heads: the heads a candidate
    keeps beyond the next smaller one are a band, each over its own key/value heads, and
    the output projection adds the bands' parts (heads are independent, so this is the
    attention of all the token's heads). Keys and values of every head go to the cache."""

    def __init__(self, routed: RoutedAttention, o_slice, token: _Token):
        super().__init__()
        self.routed, self.elastic, self.token = routed, routed.elastic, token
        attn, region, hd = routed.attn, routed.elastic.region, routed.head_dim
        if routed.fused or not isinstance(getattr(attn, "o_proj", None), nn.Linear):
            raise UnsupportedModelError(
                f"{region.block}: the routed ONNX decoder slices separate q/k/v projections "
                "and an o_proj (Llama-style attention); fused ones (GPT-2, GPT-NeoX) are not done")
        full_q, full_o = attn.q_proj.weight.shape[0], attn.o_proj.weight.shape[1]
        before = torch.zeros(0, dtype=torch.long)
        kept = []  # each candidate's output-projection columns, in the slice's order
        # per band: q rows (their first and count, whether a range), its key/value heads
        # [start, stop), query heads per key/value head
        self.bands = []
        for c in region.candidates:
            rows = plan_indices(routed.q_slice.plan(c), full_q)
            if not torch.equal(rows, plan_indices(o_slice.plan(c), full_o)):
                raise UnsupportedModelError(f"{region.block}: its query rows and output "
                                            "columns differ")
            new = rows[~torch.isin(rows, before)]
            kv = new.reshape(-1, hd)[:, 0] // hd // routed.per_kv
            start, stop = int(kv.min()), int(kv.max()) + 1
            per = len(kv) // (stop - start)
            if not torch.equal(kv, torch.arange(start, stop).repeat_interleave(per)):
                raise UnsupportedModelError(f"{region.block}: the query heads kept at {c} "
                                            "do not read a range of key/value heads in turn")
            lo = int(new[0])
            contiguous = torch.equal(new, torch.arange(lo, lo + len(new)))
            self.bands.append((new, lo, len(new), contiguous, start, stop, per))
            before = rows
            kept.append(rows)
        self.correction = _Correction.of(self.elastic, kept, [b[0] for b in self.bands])

    def _rows(self, band: int):
        """(q_proj weight rows, q bias rows, o_proj weight columns) of a band: views when
        the band's rows are a range, copies made at export otherwise."""
        attn = self.routed.attn
        rows, lo, n, contiguous = self.bands[band][:4]

        def pick(w, axis):
            if w is None:
                return None
            return w.narrow(axis, lo, n) if contiguous else w.index_select(axis,
                                                                           rows.to(w.device))

        return (pick(attn.q_proj.weight, 0), pick(attn.q_proj.bias, 0),
                pick(attn.o_proj.weight, 1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: int):
        """(band `band`'s part of the output projection, its heads' outputs [b, s, units]),
        from its queries [b, heads, s, hd]."""
        start, stop, per = self.bands[band][4:]
        b, s, length, hd = q.shape[0], q.shape[2], k.shape[2], q.shape[3]

        def share(t):  # the band's key/value heads, each repeated for its query heads
            t = t.narrow(1, start, stop - start)[:, :, None]
            return t.expand(b, stop - start, per, length, hd).reshape(b, -1, length, hd)

        out = F.scaled_dot_product_attention(q, share(k), share(v),
                                             scale=self.routed.attn.scaling)
        out = out.transpose(1, 2).reshape(b, s, self.bands[band][2])  # a static width
        return F.linear(out, self._rows(band)[2]), out

    def _band(self, y, x, k, v, cos, sin, band: int):
        attn, hd = self.routed.attn, self.routed.head_dim
        weight, bias, _ = self._rows(band)
        q = F.linear(x, weight, bias).view(x.shape[0], x.shape[1], -1, hd)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        q = self.routed.rotary(q, q, cos, sin)[0]
        part, out = self._attend(q, k, v, band)
        return y + part, out

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        index = self.token.choose(self.elastic, hidden_states)
        weight, bias, _ = self._rows(0)
        q, k, v = self.routed.project(hidden_states, weight, bias, position_embeddings, cache)
        y, out = self._attend(q, k, v, 0)
        units = [out]
        cos, sin = position_embeddings
        operands = (hidden_states, k, v, cos, sin)
        for band in range(1, len(self.bands)):
            if self.correction is None:
                y = _cond(index, band, lambda *a, band=band: self._band(*a, band)[0],
                          (y, *operands))
                continue
            y, out = _with_units(index, band, lambda *a, band=band: self._band(*a, band),
                                 (y, *operands), self.bands[band][2])
            units.append(out)
        if self.correction is not None:
            y = self.correction(y, torch.cat(units, -1), index)
        bias = self.routed.attn.o_proj.bias
        return self.token.compensate(self.elastic, y if bias is None else y + bias, index), None


class _RoutedStep(_Step):
    """forward(input_ids, budget, past) -> (logits, *presents, widths)."""

    def __init__(self, model: nn.Module, token: _Token, ops: list[str], layers: int):
        super().__init__(model, layers)
        self.token, self.ops = token, ops

    def forward(self, input_ids, budget, past):
        self.token.budget, self.token.chosen = budget, {}
        logits, *presents = super().forward(input_ids, past)
        return (logits, *presents, torch.stack([self.token.chosen[n] for n in self.ops]))


def routed_step(em: ElasticModel) -> tuple[nn.Module, list[tuple[int, int]]]:
    """(the one-token step of `routed_hf(em)` that `to_routed_onnx` exports, the (key/value
    heads, head size) of each layer's cache)."""
    model = routed_hf(em)
    shapes = cache_shapes(model)
    token, slices = _Token(), em.weight_slices()
    for name, op in em.ops.items():
        path = em.block(name).module_path
        parent, _, leaf = path.rpartition(".")
        routed = model.get_submodule(path)
        if op.kind == "mlp":
            new = _TokenMLP(routed, token)
        else:
            new = _TokenAttention(routed, slices[em.block(name).out_proj.weight], token)
        setattr(model.get_submodule(parent), leaf, new)
    return _RoutedStep(model.eval(), token, list(em.ops), len(shapes)).eval(), shapes


def to_routed_onnx(em: ElasticModel, path: str | os.PathLike, *, check: bool = True,
                   tol: float = 1e-4, overwrite: bool = False) -> Path:
    """Write `em` with its dynamic routers as an ONNX decoder of one token per step (see
    the module docstring). Raises `UnsupportedModelError` for a family `routed_hf` cannot
    run or whose MLPs the lowering does not recognise.

    Example:
        >>> load_routers(em, "runs/routers", "dynamic")              # doctest: +SKIP
        >>> to_routed_onnx(em, "routed.onnx")                       # doctest: +SKIP
    """
    from ..passes.inject_routers import budget_source

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name ending in .onnx")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    step, shapes = routed_step(em)
    inputs = _inputs(em, shapes, past=3, budget=0.6)
    past = torch.export.Dim("past")
    dynamic = ({}, None, tuple({2: past} for _ in range(2 * len(shapes))))
    names = ["input_ids", "budget"] + [f"past_{kv}_{i}" for i in range(len(shapes))
                                       for kv in ("key", "value")]
    outputs = ["logits"] + [f"present_{kv}_{i}" for i in range(len(shapes))
                            for kv in ("key", "value")] + ["widths"]
    proto = export_program(step, inputs, dynamic, names=names)
    if [o.name for o in proto.graph.output] != outputs:
        for o, name in zip(proto.graph.output, outputs):
            _rename(proto.graph, o.name, name)
    entry = proto.metadata_props.add()  # which op each entry of `widths` is
    entry.key, entry.value = OPS_KEY, json.dumps(list(em.ops))
    calibration = budget_source(em).calibration
    if calibration is not None:  # the runtime maps T to the routers' input, as set_budget
        entry = proto.metadata_props.add()
        entry.key, entry.value = CALIBRATION_KEY, json.dumps(calibration)
    blob = proto.SerializeToString()
    if check:
        _check(step, blob, em, shapes, tol)
    return write_atomic(path, blob)


def _inputs(em, shapes, past: int, budget: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vocab = min(int(em.source["config"].get("vocab_size", 2)), 1000)
    ids = torch.randint(0, vocab, (1, 1), generator=gen)
    cache = tuple(torch.randn(1, kv, past, hd, generator=gen) for kv, hd in shapes
                  for _ in range(2))
    return ids, torch.tensor(budget, dtype=torch.float32), cache


def _check(step, blob: bytes, em, shapes, tol: float, tokens: int = 6) -> None:
    """onnxruntime against PyTorch, token by token from an empty cache, at two budgets."""
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    vocab = min(int(em.source["config"].get("vocab_size", 2)), 1000)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    for budget in (0.6, 1.0):
        t = torch.tensor(budget, dtype=torch.float32)
        cache = tuple(torch.zeros(1, kv, 0, hd) for kv, hd in shapes for _ in range(2))
        for i in range(tokens):
            with torch.inference_mode():
                want = step(ids[:, i:i + 1], t, cache)
            got = session.run(None, dict(zip(names, [x.numpy() for x in
                                                     (ids[:, i:i + 1], t, *cache)])))
            where = f"(routed decoder, budget {budget}, token {i})"
            if not np.array_equal(got[-1], want[-1].numpy()):
                raise ExportError(f"the routers chose {got[-1].tolist()} in onnxruntime but "
                                  f"{want[-1].tolist()} in PyTorch {where}; the file was not "
                                  "written")
            compare(got[:-1], list(want[:-1]), tol, where)
            cache = tuple(want[1:-1])


__all__ = ["routed_step", "to_routed_onnx"]
