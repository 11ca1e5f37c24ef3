"""An ONNX decoder with the dynamic routers inside: every token at the widths its routers
choose, with a key/value cache, in onnxruntime.

`to_routed_onnx(em, path)` exports `routed_hf(em)` for one token per step:

    inputs   input_ids [1, 1], budget [] (float32, a fraction of the full model's cost),
             past_key_i / past_value_i [1, kv_i, past, head_dim]
    outputs  logits [1, 1, vocab], present_key_i / present_value_i
             [1, kv_i, past + 1, head_dim], widths [ops] (int64: the candidate index each
             op's router chose for this token, in `em.ops` order, which the file's
             metadata `flextron_ops` lists)

Inside, each block's router reads the block's input and the budget; its argmax picks the
block's kept count (neurons, or key/value groups or query heads per group) from a small
table, and the weights are sliced to it in the graph (`Slice` of a prefix, or `Gather` of
query rows kept inside each group), as in the elastic ONNX file: a narrower token runs
smaller matmuls, nothing is masked. The cache holds every head's keys and values, as in
`routed_hf`. One file serves every budget. One token per step at batch 1: `OrtRoutedDecoder`
feeds a prompt token by token, which gives each token what `routed_hf` gives it (a
token's widths and output depend only on it and the tokens before it). Before the file is
written, onnxruntime is checked against the same step in PyTorch token by token, at two
budgets: logits to `tol` of their scale and the routers' choices exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._atomic import write_atomic
from ..elastic.model import ElasticModel
from ..errors import ExportError, OutputError, UnsupportedModelError
from .decoder_onnx import _rename, _Step, cache_shapes
from .elastic_onnx import pick
from .onnx import compare, export_program
from .routed_hf import RoutedAttention, RoutedMLP, _Elastic, plan_indices, routed_hf

OPS_KEY = "flextron_ops"  # metadata: the op names of the `widths` output, in order


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


def _table(values: list[int]) -> tuple[torch.Tensor, int, int]:
    return torch.tensor(values, dtype=torch.int64), min(values), max(values)


class _TokenMLP(nn.Module):
    """A routed MLP for one token: its router's width, the MLP on that weight prefix."""

    def __init__(self, routed: RoutedMLP, token: _Token):
        super().__init__()
        from ..passes.lower import match_mlp

        self.elastic, self.token = routed.elastic, token
        region = self.elastic.region
        spec = match_mlp(region)
        if isinstance(spec, str):
            raise UnsupportedModelError(f"{region.block}: {spec}; the routed ONNX decoder "
                                        "slices recognised MLPs only")
        self.spec = spec
        self.widths, self.low, self.high = _table(list(region.candidates))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from ..codegen.mlp import elastic_mlp_ref

        index = self.token.choose(self.elastic, x)
        width = pick(self.widths, index, self.low, self.high)
        y = elastic_mlp_ref(x, width, *self.spec.operands(self.elastic.params), self.spec.act)
        return self.token.compensate(self.elastic, y, index)


class _TokenAttention(nn.Module):
    """A routed attention for one token: the query heads of its router's width over a
    prefix of the cached key/value heads, and the matching columns of the output
    projection. Every size is an expression of one number per block (the kept count of
    its shrinking class), as the exporter needs."""

    def __init__(self, routed: RoutedAttention, o_slice, token: _Token):
        super().__init__()
        self.routed, self.elastic, self.token = routed, routed.elastic, token
        attn, region = routed.attn, routed.elastic.region
        rule, hd = region.rule, routed.head_dim
        if not isinstance(getattr(attn, "o_proj", None), nn.Linear):
            raise UnsupportedModelError(f"{region.block}: no o_proj to slice")
        kept = [rule.classes(c).get(rule.cls, rule.size) for c in region.candidates]
        self.counts, self.low, self.high = _table(kept)
        rows, cols, kv, per = [], [], [], []
        for c in region.candidates:
            n, q = routed._query(c)[2], routed.q_slice.plan(c)
            o = o_slice.plan(c)
            rows.append(plan_indices(q, attn.q_proj.weight.shape[0]))
            cols.append(plan_indices(o, attn.o_proj.weight.shape[1]))
            kv.append(n)
            per.append(len(rows[-1]) // hd // n)
        # key/value heads and query heads per key/value head, each a multiple of the kept
        # count or a constant
        self.kv, self.per = _affine(kv, kept, region.block), _affine(per, kept, region.block)
        self.prefix = all(torch.equal(r, torch.arange(len(r))) and torch.equal(r, k)
                          for r, k in zip(rows, cols))
        if not self.prefix:
            if any(not torch.equal(r, k) for r, k in zip(rows, cols)):
                raise UnsupportedModelError(f"{region.block}: its query rows and output "
                                            "columns differ")
            widest = max(len(r) for r in rows)
            self.register_buffer("rows", torch.stack(
                [torch.cat([r, r.new_zeros(widest - len(r))]) for r in rows]))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask=None, cache=None, past_key_values=None, **kwargs):
        routed, attn, hd = self.routed, self.routed.attn, self.routed.head_dim
        cache = cache if cache is not None else past_key_values
        b, s = hidden_states.shape[:2]
        index = self.token.choose(self.elastic, hidden_states)
        u = pick(self.counts, index, self.low, self.high)
        kv, per = _size(self.kv, u), _size(self.per, u)
        n = kv * per * hd
        bias = attn.q_proj.bias
        if self.prefix:
            wq, wo = attn.q_proj.weight.narrow(0, 0, n), attn.o_proj.weight.narrow(1, 0, n)
            bq = None if bias is None else bias.narrow(0, 0, n)
        else:
            rows = self.rows[index].narrow(0, 0, n)
            wq, wo = attn.q_proj.weight.index_select(0, rows), \
                attn.o_proj.weight.index_select(1, rows)
            bq = None if bias is None else bias.index_select(0, rows)
        q, k, v = routed.project(hidden_states, wq, bq, position_embeddings, cache)
        length = k.shape[2]

        def share(t):  # the first kv heads, each repeated for its query heads in turn
            t = t.narrow(1, 0, kv)[:, :, None].expand(b, kv, per, length, hd)
            return t.reshape(b, kv * per, length, hd)

        out = F.scaled_dot_product_attention(q, share(k), share(v), scale=attn.scaling)
        out = F.linear(out.transpose(1, 2).reshape(b, s, n), wo, attn.o_proj.bias)
        return self.token.compensate(self.elastic, out, index), None


def _affine(values: list[int], kept: list[int], block: str) -> tuple[int, int]:
    """(a, b) with values[i] == a * kept[i] + b and a or b zero, or UnsupportedModelError."""
    if len(set(values)) == 1:
        return 0, values[0]
    if all(v % k == 0 for v, k in zip(values, kept)) and len({v // k for v, k in
                                                              zip(values, kept)}) == 1:
        return values[0] // kept[0], 0
    raise UnsupportedModelError(f"{block}: its head counts {values} are no multiple of its "
                                f"kept counts {kept}")


def _size(affine: tuple[int, int], u):
    a, b = affine
    return b if a == 0 else a * u


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
